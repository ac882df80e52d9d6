"""The resume journal and the completion record kept under ``<target>/.iosea-mover/``.

``journal.jsonl`` is written while a transfer runs: one JSON line per element transferred and
verified, ``[rel, size, mtime_ns, xxh3-128 hex]`` (``hex`` is ``"link"`` for a symlink), and for a
file (copy and move alike) also ``src_ino, src_ctime_ns, dst_ino, dst_ctime_ns``: the identities
of the source and of the copy as they were once the copy was verified and renamed into place. Lines
are appended without fsync: the journal only saves work, a lost or torn line only costs a
re-verification, never correctness. A cancelled or killed run keeps it for the rerun.

``record.jsonl`` is what a ``copy`` that ended (completed or failed) leaves: the journal's lines
merged into the earlier record of the same source, so that a rerun on an unchanged tree costs
about what ``rsync -a`` costs (a stat of each side, no hashing). A ``move`` leaves none (its
sources are gone), and trusts a line (of a record or of an interrupted run's journal) only as a
copy does: with both identities unchanged, else it hashes both sides; so a source changed since
its line was written (or a new file of the same name, size and mtime) is never deleted as if
moved. Why a rerun may trust a record line without hashing (the quick check of
``engine._Transfer.scan_target``):

* it names the inode and the ctime of the copy and of the source. No process can set a ctime: the
  kernel sets it to the current time on every change of a file's data or metadata (write, truncate,
  chmod, chown, utime, xattr, rename). A copy or a source with the inode and the ctime recorded
  has not changed since the copy was verified against the source (a source rewritten in place
  with its mtime put back, as in issue 15 finding 6, has a new ctime: it is hashed again);
* the record was written on this boot of this machine, so the page cache it was verified through
  is the one a rerun reads: a crash that could lose written data also changes the boot id, and a
  record of another boot (or of another node of a shared filesystem) is only trusted when its run
  fsynced every copy (``--fsync``) before recording it. Otherwise it is ignored, and each element
  is verified by hashing both sides, as without a record.

A record only makes a rerun skip work: anything that does not match exactly is hashed, so a
lost, torn, stale or foreign record can cost time, never a file. ``--verify`` ignores both files.
"""

from __future__ import annotations

import contextlib
import json
import os

from iosea_wf.mover import dirs
from iosea_wf.mover.patterns import JOURNAL_DIR

SCHEMA_VERSION = 1
_JOURNAL_FILE = "journal.jsonl"
_RECORD_FILE = "record.jsonl"


def _read_boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


_BOOT_ID = _read_boot_id()  # read at import: the mover may drop privileges after (tests do)


def _boot_id() -> str:
    return _BOOT_ID


_RD = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_WR = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


class Journal:
    """Append-only record of verified elements, readable by the next run on the same target.

    Its directory is opened beneath the target's descriptor (:meth:`bind`) without following a
    symlink, and its files relative to that (O_NOFOLLOW): a ``.iosea-mover`` that is a symlink
    (to anywhere) is an error of the run, never written through.
    """

    def __init__(self, target: str, source: str, fsync: bool = False):
        self.dir = os.path.join(target, JOURNAL_DIR)
        self.path = os.path.join(self.dir, _JOURNAL_FILE)
        self.record = os.path.join(self.dir, _RECORD_FILE)
        self.source = source
        self.fsync = fsync  # every copy of this run is fsynced before it is journalled
        self._fd: int | None = None
        self._header_size = 0
        self.target_fd: int | None = None
        self.dir_fd: int | None = None  # the journal directory, once opened or made

    def bind(self, target_fd: int) -> None:
        """Work beneath open target directory ``target_fd`` from now on."""
        self.target_fd = target_fd

    def _open_dir(self, create: bool) -> int | None:
        """The journal directory's descriptor (made when ``create``), or None when there is none."""
        if self.dir_fd is None:
            try:
                self.dir_fd = dirs.open_dir(self.target_fd, JOURNAL_DIR)
            except FileNotFoundError:
                if not create:
                    return None
                self.dir_fd = dirs.make_dirs(self.target_fd, JOURNAL_DIR)
        return self.dir_fd

    def _header(self, fsync: bool | None = None) -> str:
        meta = {
            "schema_version": SCHEMA_VERSION,
            "source": self.source,
            "boot_id": _boot_id(),
            "fsync": self.fsync if fsync is None else fsync,
        }
        return json.dumps(meta) + "\n"

    def _trusted(self, header: dict) -> bool:
        """Whether lines under ``header`` are this source's and may be trusted (see the module doc)."""
        if header.get("source") != self.source or header.get("schema_version") != SCHEMA_VERSION:
            return False
        return header.get("boot_id") == _boot_id() or bool(header.get("fsync"))

    def _reader(self, name: str):
        return open(os.open(name, _RD, dir_fd=self.dir_fd), encoding="utf-8", errors="surrogateescape")

    def _read_header(self, name: str) -> dict:
        try:
            with self._reader(name) as f:
                header = json.loads(f.readline() or "{}")
        except (OSError, ValueError):
            return {}
        return header if isinstance(header, dict) else {}

    def _read(self, name: str, done: dict) -> None:
        """Add the lines of ``name`` to ``done`` when its header is one this run may trust."""
        try:
            with self._reader(name) as f:
                header = json.loads(f.readline() or "{}")
                if not isinstance(header, dict) or not self._trusted(header):
                    return
                text = f.read()
        except (OSError, ValueError):
            return
        try:
            # One parse of all lines as one array: ~3x faster than line by line.
            rows = json.loads("[" + text.rstrip("\n").replace("\n", ",") + "]")
        except ValueError:
            rows = []
            for line in text.splitlines():
                with contextlib.suppress(ValueError):
                    rows.append(json.loads(line))  # a torn line (kill -9): that element is re-verified
        # A file's line names the identities of both sides (the quick check needs them); a
        # symlink's is [rel, 0, mtime, "link"]. Anything else (an older journal) is ignored.
        done.update(
            (row[0], tuple(row[1:]))
            for row in rows
            if type(row) is list and (len(row) == 8 or len(row) == 4 and row[3] == "link")
        )

    def load(self) -> dict[str, tuple]:
        """Return {rel: (size, mtime_ns, hex[, src_ino, src_ctime_ns, dst_ino, dst_ctime_ns])}:
        the record of the last run that ended, then the journal of an interrupted one (later wins).

        Raise OSError when the journal directory cannot be opened (a symlink: ELOOP).
        """
        done: dict[str, tuple] = {}
        if self._open_dir(create=False) is not None:
            self._read(_RECORD_FILE, done)
            self._read(_JOURNAL_FILE, done)
        return done

    def open(self) -> None:
        """Start (or continue) the journal of this run; on failure leave nothing it created."""
        made_dir = self.dir_fd is None and self._open_dir(create=False) is None
        dfd = self._open_dir(create=True)
        try:
            os.lstat(_JOURNAL_FILE, dir_fd=dfd)
            fresh = not self.load_header_matches()
        except FileNotFoundError:
            fresh = True
        flags = _WR | os.O_APPEND | (os.O_TRUNC if fresh else 0)
        try:
            self._fd = os.open(_JOURNAL_FILE, flags, 0o600, dir_fd=dfd)
            if fresh:
                os.write(self._fd, self._header().encode("utf-8", "surrogateescape"))
            # Lines of an interrupted run that this one continues count as new for the record.
            self._header_size = os.fstat(self._fd).st_size if fresh else 0
        except OSError:
            # A target full at the start (ENOSPC on the header): no empty journal is left behind.
            self.close()
            if fresh:
                with contextlib.suppress(OSError):
                    os.unlink(_JOURNAL_FILE, dir_fd=dfd)
            if made_dir:
                self._remove_dir()
            raise

    def load_header_matches(self) -> bool:
        """Return whether this run continues the existing journal: one it trusts, whose lines claim
        no more than this run's do (a journal of fsynced copies is not continued without fsync)."""
        header = self._read_header(_JOURNAL_FILE)
        return self._trusted(header) and (self.fsync or not header.get("fsync"))

    def append(self, records: list[tuple]) -> None:
        """Append verified elements in one write (a torn tail is tolerated by :meth:`load`).

        Worker processes share the descriptor (O_APPEND), so each batch lands as one write.
        """
        if self._fd is None or not records:
            return
        text = "".join(f"[{_quote(r[0])}, {r[1]}, {r[2]}, {_line_rest(r)}]\n" for r in records)
        os.write(self._fd, text.encode("utf-8", "surrogateescape"))

    def close(self) -> None:
        """Close the journal, keeping it for the next run."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def release(self) -> None:
        """Close every descriptor (the journal's and its directory's)."""
        self.close()
        if self.dir_fd is not None:
            os.close(self.dir_fd)
            self.dir_fd = None

    def keep_as_record(self) -> None:
        """End a copy: merge the journal into the record (see the module doc), remove the journal.

        Nothing new (a no-op rerun): the record stays as it is. No record yet: the journal becomes
        the record (one rename). Errors only cost the next run some hashing: they are ignored.
        """
        grew = self._fd is not None and os.fstat(self._fd).st_size > self._header_size
        self.close()
        dfd = self.dir_fd
        if dfd is None:
            return
        with contextlib.suppress(OSError):
            if not grew:
                os.unlink(_JOURNAL_FILE, dir_fd=dfd)
            elif not self._trusted(old := self._read_header(_RECORD_FILE)):
                # none, or one of another source or boot
                os.replace(_JOURNAL_FILE, _RECORD_FILE, src_dir_fd=dfd, dst_dir_fd=dfd)
            else:
                merged: dict[str, tuple] = {}
                self._read(_RECORD_FILE, merged)
                self._read(_JOURNAL_FILE, merged)
                tmp = f"{_RECORD_FILE}.tmp-{os.getpid()}"
                try:
                    fd = os.open(tmp, _WR | os.O_EXCL, 0o600, dir_fd=dfd)
                    with open(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
                        # The merged lines claim only what both runs did: fsync only if both fsynced.
                        f.write(self._header(fsync=self.fsync and bool(old.get("fsync"))))
                        f.writelines(
                            f"[{_quote(rel)}, {r[0]}, {r[1]}, {_line_rest((rel, *r))}]\n"
                            for rel, r in merged.items()
                        )
                    os.replace(tmp, _RECORD_FILE, src_dir_fd=dfd, dst_dir_fd=dfd)
                except OSError:
                    # The journal stays: the next run reads it as an interrupted one's.
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=dfd)
                    raise
                os.unlink(_JOURNAL_FILE, dir_fd=dfd)

    def remove(self) -> None:
        """Close and delete the journal (and its directory unless a record stays in it)."""
        self.close()
        if self.dir_fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(_JOURNAL_FILE, dir_fd=self.dir_fd)
            self._remove_dir()

    def _remove_dir(self) -> None:
        if self.dir_fd is not None:
            os.close(self.dir_fd)
            self.dir_fd = None
        with contextlib.suppress(OSError):
            os.rmdir(JOURNAL_DIR, dir_fd=self.target_fd)  # only if empty (a record or run stays)


def _line_rest(r: tuple) -> str:
    """The digest (and identities, when known) of journal row ``r`` as JSON text."""
    if len(r) == 8:
        return f'"{r[3]}", {r[4]}, {r[5]}, {r[6]}, {r[7]}'
    return f'"{r[3]}"'


def _quote(text: str) -> str:
    """Return ``text`` as a JSON string; the common case (printable ASCII) without the json module."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return json.dumps(text)
