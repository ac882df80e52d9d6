"""``iosea-wf-mover``: the data-mover command the orchestrator runs in a Slurm job (or a sysadmin by hand).

    iosea-wf-mover {copy|move} --source DIR --target DIR [--workers N] [--progress FILE]
                   [--strict] [--fsync] [--replace] [--verify] PATTERN...

Exit codes: 0 ok; 1 some files failed (each reported, the others transferred); 2 usage error (bad
arguments, a pattern escaping the source; nothing done); 3 the source directory is missing; 4 the
target is full (ENOSPC/EDQUOT; temp file removed, stopped); 5 ``--strict`` and a pattern matched
nothing; 129 cancelled by SIGHUP; 130 cancelled by SIGINT; 143 cancelled by SIGTERM. A cancelled or
killed run is finished by rerunning the same command. Every message line starts with
``iosea-wf-mover: ``; no tracebacks, also when stderr is closed early (the messages are then
dropped: the progress file still has them).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading

from iosea_wf.mover import engine
from iosea_wf.mover.errors import EXIT_CODES, EXIT_FILES_FAILED, EXIT_USAGE, MoverError, MoverUsageError

PROG = "iosea-wf-mover"

_EPILOG = (
    "patterns:\n"
    "  relative globs resolved under --source ('*', '?', '[...]' within a path component, '**' for\n"
    "  any depth; a leading dot is not special); the relative layout is kept under --target. Matched\n"
    "  directories are taken recursively. '..', absolute patterns and symlinks leading out of the\n"
    "  source are refused. Symlinks inside the source are copied as symlinks, their text unchanged.\n"
    "  Entries named like the mover's own files (.iosea-mover, .NAME.iosea-tmp-HEX) are skipped,\n"
    "  each with a warning.\n"
    "\n"
    "integrity:\n"
    "  each file is written to .<name>.iosea-tmp-<hex>, hashed (xxh3-128; a large file is copied\n"
    "  by the kernel, then hashed on both sides, which must agree), checked (lengths, source\n"
    "  unchanged), then renamed into place. Metadata is kept as cp -a keeps it (mode, owner as\n"
    "  root, times, xattrs, ACLs; sparse files stay sparse); what the target cannot keep is warned\n"
    "  about, on stderr and in the progress file. move deletes a source only once its copy is\n"
    "  verified and the target filesystem synced to disk. Rerun the same command after an\n"
    "  interruption to finish it. Sources are read, never mapped, and no lease is taken on them:\n"
    "  another process writing or cutting a source never waits for the mover (the copy of that\n"
    "  file is then refused).\n"
    "\n"
    "existing files:\n"
    "  a file already at the target that is identical to its source (same bytes; e.g. left by an\n"
    "  interrupted run) counts as transferred. Anything else already there (a different file, a\n"
    "  directory, another symlink) is never replaced silently: it is an error for that file, the\n"
    "  target is left as it was, the source is kept (move) and the exit code is 1. --replace\n"
    "  overwrites such files instead.\n"
    "\n"
    "reruns:\n"
    "  a copy that ended leaves a record in TARGET/.iosea-mover/record.jsonl: the inode and ctime\n"
    "  of each source and of its verified copy. A rerun skips, without hashing, each file whose two\n"
    "  sides still have exactly those (no process can set a ctime: any change of data or metadata\n"
    "  gives a new one), when the record was made on this boot or with --fsync; every other file\n"
    "  already at the target is hashed on both sides. --verify hashes them all.\n"
    "\n"
    "exit codes:\n" + "".join(f"  {code:<4} {text}\n" for code, text in EXIT_CODES.items())
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit by itself
        raise MoverUsageError(f"{message} (see {PROG} --help)")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``iosea-wf-mover``."""
    p = _Parser(
        prog=PROG,
        description="Copy or move the elements of a service namespace (glob patterns) to a storage tier.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "operation", choices=engine.OPERATIONS, help="copy, or move (delete each source once verified)"
    )
    p.add_argument("--source", required=True, metavar="DIR", help="directory the patterns are resolved under")
    p.add_argument("--target", required=True, metavar="DIR", help="directory receiving the same layout")
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help=f"parallel worker processes (default: two per core, 2..16; here {engine.default_workers()})",
    )
    p.add_argument("--progress", metavar="FILE", help="keep a JSON progress document in FILE")
    p.add_argument(
        "--strict", action="store_true", help="exit 5 (doing nothing) if a pattern matches nothing"
    )
    p.add_argument(
        "--fsync",
        action="store_true",
        help="fsync each file before renaming it into place (move syncs the target filesystem before"
        " deleting sources in any case)",
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="overwrite files already at the target that differ from their source (default: refuse"
        " each one, keep its source, exit 1)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="hash every file already at the target on both sides, even those the record of an"
        " earlier run shows unchanged (default: a rerun trusts that record, see 'reruns' below)",
    )
    p.add_argument("patterns", nargs="+", metavar="PATTERN", help="relative glob under --source")
    return p


def _say(text: str, console=None) -> None:
    """Print ``text`` on stderr, each line prefixed; a closed stderr silences the rest of the run."""
    lines = "\n".join(f"{PROG}: {line}" for line in text.splitlines() or [""])
    try:
        if console is not None:
            console.print(lines, markup=False, highlight=False)
        else:
            print(lines, file=sys.stderr, flush=True)
    except (BrokenPipeError, ValueError, OSError):
        _silence_stderr()


def _silence_stderr() -> None:
    """Point fd 2 at /dev/null: the reader went away, and neither a message nor the interpreter's
    flush at exit may turn that into a traceback or another exit code."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)


class _Bar:
    """A rich progress bar on stderr, only built when stderr is a terminal."""

    def __init__(self, operation: str):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn(f"{operation} "),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("{task.fields[files]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task = self.progress.add_task(operation, total=None, files="")
        self.progress.start()

    def update(self, snap, _reporter) -> None:
        self.progress.update(
            self.task,
            total=snap.bytes_total or None,
            completed=snap.bytes_done,
            files=f"{snap.files_done}/{snap.files_total} files",
        )

    def stop(self) -> None:
        self.progress.stop()


def main(argv: list[str] | None = None) -> int:
    """Run ``iosea-wf-mover`` and return its exit code."""
    try:
        args = build_parser().parse_args(argv)
    except MoverUsageError as e:
        _say(f"error: {e}")
        return EXIT_USAGE

    cancel = threading.Event()
    received: list[int] = []

    def on_signal(signum, _frame):
        # Only flag it: the engine stops at the next chunk boundary and cleans up its temp files.
        received.append(signum)
        cancel.set()

    # SIGHUP (the terminal or the session that started the mover went away) stops it as SIGTERM does.
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    bar = _Bar(args.operation) if sys.stderr.isatty() else None
    console = bar.console if bar else None
    try:
        result = engine.transfer(
            args.operation,
            args.source,
            args.target,
            args.patterns,
            workers=args.workers,
            progress_path=args.progress,
            strict=args.strict,
            fsync=args.fsync,
            replace=args.replace,
            verify=args.verify,
            cancel=cancel,
            on_message=lambda kind, text: _say(f"{kind}: {text}", console),
            on_progress=bar.update if bar else None,
        )
    except MoverError as e:
        if bar:
            bar.stop()
        _say(f"error: {e}", console)
        return e.exit_code
    except OSError as e:
        if bar:
            bar.stop()
        _say(f"error: {e.strerror}: {e.filename}" if e.filename else f"error: {e}", console)
        return EXIT_FILES_FAILED
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if bar:
        bar.stop()
    if result.state == "cancelled":
        signum = received[0] if received else signal.SIGTERM
        _say(
            f"{result.operation} cancelled by signal {signum} ({result.files_done}/{result.files_total}"
            f" files done, {result.files_left} left, {result.files_failed} failed);"
            " rerun the same command to finish it",
            console,
        )
        return 128 + signum
    rate = result.bytes_copied / result.elapsed_s if result.elapsed_s > 0 else 0.0
    _say(
        f"{result.operation} {result.state}: {result.files_done}/{result.files_total} files, "
        f"{result.bytes_done} bytes ({result.bytes_copied} copied now, {rate / 1e6:.1f} MB/s) "
        f"in {result.elapsed_s:.2f} s"
        + (f", {result.files_failed} failed" if result.files_failed else "")
        + (f", {result.files_left} left (stopped early: rerun to finish)" if result.files_left else ""),
        console,
    )
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
