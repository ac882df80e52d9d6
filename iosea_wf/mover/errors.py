"""The data mover's exit codes and the errors that end a transfer before it starts.

The mover is a separate console script run inside a Slurm job, so its exit codes are its own
(documented in ``iosea-wf-mover --help``); they are not the ``iosea-wf`` table of
:mod:`iosea_wf.errors`, but every error still derives from :class:`iosea_wf.errors.IoseaError`.
"""

from __future__ import annotations

import signal

from iosea_wf.errors import IoseaError

EXIT_OK = 0
EXIT_FILES_FAILED = 1  # the transfer ran; some files could not be transferred (each one reported)
EXIT_USAGE = 2  # bad arguments or a pattern that escapes the source: nothing was done
EXIT_NO_SOURCE = 3  # the source directory does not exist (or is not a directory)
EXIT_TARGET_FULL = 4  # ENOSPC/EDQUOT on the target: the in-flight temp file was removed, the run stopped
EXIT_NOTHING_MATCHED = 5  # --strict and a pattern matched nothing: nothing was done
EXIT_SIGHUP = 128 + signal.SIGHUP  # 129: cancelled by SIGHUP (its terminal or session went away)
EXIT_SIGINT = 128 + signal.SIGINT  # 130: cancelled by SIGINT (Ctrl-C)
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143: cancelled by SIGTERM (scancel)

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "every matched file is at the target, verified (and, for move, gone from the source)",
    EXIT_FILES_FAILED: "some files failed (each reported); the others were transferred",
    EXIT_USAGE: "usage error (bad arguments, pattern escaping the source); nothing was done",
    EXIT_NO_SOURCE: "the source directory does not exist",
    EXIT_TARGET_FULL: "the target is full (ENOSPC/EDQUOT); stopped, temp file removed",
    EXIT_NOTHING_MATCHED: "--strict and a pattern matched nothing; nothing was done",
    EXIT_SIGHUP: "cancelled by SIGHUP; rerun the same command to finish",
    EXIT_SIGINT: "cancelled by SIGINT; rerun the same command to finish",
    EXIT_SIGTERM: "cancelled by SIGTERM (scancel); rerun the same command to finish",
}


class MoverError(IoseaError):
    """Root of the errors that stop a transfer before any file is written."""

    exit_code = EXIT_USAGE


class MoverUsageError(MoverError):
    """Raised for a bad operation, a bad pattern, or a pattern that escapes the source."""

    exit_code = EXIT_USAGE


class SourceMissing(MoverError):
    """Raised when the source directory does not exist or is not a directory."""

    exit_code = EXIT_NO_SOURCE


class NothingMatched(MoverError):
    """Raised in strict mode when at least one pattern matches nothing."""

    exit_code = EXIT_NOTHING_MATCHED
