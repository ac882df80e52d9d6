"""The data-mover engine: copy or move what glob patterns select from a source to a target directory.

``transfer(operation, source, target, patterns, ...)`` is the Python API; the ``iosea-wf-mover``
console script (:mod:`iosea_wf.mover.cli`) is a thin layer over it.

Integrity argument
------------------
* Each file is written to ``.<name>.iosea-tmp-<hex>`` in its target directory and renamed over its
  final name only when complete, so a reader (or a crash) never sees a partial file under a final
  name: rename(2) within one directory is atomic.
* The source is read once; every chunk is hashed (xxh3-128, >10 GB/s, so it is not the bottleneck)
  as it streams to the temp file. The temp file is then re-read from the target filesystem and
  hashed again; the rename happens only if both digests and lengths agree and the source's size and
  mtime did not change during the copy. That catches short or misplaced writes, truncation by
  another process, and a target filesystem that returns other bytes than were written. Just after
  writing, the re-read is served from the page cache, so it costs a memory pass, not a disk pass
  (measured: the verified copy stays within the aims in ``bench/mover.py``); it does not prove the
  platters hold the data, which is what ``--fsync`` is for. Kernel copy paths (copy_file_range,
  sendfile) were measured too: they never show the bytes to user space, so verifying would need
  two extra reads (source and target) instead of one, which measured no faster.
* ``move`` deletes a source only after its copy was verified and renamed into place, and only after
  it checked that the source still has the size and mtime it had when copied. Deletions are
  deferred to the end of the copy phase (or a cancellation), so with ``fsync=True`` one ``syncfs``
  of the target makes every copy durable before any source is unlinked. Without it a kill -9 still
  loses nothing (the page cache belongs to the kernel, not to the process); only a node crash
  between deletion and write-back could. Every file is therefore at any moment complete at the
  source, complete at the target, or both.
* Resuming: stale temp files in the target directories are removed first. An element already at the
  target with the source's size and mtime is verified rather than copied again: when the journal
  (:mod:`iosea_wf.mover.journal`) recorded it, for ``copy`` the journal line is trusted and for
  ``move`` the target is re-hashed against the recorded digest before the source is deleted;
  without a journal line both sides are hashed and compared. Anything else is copied again.
* When a run ends (completed or failed) its journal is removed; a cancelled or killed run keeps it
  for the rerun. Source directories a ``move`` emptied are removed when they were part of a matched
  directory; target directories get their source mode and mtime at the end of the copy phase.

Speed: threads do the I/O (syscalls release the GIL); work is handed out in batches (a large file
alone, small files by the hundred) so the per-file cost is a handful of syscalls, not a task each.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

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


def default_workers() -> int:
    """Return the default number of worker threads: two per usable core, between 2 and 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(2, min(16, 2 * cores))


@dataclass
class TransferResult:
    """What a transfer did; ``exit_code`` is the one the console script exits with."""

    operation: str
    state: str  # "completed", "failed" or "cancelled"
    exit_code: int
    files_total: int = 0
    files_done: int = 0
    files_failed: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    bytes_copied: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


class _Counter:
    __slots__ = ("bytes", "files", "verified")

    def __init__(self) -> None:
        self.bytes = 0
        self.files = 0
        self.verified = 0  # bytes found already complete at the target (hashed, not copied)

    def add(self, n: int) -> None:
        self.bytes += n


def _join(root: str, rel: str) -> str:
    return os.path.join(root, rel) if rel else root


def _syncfs(path: str) -> None:
    """Flush the filesystem holding ``path`` to stable storage (syncfs, or sync where missing)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            os.sync()
    except (AttributeError, OSError):
        os.sync()
    finally:
        os.close(fd)


class _Transfer:
    def __init__(self, operation, source, target, workers, reporter, cancel, fsync, on_message, on_progress):
        self.operation = operation
        self.move = operation == "move"
        self.source = source
        self.target = target
        self.workers = workers
        self.reporter = reporter
        self.cancel = cancel
        self.fsync = fsync
        self.on_message = on_message
        self.on_progress = on_progress
        self.halt = threading.Event()
        self.full = False
        self.errors: list[str] = []  # appended from worker threads: list.append is atomic
        self.warnings: list[str] = []
        self._reported = 0
        self.counters: list[_Counter] = []
        self.base = _Counter()  # elements found complete before the workers started
        self.journal_q: deque = deque()
        self.to_delete: deque = deque()  # (source path, size, mtime_ns) verified at the target
        self.local = threading.local()
        self.token = os.urandom(4).hex()
        self.seq = itertools.count()
        self.made_dirs: set[str] = set()
        self.plan = Plan()
        self.bytes_total = 0
        self.journal = Journal(target, source)

    # -- helpers shared by threads -------------------------------------------------------------
    def stopping(self) -> bool:
        return self.halt.is_set() or self.cancel.is_set()

    def _thread_state(self):
        tl = self.local
        if not hasattr(tl, "buf"):
            tl.buf = bytearray(filecopy.BUF_SIZE)
            tl.counter = _Counter()
            self.counters.append(tl.counter)
        return tl

    def _tmp_for(self, dst: str) -> str:
        head, name = os.path.split(dst)
        return os.path.join(head, filecopy.temp_name(name, f"{self.token}{next(self.seq):x}"))

    def _ensure_dir(self, path: str) -> None:
        if path not in self.made_dirs:
            os.makedirs(path, exist_ok=True)
            self.made_dirs.add(path)

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        if self.on_message:
            self.on_message("warning", text)

    # -- planning ------------------------------------------------------------------------------
    def scan_target(self, journal: dict) -> list[tuple[Entry, str, str | None]]:
        """Remove stale temp files and decide, per entry, 'copy', 'verify', 'check' or done."""
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
                    self._already_done(e)
                else:
                    work.append((e, "copy", None))
            elif stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == (e.size, e.mtime_ns):
                rec = journal.get(e.rel)
                if rec is not None and rec[:2] == (e.size, e.mtime_ns):
                    if self.move:
                        work.append((e, "check", rec[2]))
                    else:
                        self._already_done(e)
                else:
                    work.append((e, "verify", None))
            else:
                work.append((e, "copy", None))
        return work

    def _already_done(self, e: Entry) -> None:
        self.base.files += 1
        self.base.bytes += e.size
        if self.move:
            size = None if e.kind == "link" else e.size  # a link's lstat size is its text length
            self.to_delete.append((_join(self.source, e.rel), size, e.mtime_ns))

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

    # -- workers -------------------------------------------------------------------------------
    def run_batch(self, batch: list) -> None:
        tl = self._thread_state()
        for entry, action, recorded in batch:
            if self.stopping():
                return
            self._one(entry, action, recorded, tl)

    def _one(self, e: Entry, action: str, recorded: str | None, tl) -> None:
        src = _join(self.source, e.rel)
        dst = _join(self.target, e.rel)
        counter = tl.counter
        before = counter.bytes
        try:
            if action != "copy" and self._verified_in_place(e, action, recorded, src, dst, tl.buf):
                counter.bytes += e.size
                counter.verified += e.size
                counter.files += 1
                return
            self._ensure_dir(os.path.dirname(dst))
            if e.kind == "link":
                filecopy.copy_symlink(dst, self._tmp_for(dst), e.link, e.mtime_ns)
                self.journal_q.append((e.rel, 0, e.mtime_ns, "link"))
                if self.move:
                    self.to_delete.append((src, None, e.mtime_ns))
            else:
                planned = (e.size, e.mtime_ns, e.mode)
                st, digest = filecopy.copy_file(
                    src, dst, self._tmp_for(dst), planned, tl.buf, counter.add, self.stopping
                )
                self.journal_q.append((e.rel, st.st_size, st.st_mtime_ns, digest.hex()))
                if self.move:
                    self.to_delete.append((src, st.st_size, st.st_mtime_ns))
            counter.files += 1
        except filecopy.CopyAborted:
            counter.bytes = before
        except OSError as err:
            counter.bytes = before
            if err.errno in filecopy.FULL_ERRNOS:
                self.full = True
                self.halt.set()
                self.errors.append(f"target full ({err.strerror}) while writing {e.rel}; stopped")
            else:
                where = "" if err.filename in (None, src, dst) else f" ({err.filename})"
                self.errors.append(f"{e.rel}: {err.strerror}{where}")
        except filecopy.CopyFailed as err:
            counter.bytes = before
            self.errors.append(f"{e.rel}: {err}")

    def _verified_in_place(self, e: Entry, action: str, recorded, src: str, dst: str, buf) -> bool:
        """Return whether ``dst`` already holds ``src`` (by hash); queue the source if moving."""
        if action == "check":
            size, digest = filecopy.hash_file(dst, buf, self.stopping)
            ok = size == e.size and digest.hex() == recorded
        else:
            ok = filecopy.hash_file(src, buf, self.stopping) == filecopy.hash_file(dst, buf, self.stopping)
            if ok:
                size, digest = filecopy.hash_file(dst, buf)
                self.journal_q.append((e.rel, e.size, e.mtime_ns, digest.hex()))
        if ok and self.move:
            self.to_delete.append((src, e.size, e.mtime_ns))
        return ok

    # -- main thread ---------------------------------------------------------------------------
    def snapshot(self, state: str) -> Snapshot:
        files = self.base.files + sum(c.files for c in self.counters)
        done_bytes = self.base.bytes + sum(c.bytes for c in self.counters)
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

    def tick(self, state: str = "running", force: bool = False) -> Snapshot:
        self.flush_journal()
        while self._reported < len(self.errors):
            if self.on_message:
                self.on_message("error", self.errors[self._reported])
            self._reported += 1
        snap = self.snapshot(state)
        self.reporter.update(snap, force=force)
        if self.on_progress:
            self.on_progress(snap, self.reporter)
        return snap

    def flush_journal(self) -> None:
        q = self.journal_q
        records = []
        while q:
            records.append(q.popleft())
        if records:
            try:
                self.journal.append(records)
            except OSError as e:
                if e.errno in filecopy.FULL_ERRNOS:
                    self.full = True
                    self.halt.set()

    def run_workers(self, batches: list) -> None:
        with ThreadPoolExecutor(self.workers, thread_name_prefix="iosea-mover") as ex:
            pending = {ex.submit(self.run_batch, b) for b in batches}
            try:
                while pending:
                    done, pending = wait(pending, timeout=MIN_INTERVAL_S, return_when=FIRST_EXCEPTION)
                    for f in done:
                        f.result()  # only a bug raises here: workers report file errors themselves
                    self.tick()
            except BaseException:
                self.halt.set()
                raise

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

    def delete_sources(self) -> None:
        """Unlink sources whose copy is verified and which did not change since; prune emptied dirs."""
        if self.fsync and self.to_delete:
            _syncfs(self.target)
        while self.to_delete:
            src, size, mtime_ns = self.to_delete.popleft()
            try:
                st = os.lstat(src)
                if size is not None and (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
                    self.errors.append(
                        f"{os.path.relpath(src, self.source)}: changed after being copied; kept at source"
                    )
                    continue
                os.unlink(src)
            except FileNotFoundError:
                pass
            except OSError as e:
                self.errors.append(f"{os.path.relpath(src, self.source)}: cannot delete source: {e.strerror}")
        for d in sorted(self.plan.tree_dirs - {""}, key=lambda d: -d.count("/")):
            # Not empty (something was not moved) or already gone: keep it.
            with contextlib.suppress(OSError):
                os.rmdir(_join(self.source, d))


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
    cancel: threading.Event | None = None,
    on_message: Callable[[str, str], None] | None = None,
    on_progress: Callable[[Snapshot, ProgressReporter], None] | None = None,
) -> TransferResult:
    """Copy or move what ``patterns`` select under ``source`` to ``target``; return what happened."""
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
        operation, src, dst, workers or default_workers(), reporter, cancel, fsync, on_message, on_progress
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
    run.flush_journal()
    cancelled = cancel.is_set()
    if not cancelled:
        run.finish_dirs()
    if run.move:
        run.delete_sources()
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
        bytes_copied=sum(c.bytes - c.verified for c in run.counters),
        errors=list(run.errors),
        warnings=list(run.warnings),
        elapsed_s=time.monotonic() - t0,
    )


def _write_failed(reporter: ProgressReporter, operation: str, message: str) -> None:
    snap = Snapshot(operation, "failed", 0, 0, 0, 0, 0, [message])
    reporter.update(snap, force=True)
