"""The data-mover engine: copy or move what glob patterns select from a source to a target directory.

``transfer(operation, source, target, patterns, ...)`` is the Python API; the ``iosea-wf-mover``
console script (:mod:`iosea_wf.mover.cli`) is a thin layer over it.

Integrity argument
------------------
* Each file is written to ``.<name>.iosea-tmp-<hex>`` in its target directory and renamed over its
  final name only when complete, so a reader (or a crash) never sees a partial file under a final
  name: rename(2) within one directory is atomic.
* Small files (< 64 KiB) are read once; the bytes are hashed (xxh3-128) from the very buffer handed
  to write(2), so the digest describes exactly what was written: one read of size+1 bytes (a short
  or long read means the file changed) and one write whose count must be the whole file. Large
  files are copied by the kernel (copy_file_range, else sendfile; through the buffer only where
  neither works) in 8 MiB chunks, and each chunk is then hashed on both sides, source and temp
  file, through read-only mappings of the page cache; the two digests must agree, the total must
  be the planned size and the temp file must have that length. The rename happens only if, after
  the copy, the source's size and mtime (fstat of the open descriptor) are still those of the
  plan. ``--fsync`` adds an fsync of each temp file.
* What this does and does not check: it catches short or failed writes, truncation, a source that
  changes during the copy (a large one even when rewritten in place with its size and mtime
  kept), and (through the recorded digest) a target that differs on a later verification
  (resume, move). It does not prove the media holds the bytes: right after the copy both sides
  are read from the page cache. That would need a read after the cache is dropped; a move relies
  instead on syncfs before deleting (below), and a rerun re-hashes the target against the
  journal before deleting a source it did not copy itself.
* ``move`` deletes a source only after its copy was verified and renamed into place, and only after
  it checked (lstat) that the source still has the size and mtime it had when copied. A worker
  deletes its verified sources in batches, each after a ``syncfs`` of the target filesystem that
  began after every copy of the batch was renamed into place, so a moved file's data is on stable
  storage before its source is gone: a kill -9 *or a node crash* at any moment leaves each file
  complete at the source, at the target, or both. A batch is deleted by a thread of the worker
  as soon as it holds 64 MiB, while the worker copies on, or else when the worker has no more
  work (also when the run is cancelled). (The chunks of large files are handed to the disk as
  they are copied, so that syncfs mostly waits for writes already under way.)
* Worker processes (forked, so they share the plan) ask the kernel to SIGKILL them when the parent
  dies (PR_SET_PDEATHSIG, plus a getppid() check for a parent that died before that took effect),
  so a kill -9 of the mover stops its workers too; each of their steps above is atomic or leaves
  only a temp file. They ignore SIGTERM/SIGINT: the parent relays a cancellation through a shared
  stop flag that they poll per file and per chunk, so a cancelled run removes its in-flight temp
  files, deletes (move) only what was verified, and exits 143/130. A source is mapped only
  under a read lease, so another process cannot cut it under the mapping (which would kill the
  worker with SIGBUS): it waits for the lease, one chunk at most (see ``filecopy._Lease``). A
  worker that dies anyway (a bug) is reported by the parent, and the run fails; its temp file is
  removed by the rerun, and nothing was deleted that was not verified.
* Resuming: stale temp files in the target directories are removed first. An element already at the
  target with the source's size and mtime is verified rather than copied again: when the journal
  (:mod:`iosea_wf.mover.journal`, one append per batch of files by each worker) recorded it, for
  ``copy`` the journal line is trusted and for ``move`` the target is re-hashed against the recorded
  digest before the source is deleted; without a journal line both sides are hashed and compared.
  An element whose target holds anything else (a different file, as its size or hash shows, a
  directory, another symlink) is an error for that element: the target is left as it was and the
  source kept, unless ``replace`` (``--replace``) is given, which copies over it. A target absent
  at the scan is renamed into with RENAME_NOREPLACE, so a file another writer puts there during
  the copy is not replaced either (one renameat2 instead of rename: no extra call).
* When a run ends (completed or failed) its journal is removed; a cancelled or killed run keeps it
  for the rerun. Source directories a ``move`` emptied are removed when they were part of a matched
  directory; target directories get their source mode and mtime at the end of the copy phase.

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
import gc
import mmap
import os
import queue
import select
import signal
import stat
import threading
import time
from collections.abc import Callable

from iosea_wf.mover import filecopy
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
from iosea_wf.mover.progress import MIN_INTERVAL_S, ProgressReporter, Snapshot

OPERATIONS = ("copy", "move")
_BATCH_FILES = 256
_BATCH_BYTES = 16 << 20
_UNLINK_THREADS = 4  # per worker: unlinks that wait on the disk overlap (measured: 4 workers x 4 best)
_UNLINK_MIN = 64  # fewer sources than this per thread are not worth a thread
_DELETE_EARLY_BYTES = 64 << 20  # a worker deletes verified sources during its copies past this
_PR_SET_PDEATHSIG = 1
_SYNC_FILE_RANGE_WRITE = 2
_STOP = 0  # slot of the shared stop flag; then (files, bytes, verified bytes) per worker
_SLOTS = 3
_MSG_MAX = 3000  # one message per pipe write, well under PIPE_BUF (4096): never interleaved
CONFLICT_HINT = "kept at the source, target left as it was (--replace overwrites it)"


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
        self.bytes_total: int = counts.get("bytes_total", 0)
        self.bytes_done: int = counts.get("bytes_done", 0)
        self.bytes_copied: int = counts.get("bytes_copied", 0)
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
        """Flush the filesystem holding ``fd`` to stable storage (syncfs, or sync where missing)."""
        if self.syncfs is None or self.syncfs(fd) != 0:
            os.sync()

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
        self.journal = Journal(target, source)
        self.libc: _Libc | None = None
        self.target_fd = -1

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        if self.on_message:
            self.on_message("warning", text)

    # -- planning ------------------------------------------------------------------------------
    def scan_target(self, journal: dict) -> list[tuple[Entry, str, str | None]]:
        """Remove stale temp files and decide, per entry, 'copy', 'verify', 'check' or 'done'."""
        by_rel = {e.rel: e for e in self.plan.entries}
        existing: dict[str, os.stat_result] = {}
        removed = 0
        for d in self.plan.dirs:
            try:
                with os.scandir(_join(self.target, d)) as it:
                    for de in it:
                        if TEMP_RE.match(de.name):
                            try:
                                os.unlink(de.path)
                                removed += 1
                            except OSError:
                                pass
                            continue
                        rel = f"{d}/{de.name}" if d else de.name
                        if rel in by_rel:
                            existing[rel] = de.stat(follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as e:
                self.warn(f"cannot list target directory {_join(self.target, d)}: {e.strerror}")
        if removed:
            self.warn(f"removed {removed} temporary file(s) left by an interrupted run")
        work = []
        for e in self.plan.entries:
            st = existing.get(e.rel)
            if st is None:
                work.append((e, "copy", None))
            elif e.kind == "link":
                dst = _join(self.target, e.rel)
                if stat.S_ISLNK(st.st_mode) and os.readlink(dst) == e.link:
                    self._already_done(e, work)
                else:
                    self._occupied(e, work, "something else")
            elif stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == (e.size, e.mtime_ns):
                rec = journal.get(e.rel)
                if rec is not None and rec[:2] == (e.size, e.mtime_ns):
                    if self.move:
                        work.append((e, "check", rec[2]))
                    else:
                        self._already_done(e, work)
                else:
                    work.append((e, "verify", None))
            elif stat.S_ISREG(st.st_mode) and st.st_size == e.size and not self.replace:
                # Same size, another mtime: the same bytes are fine (hashed), others a conflict.
                work.append((e, "verify", None))
            else:
                kind = "a different file" if stat.S_ISREG(st.st_mode) else "something else"
                self._occupied(e, work, kind)
        return work

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
            files += sum(a[1::_SLOTS])
            done_bytes += sum(a[2::_SLOTS])
        return Snapshot(
            operation=self.operation,
            state=state,
            files_total=len(self.plan.entries),
            files_done=files,
            files_failed=len(self.errors),
            bytes_total=self.bytes_total,
            bytes_done=done_bytes,
            errors=list(self.errors),
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

    def _message(self, line: bytes) -> None:
        kind, text = line[:1], line[1:].decode("utf-8", "surrogateescape")
        if kind == b"F":
            self.full = True
        self.errors.append(text)

    def run_workers(self, batches: list) -> None:
        """Fork the worker processes, feed them batch numbers, report progress until they are done."""
        n = min(self.workers, len(batches))
        if n == 0:
            return
        self.batch_list = batches
        self.libc = _Libc()
        self.target_fd = os.open(self.target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
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
                ready, _, _ = select.select([res_r], [], [], MIN_INTERVAL_S)
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
                    self.errors.append(f"a worker process died ({what}); rerun to finish the transfer")
            feeder.join()
            os.close(self.target_fd)

    def finish_dirs(self) -> None:
        """Give target directories their source mode and mtime, deepest first (after their files)."""
        for d in sorted(self.plan.dirs - {""}, key=lambda d: -d.count("/")):
            try:
                st = os.lstat(_join(self.source, d))
                path = _join(self.target, d)
                os.chmod(path, stat.S_IMODE(st.st_mode))
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
            except OSError:
                pass  # a directory only gets its metadata when both sides are there

    def prune_source_dirs(self) -> None:
        """Remove the source directories a move emptied (inside matched directories), deepest first."""
        for d in sorted(self.plan.tree_dirs - {""}, key=lambda d: -d.count("/")):
            # Not empty (something was not moved) or already gone: keep it.
            with contextlib.suppress(OSError):
                os.rmdir(_join(self.source, d))


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
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        run.libc.die_with_parent(parent)
        gc.disable()
        _Worker(run, slot, res_w).serve(task_r)
    except BaseException as e:  # a bug: report it, the parent turns it into a per-run error
        code = 70
        with contextlib.suppress(BaseException):
            os.write(res_w, f"Einternal error in worker {slot}: {e!r}"[:_MSG_MAX].encode() + b"\n")
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
        self.token = os.urandom(4).hex()  # drawn after fork: distinct per worker
        self.seq = 0
        self.cur_dir: str | None = None
        self.sdir = self.tdir = -1
        self.dir_error: OSError | None = None
        self.records: list[tuple[str, int, int, str]] = []
        self.to_delete: list[tuple[str, str, int | None, int]] = []  # (dir rel, name, size, mtime_ns)
        self.delete_bytes = 0  # bytes of the sources in to_delete
        self.deletions: queue.Queue = queue.Queue()  # lists handed to the deleter thread; None ends it
        self.deleter: threading.Thread | None = None

    def stopping(self) -> bool:
        return bool(self.a[_STOP])

    def add_bytes(self, n: int) -> None:
        self.a[self.files_i + 1] += n

    def say(self, kind: str, text: str) -> None:
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
        self.cur_dir, self.dir_error = d, None
        if d is None:
            return
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        target = _join(self.run.target, d)
        try:
            self.sdir = os.open(_join(self.run.source, d), flags)
            try:
                self.tdir = os.open(target, flags)
            except FileNotFoundError:
                os.makedirs(target, exist_ok=True)  # workers may race here: exist_ok
                self.tdir = os.open(target, flags)
        except OSError as e:
            self.dir_error = e

    def fail(self, rel: str, text: str) -> None:
        self.say("E", f"{rel}: {text}")

    def one(self, e: Entry, action: str, recorded: str | None) -> None:
        a, i = self.a, self.files_i
        rel = e.rel
        d, _, name = rel.rpartition("/")
        before = a[i + 1]
        try:
            if action == "done":
                self.queue_delete(d, name, None if e.kind == "link" else e.size, e.mtime_ns)
                return
            if action != "copy":
                if self.verified_in_place(e, action, recorded):
                    a[i + 1] += e.size
                    a[i + 2] += e.size
                    a[i] += 1
                    return
                if not self.run.replace:
                    self.fail(rel, f"a different file is already at the target; {CONFLICT_HINT}")
                    return
            if e.kind == "link":
                dst = _join(self.run.target, rel)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                tmp = os.path.join(os.path.dirname(dst), self.tmp_name(name))
                filecopy.copy_symlink(dst, tmp, e.link, e.mtime_ns, not self.run.replace)
                self.records.append((rel, 0, e.mtime_ns, "link"))
                self.queue_delete(d, name, None, e.mtime_ns)
            else:
                if d != self.cur_dir:
                    self.enter_dir(d)
                if self.dir_error is not None:
                    raise self.dir_error
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
                )
                self.records.append((rel, st.st_size, st.st_mtime_ns, digest.hex()))
                self.queue_delete(d, name, st.st_size, st.st_mtime_ns)
            a[i] += 1
        except filecopy.CopyAborted:
            a[i + 1] = before
        except OSError as err:
            a[i + 1] = before
            if err.errno in filecopy.FULL_ERRNOS:
                a[_STOP] = 1
                self.say("F", f"target full ({err.strerror}) while writing {rel}; stopped")
            else:
                self.fail(rel, err.strerror or str(err))
        except filecopy.CopyFailed as err:
            a[i + 1] = before
            self.fail(rel, str(err))

    def tmp_name(self, name: str) -> str:
        self.seq += 1
        return filecopy.temp_name(name, f"{self.token}{self.seq:x}")

    def verified_in_place(self, e: Entry, action: str, recorded) -> bool:
        """Return whether the target already holds the source (by hash); queue the source if moving."""
        src, dst = _join(self.run.source, e.rel), _join(self.run.target, e.rel)
        buf, stopping = self.buf, self.stopping
        if action == "check":
            size, digest = filecopy.hash_file(dst, buf, stopping)
            ok = size == e.size and digest.hex() == recorded
        else:
            theirs = filecopy.hash_file(src, buf, stopping)
            ok = theirs == filecopy.hash_file(dst, buf, stopping)
            if ok:
                self.records.append((e.rel, e.size, e.mtime_ns, theirs[1].hex()))
        if ok:
            d, _, name = e.rel.rpartition("/")
            self.queue_delete(d, name, e.size, e.mtime_ns)
        return ok

    def queue_delete(self, d: str, name: str, size: int | None, mtime_ns: int) -> None:
        """Queue a verified source for deletion; hand the queue to the deleter once it holds enough bytes."""
        if self.move:
            self.to_delete.append((d, name, size, mtime_ns))
            self.delete_bytes += size or 0
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
            self.say("E", f"internal error while deleting sources: {e!r}")

    def flush_journal(self) -> None:
        if self.records:
            records, self.records = self.records, []
            try:
                self.run.journal.append(records)
            except OSError as e:
                if e.errno in filecopy.FULL_ERRNOS:
                    self.a[_STOP] = 1
                    self.say("F", f"target full ({e.strerror}) while writing the journal; stopped")

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
        self.run.libc.sync_fs(self.run.target_fd)  # every queued copy is now on stable storage
        step = max(-(-len(todo) // _UNLINK_THREADS), _UNLINK_MIN)
        parts = [todo[k : k + step] for k in range(0, len(todo), step)]
        helpers = [threading.Thread(target=self._unlink_all, args=(part,)) for part in parts[1:]]
        for t in helpers:
            t.start()
        self._unlink_all(parts[0])
        for t in helpers:
            t.join()

    def _unlink_all(self, todo: list) -> None:
        """Unlink the sources of ``todo`` that did not change since they were copied."""
        cur, dfd, dir_error = None, -1, None
        try:
            for d, name, size, mtime_ns in todo:
                if d != cur:
                    if dfd >= 0:
                        os.close(dfd)
                    cur, dfd, dir_error = d, -1, None
                    try:
                        dfd = os.open(_join(self.run.source, d), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    except OSError as e:
                        dir_error = e
                rel = f"{d}/{name}" if d else name
                if dir_error is not None:
                    if not isinstance(dir_error, FileNotFoundError):
                        self.fail(rel, f"cannot delete source: {dir_error.strerror}")
                    continue
                try:
                    st = os.lstat(name, dir_fd=dfd)
                    if size is not None and (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
                        self.fail(rel, "changed after being copied; kept at source")
                        continue
                    os.unlink(name, dir_fd=dfd)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    self.fail(rel, f"cannot delete source: {e.strerror}")
        finally:
            if dfd >= 0:
                os.close(dfd)


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
    cancel: threading.Event | None = None,
    on_message: Callable[[str, str], None] | None = None,
    on_progress: Callable[[Snapshot, ProgressReporter], None] | None = None,
) -> TransferResult:
    """Copy or move what ``patterns`` select under ``source`` to ``target``; return what happened.

    A file already at the target that differs from its source (not one this transfer wrote, as
    its journal or a hash shows) is a per-file error, its source kept, unless ``replace``.
    """
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
        if dst == src:
            raise MoverUsageError("--source and --target are the same directory")
        if os.path.exists(dst) and not os.path.isdir(dst):
            raise MoverUsageError(f"target {os.fspath(target)} exists and is not a directory")
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
    try:
        skip = None
        if os.path.isdir(dst):
            tst = os.stat(dst)
            skip = (tst.st_dev, tst.st_ino)
        run.plan = resolve(src, patterns, skip, cancel.is_set)
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

    try:
        os.makedirs(dst, exist_ok=True)
        journal = run.journal.load()
        run.journal.open()
    except OSError as e:
        code = EXIT_TARGET_FULL if e.errno in filecopy.FULL_ERRNOS else EXIT_FILES_FAILED
        run.errors.append(f"cannot prepare target {dst}: {e.strerror}")
        return _result(run, "failed", code, t0)
    if not cancel.is_set():
        work = run.scan_target(journal)
        run.tick(force=True)
        run.run_workers(run.batches(work))
    cancelled = cancel.is_set()
    if not cancelled:
        run.finish_dirs()
    if run.move:
        run.prune_source_dirs()
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
        run.journal.remove()
    run.tick(state, force=True)
    if reporter.write_error:
        run.warn(reporter.write_error)
    return _result(run, state, code, t0)


def _result(run: _Transfer, state: str, code: int | None, t0: float) -> TransferResult:
    snap = run.snapshot(state)
    return TransferResult(
        operation=run.operation,
        state=state,
        exit_code=EXIT_SIGTERM if code is None else code,  # cancelled: the CLI sets 130 for SIGINT
        files_total=snap.files_total,
        files_done=snap.files_done,
        files_failed=snap.files_failed,
        bytes_total=snap.bytes_total,
        bytes_done=snap.bytes_done,
        bytes_copied=snap.bytes_done - run.base.bytes - run.verified_bytes(),
        errors=list(run.errors),
        warnings=list(run.warnings),
        elapsed_s=time.monotonic() - t0,
    )


def _write_failed(reporter: ProgressReporter, operation: str, message: str) -> None:
    snap = Snapshot(operation, "failed", 0, 0, 0, 0, 0, [message])
    reporter.update(snap, force=True)
