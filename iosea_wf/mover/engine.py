"""The data-mover engine: copy or move what glob patterns select from a source to a target directory.

``transfer(operation, source, target, patterns, ...)`` is the Python API; the ``iosea-wf-mover``
console script (:mod:`iosea_wf.mover.cli`) is a thin layer over it.

Integrity argument
------------------
* The roots are refused up front when they overlap (:func:`dirs.overlap`): one directory by
  ``(st_dev, st_ino)``, or one containing the other, by ``..`` from either or inside one
  filesystem reached through two mounts (a bind mount, two mount paths of one NFS filesystem).
  As another path may still lead from one into the other below the roots, a target directory
  that is a directory of the source (by ``(st_dev, st_ino)``, from the plan) refuses the run,
  a target directory that is its own source directory fails its files, and a target file that
  is a source file (the same inode) is an error for it: a source is never "verified" against
  itself, overwritten by its own copy, or deleted as its own copy.
* Paths cannot be redirected: every directory, in the source and in the target, is opened
  beneath a descriptor of its root without following any symlink on the way
  (:func:`dirs.open_dir`: openat2 RESOLVE_NO_SYMLINKS|RESOLVE_BENEATH, else O_NOFOLLOW per
  component), and files are opened relative to those (O_NOFOLLOW). Metadata goes the same way:
  a file's through its open descriptors, a directory's through descriptors of both sides opened
  so, a symlink's by ``dir_fd`` and name (``follow_symlinks=False``; attributes, which take no
  ``dir_fd``, through ``/proc/self/fd/<dir>/<name>``, which resolves no path again), and the
  stats a rerun records (inode and ctime of both sides) by ``dir_fd`` and name too. A directory
  swapped for a symlink after planning, or a target directory that is a symlink, is an error for
  the files under it, never followed. Target directories are created the same way, empty ones
  included (a move keeps them: a source directory is removed only once its target directory
  exists).
* Each file is written to ``.<name>.iosea-tmp-<run id>-<n>`` in its target directory and renamed
  over its final name only when complete, so a reader (or a crash) never sees a partial file
  under a final name: rename(2) within one directory is atomic.
* Small files (< 64 KiB) are read once; the bytes are hashed (xxh3-128) from the very buffer handed
  to write(2), so the digest describes exactly what was written: one read of size+1 bytes (a short
  or long read means the file changed) and one write whose count must be the whole file. Large
  files are copied by the kernel (copy_file_range, else sendfile; through the buffer only where
  neither works) in 8 MiB chunks, only their data ranges (SEEK_DATA/SEEK_HOLE: a sparse file
  stays sparse), and each chunk is then hashed on both sides, the source by reading it and the
  temp file through a read-only mapping of the page cache, holes as the zeros they read as; the
  two digests must agree, the total must be the planned size and the temp file must have that
  length. The temp file then gets the source's metadata (:mod:`metadata`: owner, exact mode,
  xattrs, POSIX ACLs, times, as ``cp -a``; what the target cannot keep is a warning). The rename
  happens only if, after the copy, the source's size and mtime (fstat of the open descriptor)
  are still those of the plan. ``--fsync`` adds an fsync of each temp file.
* What this does and does not check: it catches short or failed writes, truncation, a source that
  changes during the copy (a large one even when rewritten in place with its size and mtime
  kept), and (through the recorded digest) a target that differs on a later verification
  (resume, move). It does not prove the media holds the bytes: right after the copy both sides
  are read from the page cache. That would need a read after the cache is dropped; a move relies
  instead on syncfs before deleting (below), and a rerun re-hashes the target against the
  journal before deleting a source it did not copy itself.
* ``move`` deletes a source only after its copy was verified and renamed into place, and only after
  it checked (lstat) that the source is still the inode it copied, with the size, mtime *and
  ctime* it had then (a rewrite in place with the mtime put back changes the ctime; a symlink
  re-pointed is another inode), and that the source is not its own copy (another inode than
  the one at the target). A worker deletes its verified sources in batches, each after a
  ``syncfs`` of the target filesystem that began after every copy of the batch was renamed into
  place, so a moved file's data is on stable storage before its source is gone: a kill -9 *or a
  node crash* at any moment leaves each file complete at the source, at the target, or both.
  Each worker syncs through its own open file description of the target, opened before its
  first copy, so its syncfs reports any write-back error (EIO) of the filesystem since then. A
  syncfs error is never papered over (no fallback to sync()): the batch's sources, and every
  source the worker would delete after it, are kept and reported, and the run stops. An error
  of fsync (``--fsync``) or close of a copy fails that file before it is renamed into place.
  The names of one hard-linked source (one ``(st_dev, st_ino)`` in the plan) are copied once
  and linked to that copy, and all its names are checked before any is deleted.
  A batch is deleted by a thread of the worker
  as soon as it holds 64 MiB, while the worker copies on, or else when the worker has no more
  work (also when the run is cancelled). (The chunks of large files are handed to the disk as
  they are copied, so that syncfs mostly waits for writes already under way.)
* Worker processes (forked, so they share the plan) ask the kernel to SIGKILL them when the parent
  dies (PR_SET_PDEATHSIG, plus a getppid() check for a parent that died before that took effect),
  so a kill -9 of the mover stops its workers too; each of their steps above is atomic or leaves
  only a temp file. They ignore SIGTERM/SIGINT/SIGHUP: the parent relays a cancellation through a
  shared stop flag that they poll per file and per chunk, so a cancelled run removes its in-flight
  temp files, deletes (move) only what was verified, and exits 143/130/129. A source is never mapped (it
  is read to be hashed), so another process cutting it cannot kill a worker with SIGBUS, and the
  mover takes no lease: no other process ever waits for it or is refused because of it. A
  worker that dies anyway (a bug) is reported by the parent, and the run fails; its temp file is
  removed by the rerun, and nothing was deleted that was not verified.
* Only its own files: a temporary's name carries its run's id, and a run records itself
  (:mod:`iosea_wf.mover.runs`) in the target's journal directory before it makes one. A run
  removes a temporary only when its run id was recorded by a run that is gone; a user's file
  named like a temporary, or a temporary of a mover into a directory above or below this
  target, is never touched. Two movers into one target (overlapping runs of one step) also
  serialise on an exclusive flock of the target directory, held for the whole run (the second
  plans again once it has it): under it, every other recorded run is gone, as a lock dies with
  its process; without working locks, a recorded run is gone when its process is.
* Resuming: temporaries of dead runs in the target directories are removed first. An element already at the
  target with the source's size and mtime is verified rather than copied again: when the journal
  (:mod:`iosea_wf.mover.journal`, one append per batch of files by each worker) or the record of
  an earlier copy or move has it, the line is trusted only when both sides still have the inode
  and ctime it recorded (else both are hashed), for ``copy`` and ``move`` alike: a line says what
  the target held when it was written, and only the unchanged identities say the source is still
  what it was compared with (a source rewritten in place since, its size and mtime put back, or a
  new file of that name, size and mtime, is hashed, never deleted on a line's word). A ``move``
  then deletes a "done" source as one it copied: after a syncfs, and only if it is still the
  plan's inode, size, mtime and ctime and not its own copy. Without a line both sides are hashed.
  An element whose target holds anything else (a different file, as its size or hash shows, a
  directory, another symlink) is an error for that element: the target is left as it was and the
  source kept, unless ``replace`` (``--replace``) is given, which copies over it. A target absent
  at the scan is renamed into with RENAME_NOREPLACE, so a file another writer puts there during
  the copy is not replaced either (one renameat2 instead of rename: no extra call).
* When a run ends (completed or failed) its journal is removed; a cancelled or killed run keeps it
  for the rerun. A ``copy`` that ends merges it into ``.iosea-mover/record.jsonl``, which makes a
  rerun on an unchanged tree cost a stat of each side: an element is skipped unhashed only when
  its source and its copy have the very inode and ctime recorded once the copy was verified (see
  :mod:`iosea_wf.mover.journal` for why that is safe); ``--verify`` hashes every one. Source
  directories a ``move`` emptied are removed when they were part of a matched directory; target
  directories get their source's metadata at the end of the copy phase (:mod:`metadata`), and an
  element found already at the target with the source's bytes gets the source's metadata where
  it differs.

Speed: small files cost kernel calls, and with threads the Python work between them is serialised
by the GIL, so the work runs in worker processes (default two per core). Work is handed out in
batches through a pipe (a large file alone, small files by the hundred); a worker keeps its
directories open and works relative to them, and progress counters live in shared memory, so the
per-file cost is the minimum of kernel calls: open, create, read, write, fstat, futimens, close,
rename (and for move lstat and unlink, spread over the workers too).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import gc
import marshal
import mmap
import os
import queue
import select
import signal
import stat
import threading
import time
from collections.abc import Callable

from iosea_wf.mover import dirs, filecopy, metadata
from iosea_wf.mover.errors import (
    EXIT_FILES_FAILED,
    EXIT_OK,
    EXIT_SIGTERM,
    EXIT_TARGET_FULL,
    MoverError,
    MoverUsageError,
    NothingMatched,
    SourceMissing,
)
from iosea_wf.mover.journal import Journal
from iosea_wf.mover.patterns import TEMP_RE, Entry, Plan, resolve, split_pattern
from iosea_wf.mover.progress import ProgressReporter, Snapshot
from iosea_wf.mover.runs import Runs, new_run_id

OPERATIONS = ("copy", "move")
_BATCH_FILES = 256
_BATCH_BYTES = 16 << 20
_UNLINK_THREADS = 4  # per worker: unlinks that wait on the disk overlap (measured: 4 workers x 4 best)
_UNLINK_MIN = 64  # fewer sources than this per thread are not worth a thread
_DELETE_EARLY_BYTES = 64 << 20  # a worker deletes verified sources during its copies past this
_POLL_S = 0.05  # how soon the parent relays a cancellation (a signal) to its workers
_SCAN_SPLIT_MIN = 2000  # entries from which the target scan is shared with a forked process
_PR_SET_PDEATHSIG = 1
_SYNC_FILE_RANGE_WRITE = 2
_STOP = 0  # slot of the shared stop flag; then per worker:
# (files, bytes, verified bytes, files copied but kept at the source, their bytes)
_SLOTS = 5
_MSG_MAX = 3000  # one message per pipe write, well under PIPE_BUF (4096): never interleaved
_NOTES_MAX = 200  # metadata warnings said one by one; more are counted and said in one line
# flock errors of a filesystem that has no locks: the transfer goes on without one.
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
CONFLICT_HINT = "kept at the source, target left as it was (--replace overwrites it)"
SAME_FILE = "its target is the source file itself (the same inode through another path); kept"
SAME_DIR = "its target directory is its source directory (through another path); kept"


def default_workers() -> int:
    """Return the default number of worker processes: two per usable core, between 2 and 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(2, min(16, 2 * cores))


class TransferResult:
    """What a transfer did; ``exit_code`` is the one the console script exits with."""

    def __init__(self, operation: str, state: str, exit_code: int, **counts):
        self.operation = operation
        self.state = state  # "completed", "failed" or "cancelled"
        self.exit_code = exit_code
        self.files_total: int = counts.get("files_total", 0)
        self.files_done: int = counts.get("files_done", 0)
        self.files_failed: int = counts.get("files_failed", 0)
        # neither done nor failed: not reached (cancelled, or stopped: target full, a worker died)
        self.files_left: int = counts.get("files_left", 0)
        self.bytes_total: int = counts.get("bytes_total", 0)
        self.bytes_done: int = counts.get("bytes_done", 0)
        self.bytes_copied: int = counts.get("bytes_copied", 0)
        self.bytes_verified: int = counts.get("bytes_verified", 0)  # found at the target, hashed
        self.errors: list[str] = counts.get("errors", [])
        self.warnings: list[str] = counts.get("warnings", [])
        self.elapsed_s: float = counts.get("elapsed_s", 0.0)

    def __repr__(self) -> str:
        return f"TransferResult({self.__dict__!r})"


class _Counter:
    __slots__ = ("bytes", "files", "verified")

    def __init__(self) -> None:
        self.bytes = 0
        self.files = 0
        self.verified = 0  # bytes found already complete at the target (hashed, not copied)


def _join(root: str, rel: str) -> str:
    return os.path.join(root, rel) if rel else root


class _Libc:
    """The libc calls Python lacks (syncfs, sync_file_range, prctl); ctypes is loaded once, before forking."""

    def __init__(self) -> None:
        self.syncfs = self.prctl = self.sync_file_range = None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self.syncfs = libc.syncfs
            self.prctl = libc.prctl
            self.sync_file_range = libc.sync_file_range
            self.sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
        except (AttributeError, OSError):
            pass

    def start_writeback(self, fd: int, offset: int, length: int) -> None:
        """Start writing ``fd``'s range to the disk now, without waiting (a hint: errors ignored).

        A move's ``syncfs`` before deleting sources then finds most of the data already written:
        the disk works while the copy goes on instead of after it.
        """
        if self.sync_file_range is not None:
            self.sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)

    def sync_fs(self, fd: int) -> None:
        """Flush the filesystem holding ``fd`` to stable storage; raise OSError with syncfs's error.

        syncfs reports a write-back error (EIO: the disk refused data or metadata) that happened
        on the filesystem since ``fd`` was opened, and each open file description sees it once:
        each worker opens its own before its first copy. Never replaced by sync(), which
        reports nothing: a source is deleted only after a syncfs that succeeded.
        """
        if self.syncfs is None:
            raise OSError(errno.ENOSYS, "syncfs is missing: nothing can be made durable")
        if self.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def die_with_parent(self, parent: int) -> None:
        """Have the kernel SIGKILL this process when ``parent`` dies (kill -9 included)."""
        if self.prctl is not None:
            self.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)


class _Transfer:
    def __init__(
        self, operation, source, target, workers, reporter, cancel, fsync, on_message, on_progress, replace
    ):
        self.operation = operation
        self.replace = replace
        self.move = operation == "move"
        self.source = source
        self.target = target
        self.workers = workers
        self.reporter = reporter
        self.cancel = cancel
        self.fsync = fsync
        self.on_message = on_message
        self.on_progress = on_progress
        self.full = False
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self._reported = 0
        self.base = _Counter()  # elements found complete before the workers started
        self.shared = None  # memoryview over a shared mmap: stop flag and per-worker counters
        self.batch_list: list[list] = []
        self.plan = Plan()
        self.bytes_total = 0
        self.journal = Journal(target, source, fsync)
        self.verify = False  # --verify: hash every element already at the target, trust no record
        self.run_id = new_run_id()  # names this run's temporaries: it removes no one else's
        self.runs = Runs(target, self.run_id)
        self.libc: _Libc | None = None
        self.source_fd = -1  # the roots, opened once: every directory is opened beneath them
        self.target_fd = -1
        self.locked = False  # holds the target's exclusive lock
        self.worker_died = False
        self.dir_stats: dict[str, os.stat_result] = {}
        self.run_errors = 0  # errors in self.errors that are not about one element
        self.notes_said = self.notes_unsaid = 0  # warnings of the workers (metadata not kept)

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        if self.on_message:
            self.on_message("warning", text)

    # -- planning ------------------------------------------------------------------------------
    def scan_target(self, journal: dict) -> list[tuple[Entry, str, str | None]]:
        """Remove stale temp files and decide, per entry, 'copy', 'verify' or 'done'.

        Raise MoverUsageError when a target directory is one of the source's (another path to it).
        Only temporaries of runs that recorded themselves and are gone are removed.

        A rerun on an unchanged tree spends its time here (one fstatat per target file through the
        directory's listing, then the quick check): the common cases are tested first, inline.
        """
        entries = self.plan.entries
        by_rel = {e.rel: e for e in entries}
        sources = {(e.dev, e.ino) for e in entries}
        dead = self.runs.dead(self.locked)
        work: list = []
        found: set[str] = set()  # entries decided while their directory was listed
        todo = sorted(self.plan.dirs | self.plan.tree_dirs)
        args = (by_rel, sources, dead, journal, work, found)
        if len(entries) >= _SCAN_SPLIT_MIN and self.workers > 1:
            # Half of the directories are scanned by a forked process meanwhile: the scan is
            # Python work per file (one fstatat and the quick check), so two cores halve it.
            removed = self._scan_split(todo, *args)
        else:
            removed = self._scan_dirs(todo, *args)
        if removed:
            self.warn(f"removed {removed} temporary file(s) left by an interrupted run")
        self.runs.forget(dead)
        if len(found) < len(entries):  # absent at the target: to copy
            work.extend((e, "copy", None) for e in entries if e.rel not in found)
        return self._link_groups(work)

    def _scan_dirs(self, todo: list[str], by_rel, sources, dead, journal, work, found) -> int:
        """Scan target directories ``todo`` (see :meth:`_scan_dir`); return the temporaries removed."""
        removed = 0
        for d in todo:
            try:
                fd = dirs.open_dir(self.target_fd, d)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as e:
                self.warn(f"cannot open target directory {_join(self.target, d)}: {e.strerror}")
                continue
            try:
                dst = os.fstat(fd)
                if (dst.st_dev, dst.st_ino) in self.plan.dir_ids:
                    raise MoverUsageError(
                        f"target directory {_join(self.target, d)} is a directory of the source "
                        "(another path to it): refused, nothing was done"
                    )
                removed += self._scan_dir(
                    fd, f"{d}/" if d else "", by_rel, sources, dead, journal, work, found
                )
            except OSError as e:
                self.warn(f"cannot list target directory {_join(self.target, d)}: {e.strerror}")
            finally:
                os.close(fd)
        return removed

    def _scan_split(self, todo: list[str], by_rel, sources, dead, journal, work, found) -> int:
        """:meth:`_scan_dirs` of every other directory in a forked child, of the rest here, merged.

        The child sends back what it decided (entries by name), found, said and counted, in one
        marshal document; a child that fails in any way has its half scanned here instead.
        """
        mine, theirs = todo[0::2], todo[1::2]
        libc = self.libc or _Libc()
        self.libc = libc
        r, w = os.pipe()
        parent = os.getpid()
        gc.freeze()  # the plan is shared copy-on-write: keep the collector from touching its pages
        try:
            pid = os.fork()
            if pid == 0:  # the child: never returns
                os.close(r)
                _scan_child(self, theirs, (by_rel, sources, dead, journal), w, parent)
        finally:
            gc.unfreeze()
        os.close(w)
        try:
            removed = self._scan_dirs(mine, by_rel, sources, dead, journal, work, found)
        finally:
            chunks = []
            with contextlib.suppress(OSError):
                while chunk := os.read(r, 1 << 20):
                    chunks.append(chunk)
            os.close(r)
            _, status = os.waitpid(pid, 0)
        try:
            if status:
                raise ValueError("the scanning child failed")
            usage, their_work, their_found, errors, warnings, removed_there, files, nbytes = marshal.loads(
                b"".join(chunks)
            )
        except (ValueError, EOFError, TypeError):
            return removed + self._scan_dirs(theirs, by_rel, sources, dead, journal, work, found)
        if usage:
            raise MoverUsageError(usage)
        work.extend((by_rel[rel], action, None) for rel, action in their_work)
        found.update(their_found)
        self.errors.extend(errors)
        for text in warnings:
            self.warn(text)
        self.base.files += files
        self.base.bytes += nbytes
        return removed + removed_there

    def _scan_dir(self, fd, prefix, by_rel, sources, dead, journal, work, found) -> int:
        """Decide the entries of one target directory (open ``fd``) as its listing gives them; remove
        the temporaries of dead runs in it; return how many were removed.

        Each target file is stat-ed once, through the listing, and dropped once decided: a rerun
        on an unchanged tree spends most of its time here, so the common case comes first, inline.
        """
        removed = 0
        append, get_line = work.append, (lambda _rel: None) if self.verify else journal.get
        move, base, S_ISREG = self.move, self.base, stat.S_ISREG
        with os.scandir(fd) as it:
            for de in it:
                name = de.name
                if name[0] == ".":
                    m = TEMP_RE.match(name)
                    if m is not None and m.group(1) in dead:
                        try:
                            os.unlink(name, dir_fd=fd)
                            removed += 1
                        except OSError:
                            pass
                        continue
                rel = prefix + name
                e = by_rel.get(rel)
                if e is None:
                    continue
                found.add(rel)
                st = de.stat(follow_symlinks=False)
                if (
                    S_ISREG(st.st_mode)
                    and e.kind == "file"
                    and st.st_size == e.size
                    and st.st_mtime_ns == e.mtime_ns
                ):
                    # The quick check: a journal or record line is trusted only with both sides still
                    # the inodes and ctimes it names (see iosea_wf.mover.journal for why that is
                    # safe), by a copy and a move alike; a source changed since (or a new one of
                    # that name, size and mtime) is hashed against its target, never deleted on
                    # the line's word.
                    rec = get_line(rel)
                    if (
                        rec is not None
                        and len(rec) == 7
                        and rec[0] == e.size
                        and rec[1] == e.mtime_ns
                        and rec[3] == e.ino
                        and rec[4] == e.ctime_ns
                        and rec[5] == st.st_ino
                        and rec[6] == st.st_ctime_ns
                        and (st.st_dev, st.st_ino) not in sources
                    ):
                        base.files += 1
                        base.bytes += e.size
                        if move:  # a worker deletes the source (after syncing the target)
                            append((e, "done", None))
                        continue
                self._decide(e, st, sources, work)
        return removed

    def _decide(self, e: Entry, st: os.stat_result, sources: set, work: list) -> None:
        """Decide an entry whose target exists but failed the quick check."""
        if (st.st_dev, st.st_ino) in sources:
            self.errors.append(f"{e.rel}: {SAME_FILE}")
        elif e.kind == "link":
            d, _, name = e.rel.rpartition("/")
            if stat.S_ISLNK(st.st_mode) and self._target_link(d, name) == e.link:
                self._already_done(e, work)
            else:
                self._occupied(e, work, "something else")
        elif (
            stat.S_ISREG(st.st_mode)
            and st.st_size == e.size
            and (st.st_mtime_ns == e.mtime_ns or not self.replace)
        ):
            # Same size and mtime without a line to trust, or another mtime: the same bytes are
            # fine (both hashed), others a conflict.
            work.append((e, "verify", None))
        else:
            self._occupied(e, work, "a different file" if stat.S_ISREG(st.st_mode) else "something else")

    @staticmethod
    def _link_groups(work: list) -> list:
        """Hard links stay links: of the files of one inode to copy, the first is copied and carries
        the others (in its third field), which its worker then links to the copy."""
        first: dict[tuple[int, int], list[Entry]] = {}
        out = []
        for w in work:
            e, action, _ = w
            if action == "copy" and e.kind == "file" and e.nlink > 1:
                others = first.get((e.dev, e.ino))
                if others is not None:
                    others.append(e)
                    continue
                others = first[(e.dev, e.ino)] = []
                w = (e, action, others)
            out.append(w)
        return out

    def _target_link(self, d: str, name: str) -> str | None:
        try:
            fd = dirs.open_dir(self.target_fd, d)
        except OSError:
            return None
        try:
            return os.readlink(name, dir_fd=fd)
        except OSError:
            return None
        finally:
            os.close(fd)

    def make_target_dirs(self) -> None:
        """Create every target directory of the plan, empty ones included (never through a symlink)."""
        for d in sorted(self.plan.dirs | self.plan.tree_dirs):
            if d:
                try:
                    os.close(dirs.make_dirs(self.target_fd, d))
                except OSError as e:
                    # Said once here; each file of it then fails in its worker (counted there).
                    self.run_error(f"{d}/: cannot create the target directory: {e.strerror}")

    # The quick check of a rerun (inline in scan_target): the copy at the target and the source
    # (as planned) are the very files, unchanged, that a journal or record line says were verified
    # equal: same size and mtime, and the same inode and ctime on both sides (see
    # iosea_wf.mover.journal for why that is safe).

    def _occupied(self, e: Entry, work: list, what: str) -> None:
        """The target holds something other than the source: replace it only when told to."""
        if self.replace:
            work.append((e, "copy", None))
        else:
            self.errors.append(f"{e.rel}: {what} is already at the target; {CONFLICT_HINT}")

    def _already_done(self, e: Entry, work: list) -> None:
        self.base.files += 1
        self.base.bytes += e.size
        if self.move:
            work.append((e, "done", None))  # a worker deletes the source (after syncing the target)

    @staticmethod
    def batches(work: list) -> list[list]:
        """Large files one per batch, largest first; small ones grouped to amortise task overhead."""
        big = sorted((w for w in work if w[0].size >= filecopy.BUF_SIZE), key=lambda w: -w[0].size)
        out = [[w] for w in big]
        cur: list = []
        cur_bytes = 0
        for w in work:
            if w[0].size >= filecopy.BUF_SIZE:
                continue
            cur.append(w)
            cur_bytes += w[0].size
            if len(cur) >= _BATCH_FILES or cur_bytes >= _BATCH_BYTES:
                out.append(cur)
                cur, cur_bytes = [], 0
        if cur:
            out.append(cur)
        return out

    # -- main process ----------------------------------------------------------------------------
    def snapshot(self, state: str) -> Snapshot:
        files, done_bytes = self.base.files, self.base.bytes
        a = self.shared
        if a is not None:
            files += sum(a[1::_SLOTS]) - sum(a[4::_SLOTS])
            done_bytes += sum(a[2::_SLOTS]) - sum(a[5::_SLOTS])
        total = len(self.plan.entries) + len(self.plan.errors)
        failed = len(self.errors) - self.run_errors
        return Snapshot(
            operation=self.operation,
            state=state,
            files_total=total,
            files_done=files,
            files_failed=failed,
            files_left=total - files - failed,
            bytes_total=self.bytes_total,
            bytes_done=done_bytes,
            errors=list(self.errors),
            warnings=list(self.warnings),
        )

    def verified_bytes(self) -> int:
        a = self.shared
        return sum(a[3::_SLOTS]) if a is not None else 0

    def tick(self, state: str = "running", force: bool = False) -> Snapshot:
        while self._reported < len(self.errors):
            if self.on_message:
                self.on_message("error", self.errors[self._reported])
            self._reported += 1
        snap = self.snapshot(state)
        self.reporter.update(snap, force=force)
        if self.on_progress:
            self.on_progress(snap, self.reporter)
        return snap

    def run_error(self, text: str) -> None:
        """Record an error of the run itself (not of one element: files_failed does not count it)."""
        self.errors.append(text)
        self.run_errors += 1

    def _message(self, line: bytes) -> None:
        """Take one line from a worker: a kind letter (see ``_Worker.say``), then the text."""
        kind, text = line[:1], line[1:].decode("utf-8", "surrogateescape")
        if kind == b"W":
            if self.notes_said < _NOTES_MAX:
                self.notes_said += 1
                self.warn(text)
            else:
                self.notes_unsaid += 1  # counted, and said as one line at the end
            return
        if kind in b"FQ":
            self.full = True
        if kind in b"RQ":
            self.run_error(text)
            return
        self.errors.append(text)

    def run_workers(self, batches: list) -> None:
        """Fork the worker processes, feed them batch numbers, report progress until they are done."""
        n = min(self.workers, len(batches))
        if n == 0:
            return
        self.batch_list = batches
        self.libc = _Libc()
        self.shared = memoryview(mmap.mmap(-1, 8 * (1 + _SLOTS * n))).cast("q")
        task_r, task_w = os.pipe()
        res_r, res_w = os.pipe()
        parent = os.getpid()
        gc.freeze()  # the plan is shared copy-on-write: keep the collector from touching its pages
        pids = []
        try:
            for slot in range(n):
                pid = os.fork()
                if pid == 0:
                    os.close(task_w)
                    os.close(res_r)
                    _worker_main(self, slot, task_r, res_w, parent)  # never returns
                pids.append(pid)
        finally:
            gc.unfreeze()
            os.close(task_r)
            os.close(res_w)
        feeder = threading.Thread(target=_feed, args=(task_w, len(batches)), daemon=True)
        feeder.start()
        pending = b""
        try:
            while True:
                ready, _, _ = select.select([res_r], [], [], _POLL_S)
                if ready:
                    data = os.read(res_r, 1 << 16)
                    if not data:
                        break  # every worker closed its end: all have exited
                    *lines, pending = (pending + data).split(b"\n")
                    for line in lines:
                        self._message(line)
                if self.cancel.is_set() or self.full:
                    self.shared[_STOP] = 1
                self.tick()
        finally:
            self.shared[_STOP] = 1  # on any way out (a bug included), workers stop at a clean point
            os.close(res_r)
            for pid in pids:
                _, status = os.waitpid(pid, 0)
                if status:
                    code = os.waitstatus_to_exitcode(status)
                    what = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
                    self.run_error(f"a worker process died ({what}); rerun to finish the transfer")
                    self.worker_died = True
            feeder.join()

    def dirs_to_finish(self) -> set[str]:
        """The target directories that get their source's metadata at the end of the copy phase."""
        return (self.plan.dirs | self.plan.tree_dirs) - {""}

    def snapshot_dirs(self) -> None:
        """Stat the source directories before any file moves: a move's deletions change their mtime."""
        self.dir_stats = {}
        for d in self.dirs_to_finish():
            with contextlib.suppress(OSError):
                fd = dirs.open_dir(self.source_fd, d)
                try:
                    self.dir_stats[d] = os.fstat(fd)
                finally:
                    os.close(fd)

    def finish_dirs(self) -> None:
        """Give target directories their source's metadata, deepest first (after their files).

        Both sides are opened beneath their roots (no symlink followed) and changed through those
        descriptors, so a directory swapped for a symlink meanwhile redirects nothing.
        """
        for d in sorted(self.dirs_to_finish(), key=lambda d: -d.count("/")):
            st = self.dir_stats.get(d)
            if st is None:
                continue
            sfd = tfd = -1
            try:
                sfd = dirs.open_dir(self.source_fd, d)
                tfd = dirs.open_dir(self.target_fd, d)
            except OSError:
                for fd in (sfd, tfd):
                    if fd >= 0:
                        os.close(fd)
                continue  # a directory only gets its metadata when both sides are there
            try:
                notes = metadata.finish_dir(sfd, tfd, st)
            except OSError as e:
                notes = [f"metadata not kept: {e.strerror}"]
            finally:
                os.close(sfd)
                os.close(tfd)
            for note in notes:
                self.warn(f"{d}/: {note}")

    def prune_source_dirs(self) -> None:
        """Remove the source directories a move emptied (inside matched directories), deepest first.

        Only those whose directory is at the target (an empty directory is moved, not lost).
        """
        for d in sorted(self.plan.tree_dirs - {""}, key=lambda d: -d.count("/")):
            parent, _, name = d.rpartition("/")
            # Not empty (something was not moved), not at the target, or already gone: keep it.
            with contextlib.suppress(OSError):
                os.close(dirs.open_dir(self.target_fd, d))
                pfd = dirs.open_dir(self.source_fd, parent)
                try:
                    os.rmdir(name, dir_fd=pfd)
                finally:
                    os.close(pfd)


def _identities(sdir: int, tdir: int, name: str) -> tuple[int, int, int, int]:
    """(inode, ctime) of source ``name`` in open directory ``sdir`` and of its copy in ``tdir``,
    as a journal line of a copy keeps them (lstat relative to the descriptors: no path followed)."""
    s, d = os.lstat(name, dir_fd=sdir), os.lstat(name, dir_fd=tdir)
    return (s.st_ino, s.st_ctime_ns, d.st_ino, d.st_ctime_ns)


def _scan_child(run: _Transfer, todo: list[str], shared: tuple, w: int, parent: int) -> None:
    """Body of the forked scanning child of :meth:`_Transfer._scan_split`: never returns."""
    code = 0
    try:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # the parent decides; it relays nothing here
        run.libc.die_with_parent(parent)
        gc.disable()
        run.on_message = None  # what it would say goes back to the parent, which says it
        errors0, warnings0, files0, bytes0 = (
            len(run.errors),
            len(run.warnings),
            run.base.files,
            run.base.bytes,
        )
        work: list = []
        found: set[str] = set()
        usage = None
        removed = 0
        try:
            removed = run._scan_dirs(todo, *shared, work, found)
        except MoverUsageError as e:
            usage = str(e)
        doc = (
            usage,
            [(e.rel, action) for e, action, _ in work],
            list(found),
            run.errors[errors0:],
            run.warnings[warnings0:],
            removed,
            run.base.files - files0,
            run.base.bytes - bytes0,
        )
        _write_all(w, marshal.dumps(doc))
    except BaseException:
        code = 70
    finally:
        os._exit(code)


def _feed(task_w: int, count: int) -> None:
    """Write every batch number (4 bytes each) to the task pipe, then close it (EOF ends the workers)."""
    try:
        for start in range(0, count, 1024):
            data = b"".join(i.to_bytes(4, "little") for i in range(start, min(count, start + 1024)))
            _write_all(task_w, data)
    except OSError:
        pass  # the workers stopped early and closed their ends
    finally:
        os.close(task_w)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _worker_main(run: _Transfer, slot: int, task_r: int, res_w: int, parent: int) -> None:
    """Body of a forked worker process: never returns into the caller's stack."""
    code = 0
    try:
        # The parent decides when to stop (it receives SIGTERM/SIGINT, or the job's whole process
        # group does): workers ignore those signals and poll the shared stop flag instead.
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        run.libc.die_with_parent(parent)
        gc.disable()
        _Worker(run, slot, res_w).serve(task_r)
    except BaseException as e:  # a bug: report it, the parent turns it into a per-run error
        code = 70
        with contextlib.suppress(BaseException):
            os.write(res_w, f"Rinternal error in worker {slot}: {e!r}"[:_MSG_MAX].encode() + b"\n")
    finally:
        os._exit(code)


class _Worker:
    """One worker process: copies batches, journals them, and (move) deletes verified sources."""

    def __init__(self, run: _Transfer, slot: int, res_w: int):
        self.run = run
        self.move = run.move
        self.fsync = run.fsync
        # A move starts the write-back of each chunk of a large file as soon as it is copied, so
        # that the disk works during the copy rather than in the syncfs after it (1 GiB moved in
        # 8 files: 1.16 s -> 0.70 s, the time of cp -a + sync). Small files are left to syncfs,
        # which writes them back in larger, merged requests.
        self.writeback = run.libc.start_writeback if run.move else None
        self.a = run.shared
        self.files_i = 1 + _SLOTS * slot
        self.res_w = res_w
        self.buf = filecopy.new_buffer()
        self.token = f"{run.run_id}-{slot:02x}"  # this run's id: only this run removes its temporaries
        self.seq = 0
        # Its own open file description of the target, opened before its first copy: its syncfs
        # then reports every write-back error since (another description's check hides none).
        self.sync_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=run.target_fd)
        self.sync_error: OSError | None = None  # once syncfs failed, this worker deletes nothing
        self.cur_dir: str | None = None
        self.sdir = self.tdir = -1
        self.dir_error: OSError | None = None
        self.tinfo: metadata.DirInfo | None = None  # what the current target directory gives new files
        self.notes: list[str] = []  # metadata the element in hand could not keep at the target
        self.records: list[tuple[str, int, int, str]] = []
        # (dir rel, name, identity the source must still have, (st_dev, st_ino) of its copy, size,
        # the (dir rel, name) of its other hard links)
        self.to_delete: list[tuple[str, str, tuple, tuple[int, int], int, tuple]] = []
        self.delete_bytes = 0  # bytes of the sources in to_delete
        self.deletions: queue.Queue = queue.Queue()  # lists handed to the deleter thread; None ends it
        self.deleter: threading.Thread | None = None
        self.keep_lock = threading.Lock()  # the deleter threads share the kept counters

    def stopping(self) -> bool:
        return bool(self.a[_STOP])

    def add_bytes(self, n: int) -> None:
        self.a[self.files_i + 1] += n

    def say(self, kind: str, text: str) -> None:
        """Send one message to the parent. Kinds: E an element failed (one counted done whose
        source is kept is taken off the done counters by ``keep``), F an element failed on a full
        target, W a warning, R an error of the run, Q the target full outside any element."""
        line = kind + text.replace("\n", " ")[:_MSG_MAX] + "\n"
        os.write(self.res_w, line.encode("utf-8", "surrogateescape"))

    def serve(self, task_r: int) -> None:
        batches = self.run.batch_list
        try:
            while not self.a[_STOP]:
                b = os.read(task_r, 4)
                if len(b) < 4:
                    break
                for entry, action, recorded in batches[int.from_bytes(b, "little")]:
                    if self.a[_STOP]:
                        break
                    self.one(entry, action, recorded)
                self.flush_journal()
        finally:
            self.enter_dir(None)
            self.flush_journal()
        self.delete_sources()  # what was verified is deleted, even when the run is being cancelled

    def enter_dir(self, d: str | None) -> None:
        """Hold open descriptors of source and target directory ``d`` (None: close them)."""
        for fd in (self.sdir, self.tdir):
            if fd >= 0:
                os.close(fd)
        self.sdir = self.tdir = -1
        self.cur_dir, self.dir_error, self.tinfo = d, None, None
        if d is None:
            return
        try:
            # Beneath the roots, no symlink followed: a directory swapped for one is an error.
            self.sdir = dirs.open_dir(self.run.source_fd, d)
            self.tdir = dirs.make_dirs(self.run.target_fd, d)
            s, t = os.fstat(self.sdir), os.fstat(self.tdir)
            if (s.st_dev, s.st_ino) == (t.st_dev, t.st_ino):
                self.dir_error = OSError(errno.EEXIST, SAME_DIR)
            else:
                self.tinfo = metadata.dir_info(self.tdir)
        except OSError as e:
            self.dir_error = e

    def fail(self, rel: str, text: str) -> None:
        """Report that element ``rel`` failed (one counted done and then kept is undone by ``keep``)."""
        self.say("E", f"{rel}: {text}")

    def one(self, e: Entry, action: str, recorded: str | None) -> None:
        self.notes.clear()  # what an element that failed could not keep is not said: it failed
        a, i = self.a, self.files_i
        rel = e.rel
        d, _, name = rel.rpartition("/")
        before = a[i + 1]
        try:
            if d != self.cur_dir:
                self.enter_dir(d)
            if action == "done":  # counted done by the scan: kept now means failed instead
                if self.dir_error is not None:
                    self.keep(rel, e.size, f"cannot delete it: {self.dir_error.strerror}")
                else:
                    self.queue_delete(d, name, e.identity(), e.size)
                return
            if self.dir_error is not None:
                raise self.dir_error
            if action != "copy":
                if self.verified_in_place(e):
                    a[i + 1] += e.size
                    a[i + 2] += e.size
                    a[i] += 1
                    return
                if not self.run.replace:
                    self.fail(rel, f"a different file is already at the target; {CONFLICT_HINT}")
                    return
            if e.kind == "link":
                tmp = self.tmp_name(name)
                filecopy.copy_symlink(
                    name,
                    tmp,
                    e.link,
                    e.mtime_ns,
                    not self.run.replace,
                    self.tdir,
                    src_dir_fd=self.sdir,
                    notes=self.notes,
                )
                self.records.append((rel, 0, e.mtime_ns, "link"))
                self.queue_delete(d, name, e.identity(), 0)
            else:
                st, digest = filecopy.copy_file(
                    self.sdir,
                    self.tdir,
                    name,
                    self.tmp_name(name),
                    (e.size, e.mtime_ns, e.mode),
                    self.buf,
                    self.add_bytes,
                    self.stopping,
                    self.fsync,
                    self.writeback if e.size >= filecopy.BUF_SIZE else None,
                    not self.run.replace,
                    self.tinfo,
                    self.notes,
                )
                # What was copied: the source as fstat saw it once read (a rewrite since changes ctime).
                identity = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink)
                linked = self.link_others(name, st, recorded) if recorded else ()
                # What a rerun's quick check compares: both sides' inode and ctime, the copy's
                # taken after the other names were linked (each link sets its ctime).
                tst = os.stat(name, dir_fd=self.tdir, follow_symlinks=False)
                ids = (st.st_ino, st.st_ctime_ns, tst.st_ino, tst.st_ctime_ns)
                self.records.append((rel, st.st_size, st.st_mtime_ns, digest.hex(), *ids))
                for od, oname in linked:  # the same two inodes
                    self.records.append((_join(od, oname), st.st_size, st.st_mtime_ns, digest.hex(), *ids))
                self.queue_delete(d, name, identity, st.st_size, linked, tst)
            a[i] += 1
            if self.notes:
                for note in self.notes:
                    self.say("W", f"{rel}: {note}")
                self.notes.clear()
        except filecopy.CopyAborted:
            a[i + 1] = before
        except OSError as err:
            a[i + 1] = before
            if err.errno in filecopy.FULL_ERRNOS:
                a[_STOP] = 1
                self.say("F", f"target full ({err.strerror}) while writing {rel}; stopped")
            else:
                self.fail(rel, err.strerror or str(err))
                self.fail_links(rel, action, recorded, err.strerror or str(err))
        except filecopy.CopyFailed as err:
            a[i + 1] = before
            self.fail(rel, str(err))
            self.fail_links(rel, action, recorded, str(err))

    def fail_links(self, rel: str, action: str, others, why: str) -> None:
        """The other names of a hard-linked file whose copy failed fail too, each said."""
        if action == "copy" and others:
            for o in others:
                self.fail(o.rel, f"not transferred: a hard link of {rel}, whose copy failed ({why})")

    def tmp_name(self, name: str) -> str:
        self.seq += 1
        return filecopy.temp_name(name, f"{self.token}{self.seq:x}")

    def verified_in_place(self, e: Entry) -> bool:
        """Return whether the target already holds the source (both hashed); queue the source if moving."""
        d, _, name = e.rel.rpartition("/")
        buf, stopping = self.buf, self.stopping
        # Identities taken before hashing: a change during the hash gives a new ctime, which the
        # next run's quick check then does not trust.
        ids = _identities(self.sdir, self.tdir, name)
        theirs = filecopy.hash_file(name, buf, stopping, self.sdir)
        ok = theirs == filecopy.hash_file(name, buf, stopping, self.tdir)
        if ok:
            # The same bytes, but maybe not the same metadata (another tool's copy, a source
            # chmod-ed since): the copy gets the source's, as a fresh copy would.
            changed = _identities(self.sdir, self.tdir, name) != ids
            for note in metadata.refresh(self.sdir, self.tdir, name):
                self.say("W", f"{e.rel}: {note}")
            if not changed:  # neither side changed while hashed: record them as they are now
                now = _identities(self.sdir, self.tdir, name)
                self.records.append((e.rel, e.size, e.mtime_ns, theirs[1].hex(), *now))
        if ok:
            self.queue_delete(d, name, e.identity(), e.size)
        return ok

    def link_others(self, name: str, st: os.stat_result, others: list[Entry]) -> tuple:
        """Link the other names of a hard-linked source to its copy ``name`` (in this worker's target dir).

        Return the (dir, name) of the source links whose target link is in place.
        """
        a, i = self.a, self.files_i
        made = os.stat(name, dir_fd=self.tdir, follow_symlinks=False)
        done = []
        for o in others:
            od, _, oname = o.rel.rpartition("/")
            try:
                tfd = dirs.make_dirs(self.run.target_fd, od)
                try:
                    tmp = self.tmp_name(oname)
                    os.link(name, tmp, src_dir_fd=self.tdir, dst_dir_fd=tfd, follow_symlinks=False)
                    try:
                        got = os.stat(tmp, dir_fd=tfd, follow_symlinks=False)
                        if (got.st_dev, got.st_ino) != (made.st_dev, made.st_ino):
                            raise filecopy.CopyFailed(
                                "its first name's copy was replaced meanwhile; not linked"
                            )
                        if self.run.replace:
                            os.rename(tmp, oname, src_dir_fd=tfd, dst_dir_fd=tfd)
                        else:
                            filecopy.rename_noreplace(tmp, oname, tfd)
                    except BaseException:
                        with contextlib.suppress(OSError):
                            os.unlink(tmp, dir_fd=tfd)
                        raise
                finally:
                    os.close(tfd)
            except FileExistsError:
                self.fail(o.rel, filecopy.APPEARED)
                continue
            except (OSError, filecopy.CopyFailed) as err:
                self.fail(o.rel, f"cannot link it to {name}'s copy: {getattr(err, 'strerror', None) or err}")
                continue
            self.add_bytes(o.size)
            a[i] += 1
            done.append((od, oname))
        return tuple(done)

    def queue_delete(
        self,
        d: str,
        name: str,
        identity: tuple,
        size: int,
        links: tuple = (),
        copy: os.stat_result | None = None,
    ) -> None:
        """Queue a verified source for deletion; hand the queue to the deleter once it holds enough bytes.

        ``identity`` is (inode, size, mtime, ctime, links) the source must still have when it is deleted;
        ``links`` are the (dir, name) of its other hard links, deleted with it (after one check of
        all: deleting one link changes the inode's ctime). ``copy``: the copy's stat, if taken already.
        """
        if self.move:
            t = copy or os.stat(name, dir_fd=self.tdir, follow_symlinks=False)
            self.to_delete.append((d, name, identity, (t.st_dev, t.st_ino), size, links))
            self.delete_bytes += size
            if self.delete_bytes >= _DELETE_EARLY_BYTES:
                self.hand_off_deletions()

    def hand_off_deletions(self) -> None:
        """Pass the queued sources to this worker's deleter thread, started on first use."""
        todo, self.to_delete, self.delete_bytes = self.to_delete, [], 0
        if self.deleter is None:
            self.deleter = threading.Thread(target=self._deleter_main, daemon=True)
            self.deleter.start()
        self.deletions.put(todo)

    def _deleter_main(self) -> None:
        """Delete what was handed off, merging what piled up meanwhile, until a None arrives."""
        try:
            last = False
            while not last:
                todo: list = []
                item = self.deletions.get()
                while item is not None:
                    todo += item
                    try:
                        item = self.deletions.get_nowait()
                    except queue.Empty:
                        break
                last = item is None
                if todo:
                    self.delete_now(todo)
        except BaseException as e:  # a bug: what was not deleted stays at the source, and it is said
            self.say("R", f"internal error while deleting sources: {e!r}")

    def flush_journal(self) -> None:
        if self.records:
            records, self.records = self.records, []
            try:
                self.run.journal.append(records)
            except OSError as e:
                if e.errno in filecopy.FULL_ERRNOS:
                    self.a[_STOP] = 1
                    self.say("Q", f"target full ({e.strerror}) while writing the journal; stopped")

    def delete_sources(self) -> None:
        """Delete every source still queued, and wait until the deleter thread (if any) is done.

        Called once, when the worker has no more work (also when the run is being cancelled).
        """
        if self.deleter is None:
            todo, self.to_delete = self.to_delete, []
            if todo:
                self.delete_now(todo)
            return
        if self.to_delete:
            self.hand_off_deletions()
        self.deletions.put(None)
        self.deleter.join()

    def delete_now(self, todo: list) -> None:
        """Sync the target filesystem, then unlink the sources of ``todo`` that did not change since.

        Every queued copy was renamed into place before it was queued, so after ``syncfs`` it is on
        stable storage. Sources wait in the queue until they hold ``_DELETE_EARLY_BYTES`` (large
        files: deleting them while the next ones are copied hides the cost of freeing their pages
        and blocks, and hands the copy recycled memory) or until the worker has no more work (many
        small files: deleting them at the end keeps deletions from slowing the creation of the
        copies, as ext4 skips recently freed inodes when it allocates new ones). The unlinks are
        spread over a few threads: an unlink can wait on the disk (ext4 mounted with ``discard``
        issues a synchronous discard per freed extent), and such waits overlap.
        """
        if self.sync_error is None:
            try:
                self.run.libc.sync_fs(self.sync_fd)  # every queued copy is now on stable storage
            except OSError as e:
                self.sync_error = e
                self.a[_STOP] = 1  # a target that loses writes: stop, keep every source not yet deleted
        if self.sync_error is not None:
            reason = self.sync_error.strerror or str(self.sync_error)
            for d, name, _identity, _copy, size, links in todo:
                for ld, lname in ((d, name), *links):
                    self.keep(_join(ld, lname), size, f"the target could not be synced ({reason})")
            return
        step = max(-(-len(todo) // _UNLINK_THREADS), _UNLINK_MIN)
        parts = [todo[k : k + step] for k in range(0, len(todo), step)]
        helpers = [threading.Thread(target=self._unlink_all, args=(part,)) for part in parts[1:]]
        for t in helpers:
            t.start()
        self._unlink_all(parts[0])
        for t in helpers:
            t.join()

    def keep(self, rel: str, size: int, why: str) -> None:
        """Report a copied source that is kept; it no longer counts as done (deleter threads only)."""
        with self.keep_lock:
            self.a[self.files_i + 3] += 1
            self.a[self.files_i + 4] += size
        self.fail(rel, f"kept at the source: {why}")

    def _unlink_all(self, todo: list) -> None:
        """Unlink the sources of ``todo`` that are still what was copied, and not their own copy."""
        cur, dfd, dir_error = None, -1, None
        try:
            for d, name, identity, copy, size, links in todo:
                if d != cur:
                    if dfd >= 0:
                        os.close(dfd)
                    cur, dfd, dir_error = d, -1, None
                    try:
                        dfd = dirs.open_dir(self.run.source_fd, d)
                    except OSError as e:
                        dir_error = e
                rel = f"{d}/{name}" if d else name
                if dir_error is not None:
                    if not isinstance(dir_error, FileNotFoundError):
                        self.keep(rel, size, f"cannot delete it: {dir_error.strerror}")
                    continue
                if links:
                    self._unlink_links(((d, name), *links), identity, copy, size)
                    continue
                try:
                    why = self._unchanged(os.lstat(name, dir_fd=dfd), identity, copy)
                    if why is not None:
                        self.keep(rel, size, why)
                        continue
                    os.unlink(name, dir_fd=dfd)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    self.keep(rel, size, f"cannot delete it: {e.strerror}")
        finally:
            if dfd >= 0:
                os.close(dfd)

    @staticmethod
    def _unchanged(st: os.stat_result, identity: tuple, copy: tuple[int, int]) -> str | None:
        """Why source ``st`` must be kept (changed since copied, or its own copy), or None."""
        kind_size = st.st_size if stat.S_ISREG(st.st_mode) else -1
        if (st.st_ino, kind_size, st.st_mtime_ns) != identity[:3]:
            return "changed after being copied"
        # A new ctime is a change, except where a hard link of it was deleted since (a rerun
        # deletes the links of an inode one by one, and each unlink sets the ctime).
        if st.st_ctime_ns != identity[3] and not st.st_nlink < identity[4]:
            return "changed after being copied"
        if (st.st_dev, st.st_ino) == copy:
            return SAME_FILE
        return None

    def _unlink_links(self, links: tuple, identity: tuple, copy: tuple[int, int], size: int) -> None:
        """Delete the hard links of one source, all checked first: all, or none if one changed."""
        fds: list[tuple[str, str, int]] = []
        try:
            why = None
            for d, name in links:
                try:
                    fd = dirs.open_dir(self.run.source_fd, d)
                    fds.append((d, name, fd))
                    why = why or self._unchanged(os.lstat(name, dir_fd=fd), identity, copy)
                except OSError as e:
                    why = why or f"cannot delete it: {e.strerror}"
            if why is not None:
                for d, name in links:
                    self.keep(_join(d, name), size, why)
                return
            for d, name, fd in fds:
                try:
                    os.unlink(name, dir_fd=fd)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    self.keep(_join(d, name), size, f"cannot delete it: {e.strerror}")
        finally:
            for _, _, fd in fds:
                os.close(fd)


def transfer(
    operation: str,
    source: str | os.PathLike,
    target: str | os.PathLike,
    patterns: list[str],
    workers: int | None = None,
    progress_path: str | os.PathLike | None = None,
    strict: bool = False,
    *,
    fsync: bool = False,
    replace: bool = False,
    verify: bool = False,
    cancel: threading.Event | None = None,
    on_message: Callable[[str, str], None] | None = None,
    on_progress: Callable[[Snapshot, ProgressReporter], None] | None = None,
) -> TransferResult:
    """Copy or move what ``patterns`` select under ``source`` to ``target``; return what happened.

    A file already at the target that differs from its source (not one this transfer wrote, as
    its journal or a hash shows) is a per-file error, its source kept, unless ``replace``.
    With ``verify``, every element already at the target is hashed on both sides, whatever the
    record of an earlier run says.
    """
    # The plan and the scan allocate an object or two per file and free nothing cyclic: the
    # collector's passes over them were ~15 % of a no-op rerun of 20,000 files. Off meanwhile.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _transfer(
            operation, source, target, patterns, workers, progress_path, strict,
            fsync=fsync, replace=replace, verify=verify, cancel=cancel, on_message=on_message,
            on_progress=on_progress,
        )  # fmt: skip
    finally:
        if collecting:
            gc.enable()


def _transfer(
    operation, source, target, patterns, workers, progress_path, strict, *, fsync, replace, verify, cancel,
    on_message, on_progress,
) -> TransferResult:  # fmt: skip
    t0 = time.monotonic()
    reporter = ProgressReporter(os.fspath(progress_path) if progress_path is not None else None)
    cancel = cancel or threading.Event()
    try:
        if operation not in OPERATIONS:
            raise MoverUsageError(f"operation must be copy or move, not {operation!r}")
        if workers is not None and workers < 1:
            raise MoverUsageError("--workers must be at least 1")
        if not patterns:
            raise MoverUsageError("at least one pattern is required")
        for p in patterns:
            split_pattern(p)
        src = os.path.realpath(os.fspath(source))
        if not os.path.isdir(src):
            raise SourceMissing(f"source directory {os.fspath(source)} does not exist")
        dst = os.path.realpath(os.fspath(target))
        if os.path.exists(dst) and not os.path.isdir(dst):
            raise MoverUsageError(f"target {os.fspath(target)} exists and is not a directory")
        # A copy into its own source overwrites it, a move deletes what it "copied" onto itself.
        why = dirs.overlap(src, dst)
        if why is not None:
            raise MoverUsageError(f"{why}: refused, nothing was done")
    except MoverError as e:
        _write_failed(reporter, operation, str(e))
        raise
    run = _Transfer(
        operation,
        src,
        dst,
        workers or default_workers(),
        reporter,
        cancel,
        fsync,
        on_message,
        on_progress,
        replace,
    )
    run.verify = verify
    try:
        run.source_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        _write_failed(reporter, operation, f"cannot open the source: {e.strerror}")
        raise SourceMissing(f"cannot open the source directory {src}: {e.strerror}") from e
    try:
        _make_plan(run, patterns, strict, cancel)
        try:
            os.makedirs(dst, exist_ok=True)
            lock, waited = _lock_target(run, dst, cancel)
        except OSError as e:
            code = EXIT_TARGET_FULL if e.errno in filecopy.FULL_ERRNOS else EXIT_FILES_FAILED
            run.run_error(f"cannot prepare target {dst}: {e.strerror}")
            run.tick("failed", force=True)
            return _result(run, "failed", code, t0)
        try:
            if lock < 0:  # cancelled while another mover held the target: nothing was touched
                run.tick("cancelled", force=True)
                return _result(run, "cancelled", None, t0)
            run.target_fd = lock
            why = dirs.overlap_open(run.source_fd, lock)
            if why is not None:  # a root swapped since its path was judged
                msg = f"{why}: refused, nothing was done"
                _write_failed(reporter, operation, msg)
                raise MoverUsageError(msg)
            if waited and not cancel.is_set():
                # The other mover may have moved or changed what this plan holds: plan again.
                _make_plan(run, patterns, strict, cancel)
            return _transfer_locked(run, t0, cancel)
        finally:
            if lock >= 0:
                os.close(lock)
    finally:
        os.close(run.source_fd)


def _make_plan(run: _Transfer, patterns: list[str], strict: bool, cancel: threading.Event) -> None:
    """Resolve the patterns into ``run.plan``, reporting what matched nothing (and, ``strict``, failing)."""
    src, dst, operation, reporter = run.source, run.target, run.operation, run.reporter
    run.errors = []
    run.run_errors = 0
    try:
        skip = None
        if os.path.isdir(dst):
            tst = os.stat(dst)
            skip = (tst.st_dev, tst.st_ino)
        run.plan = resolve(src, patterns, skip, cancel.is_set, run.source_fd)
    except MoverError as e:
        _write_failed(reporter, operation, str(e))
        raise
    except OSError as e:
        _write_failed(reporter, operation, f"cannot read the source: {e.strerror}")
        raise MoverError(f"cannot read the source {src}: {e.strerror}") from e
    for note in run.plan.notes:
        run.warn(note)
    for pattern in run.plan.unmatched:
        run.warn(f"pattern {pattern!r} matched nothing under {src}")
    if strict and run.plan.unmatched:
        msg = f"--strict: {len(run.plan.unmatched)} pattern(s) matched nothing; nothing was done"
        _write_failed(reporter, operation, msg)
        raise NothingMatched(msg)
    run.errors.extend(run.plan.errors)
    run.bytes_total = sum(e.size for e in run.plan.entries)


def _lock_target(run: _Transfer, dst: str, cancel: threading.Event) -> tuple[int, bool]:
    """Take an exclusive lock on the target directory, held for the whole run: (fd or -1, waited).

    Two movers into one target (overlapping runs of one step) serialise here, so under the lock a
    temporary file in the target can only be left by a mover that is gone (its lock died with it,
    kill -9 included): the scan removes those, never a live mover's. A cancel while waiting ends
    the wait (-1).
    """
    fd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    waited = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            run.locked = True
            return fd, waited
        except BlockingIOError:
            if not waited:
                run.warn(f"waiting for another mover writing into {dst} to finish")
            waited = True
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                os.close(fd)
                raise
            # A filesystem without flock (some network ones): still move, unserialised, as before.
            run.warn(f"cannot lock the target {dst} ({e.strerror}): another mover into it could clash")
            return fd, False
        except BaseException:
            os.close(fd)
            raise
        if cancel.wait(0.2):
            os.close(fd)
            return -1, waited


def _transfer_locked(run: _Transfer, t0: float, cancel: threading.Event) -> TransferResult:
    """The transfer proper, once the target is locked."""
    # The journal and the run records live in TARGET/.iosea-mover, opened beneath the target's
    # descriptor without following a symlink: one that is a symlink fails the run, said.
    run.journal.bind(run.target_fd)
    try:
        return _transfer_journalled(run, t0, cancel)
    finally:
        run.journal.release()


def _transfer_journalled(run: _Transfer, t0: float, cancel: threading.Event) -> TransferResult:
    dst, reporter = run.target, run.reporter
    try:
        journal = run.journal.load()
        run.journal.open()
        run.runs.dir_fd = run.journal.dir_fd
        run.runs.record()
    except OSError as e:
        code = EXIT_TARGET_FULL if e.errno in filecopy.FULL_ERRNOS else EXIT_FILES_FAILED
        run.run_error(f"cannot prepare target {dst}: {_reason(e)}")
        run.tick("failed", force=True)
        return _result(run, "failed", code, t0)
    if not cancel.is_set():
        run.snapshot_dirs()
        try:
            work = run.scan_target(journal)
        except MoverError as e:
            run.runs.forget(None)
            run.journal.remove()
            _write_failed(reporter, run.operation, str(e))
            raise
        run.make_target_dirs()
        run.tick(force=True)
        run.run_workers(run.batches(work))
    cancelled = cancel.is_set()
    if not cancelled:
        run.finish_dirs()
    if run.move:
        run.prune_source_dirs()
    if not run.worker_died:  # every temporary of this run was renamed into place or removed
        run.runs.forget(None)
    if run.notes_unsaid:
        run.warn(f"and {run.notes_unsaid} more metadata warning(s) like those above, not listed one by one")
    if cancelled:
        state, code = "cancelled", None
        run.journal.close()
    else:
        if run.full:
            state, code = "failed", EXIT_TARGET_FULL
        elif run.errors:
            state, code = "failed", EXIT_FILES_FAILED
        else:
            state, code = "completed", EXIT_OK
        if run.move:
            run.journal.remove()
        else:
            run.journal.keep_as_record()  # what the quick check of a rerun reads
    run.tick(state, force=True)
    if reporter.write_error:
        run.warn(reporter.write_error)
    return _result(run, state, code, t0)


def _reason(e: OSError) -> str:
    """An OSError as said to the user: the name it is about (when it has one) and its reason."""
    return f"{e.filename}: {e.strerror}" if e.filename and e.strerror else e.strerror or str(e)


def _result(run: _Transfer, state: str, code: int | None, t0: float) -> TransferResult:
    snap = run.snapshot(state)
    return TransferResult(
        operation=run.operation,
        state=state,
        exit_code=EXIT_SIGTERM if code is None else code,  # cancelled: the CLI sets 130 for SIGINT
        files_total=snap.files_total,
        files_done=snap.files_done,
        files_failed=snap.files_failed,
        files_left=snap.files_left,
        bytes_total=snap.bytes_total,
        bytes_done=snap.bytes_done,
        bytes_copied=snap.bytes_done - run.base.bytes - run.verified_bytes(),
        bytes_verified=run.verified_bytes(),
        errors=list(run.errors),
        warnings=list(run.warnings),
        elapsed_s=time.monotonic() - t0,
    )


def _write_failed(reporter: ProgressReporter, operation: str, message: str) -> None:
    snap = Snapshot(operation, "failed", 0, 0, 0, 0, 0, [message], files_left=0)
    reporter.update(snap, force=True)
