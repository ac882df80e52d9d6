"""The resume journal and the completion record kept under ``<target>/.iosea-mover/``.

``journal.jsonl`` is written while a transfer runs: one JSON line per element transferred and
verified, ``[rel, size, mtime_ns, xxh3-128 hex]`` (``hex`` is ``"link"`` for a symlink), and for a
file a ``copy`` wrote also ``src_ino, src_ctime_ns, dst_ino, dst_ctime_ns``: the identities of
the source and of the copy as they were once the copy was verified and renamed into place. Lines
are appended without fsync: the journal only saves work, a lost or torn line only costs a
re-verification, never correctness. A cancelled or killed run keeps it for the rerun.

``record.jsonl`` is what a ``copy`` that ended (completed or failed) leaves: the journal's lines
merged into the earlier record of the same source, so that a rerun on an unchanged tree costs
about what ``rsync -a`` costs (a stat of each side, no hashing). A ``move`` leaves none (its
sources are gone). Why a rerun may trust a record line without hashing (the quick check of
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


class Journal:
    """Append-only record of verified elements, readable by the next run on the same target."""

    def __init__(self, target: str, source: str, fsync: bool = False):
        self.dir = os.path.join(target, JOURNAL_DIR)
        self.path = os.path.join(self.dir, _JOURNAL_FILE)
        self.record = os.path.join(self.dir, _RECORD_FILE)
        self.source = source
        self.fsync = fsync  # every copy of this run is fsynced before it is journalled
        self._fd: int | None = None
        self._header_size = 0

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

    @staticmethod
    def _read_header(path: str) -> dict:
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                header = json.loads(f.readline() or "{}")
        except (OSError, ValueError):
            return {}
        return header if isinstance(header, dict) else {}

    def _read(self, path: str, done: dict) -> None:
        """Add the lines of ``path`` to ``done`` when its header is one this run may trust."""
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                header = json.loads(f.readline() or "{}")
                if not isinstance(header, dict) or not self._trusted(header):
                    return
                lines = f.read().splitlines()
        except (OSError, ValueError):
            return
        try:
            rows = json.loads("[" + ",".join(lines) + "]")  # one parse: ~3x faster than per line
        except ValueError:
            rows = []
            for line in lines:
                with contextlib.suppress(ValueError):
                    rows.append(json.loads(line))  # a torn line (kill -9): that element is re-verified
        record = path == self.record
        for row in rows:
            if isinstance(row, list) and len(row) in (4, 8):
                if record and len(row) == 4 and row[3] != "link":
                    continue  # a record's file lines must name identities (a move's journal lines do not)
                done[row[0]] = tuple(row[1:])

    def load(self) -> dict[str, tuple]:
        """Return {rel: (size, mtime_ns, hex[, src_ino, src_ctime_ns, dst_ino, dst_ctime_ns])}:
        the record of the last run that ended, then the journal of an interrupted one (later wins)."""
        done: dict[str, tuple] = {}
        self._read(self.record, done)
        self._read(self.path, done)
        return done

    def open(self) -> None:
        """Start (or continue) the journal of this run; on failure leave nothing it created."""
        made_dir = not os.path.isdir(self.dir)
        os.makedirs(self.dir, exist_ok=True)
        fresh = not os.path.exists(self.path) or not self.load_header_matches()
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | (os.O_TRUNC if fresh else 0)
        try:
            self._fd = os.open(self.path, flags, 0o600)
            if fresh:
                os.write(self._fd, self._header().encode("utf-8", "surrogateescape"))
            # Lines of an interrupted run that this one continues count as new for the record.
            self._header_size = os.fstat(self._fd).st_size if fresh else 0
        except OSError:
            # A target full at the start (ENOSPC on the header): no empty journal is left behind.
            self.close()
            if fresh:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            if made_dir:
                with contextlib.suppress(OSError):
                    os.rmdir(self.dir)
            raise

    def load_header_matches(self) -> bool:
        """Return whether this run continues the existing journal: one it trusts, whose lines claim
        no more than this run's do (a journal of fsynced copies is not continued without fsync)."""
        header = self._read_header(self.path)
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

    def keep_as_record(self) -> None:
        """End a copy: merge the journal into the record (see the module doc), remove the journal.

        Nothing new (a no-op rerun): the record stays as it is. No record yet: the journal becomes
        the record (one rename). Errors only cost the next run some hashing: they are ignored.
        """
        grew = self._fd is not None and os.fstat(self._fd).st_size > self._header_size
        self.close()
        with contextlib.suppress(OSError):
            if not grew:
                os.unlink(self.path)
            elif not self._trusted(old := self._read_header(self.record)):
                os.replace(self.path, self.record)  # none, or one of another source or boot
            else:
                merged: dict[str, tuple] = {}
                self._read(self.record, merged)
                self._read(self.path, merged)
                tmp = f"{self.record}.tmp-{os.getpid()}"
                try:
                    with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
                        # The merged lines claim only what both runs did: fsync only if both fsynced.
                        f.write(self._header(fsync=self.fsync and bool(old.get("fsync"))))
                        f.writelines(
                            f"[{_quote(rel)}, {r[0]}, {r[1]}, {_line_rest((rel, *r))}]\n"
                            for rel, r in merged.items()
                            if len(r) == 7 or r[2] == "link"  # a file's line without identities: dropped
                        )
                    os.replace(tmp, self.record)
                except OSError:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)  # the journal stays: the next run reads it as an interrupted one's
                    raise
                os.unlink(self.path)

    def remove(self) -> None:
        """Close and delete the journal (and its directory unless a record stays in it)."""
        self.close()
        for remove, path in ((os.unlink, self.path), (os.rmdir, self.dir)):
            with contextlib.suppress(OSError):
                remove(path)


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
