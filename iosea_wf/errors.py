"""The exception root of iosea-wf, its subclasses, and the exit-code table.

Every error a user can cause or meet is an :class:`IoseaError`. The CLI catches it once, prints
its message plainly (no traceback) and exits with its ``exit_code``. Nothing below the CLI calls
``sys.exit``.
"""

from __future__ import annotations

# The documented exit codes (README "Exit codes" mirrors this table).
EXIT_OK = 0
EXIT_FAILURE = 1  # the requested work ran and failed (a step, a data mover)
EXIT_USAGE = 2  # bad command line or invalid WDF: nothing was done
EXIT_SITE = 3  # the site inventory is missing or invalid
EXIT_NOT_FOUND = 4  # no such session / step for this user
EXIT_CONFLICT = 5  # the session's state forbids it (exists already, not active, ...)
EXIT_RESOURCES = 6  # the datanodes cannot hold what is asked
EXIT_ORCHESTRATION = 7  # provisioning or tearing down a service failed
EXIT_SLURM = 8  # Slurm refused or is unreachable
EXIT_STORE = 9  # the state directory or its session store cannot be used
EXIT_UNREACHABLE = 10  # the site's Workflow Manager service cannot be reached
EXIT_UNAUTHENTICATED = 11  # who is calling cannot be proved (no MUNGE credential) or was not accepted
EXIT_FORBIDDEN = 12  # a session shared with the caller, but not for this (or a share token not valid)
EXIT_UNHEALTHY = 13  # `site check`: a check of a host of the site failed (the report says which)
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT)
EXIT_TERMINATED = 143  # SIGTERM

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_FAILURE: "the work ran and failed (step or data mover not COMPLETED)",
    EXIT_USAGE: "bad command line or invalid WDF; nothing was done",
    EXIT_SITE: "site inventory missing or invalid",
    EXIT_NOT_FOUND: "no such session or step for this user",
    EXIT_CONFLICT: "the session's state forbids the command (duplicate name, not active, ...)",
    EXIT_RESOURCES: "not enough datanode resources for the requested services",
    EXIT_ORCHESTRATION: "provisioning or tearing down an ephemeral service failed",
    EXIT_SLURM: "Slurm refused the request (e.g. sbatch rejected a job) or is unreachable",
    EXIT_STORE: "the state directory or its session store cannot be used (unwritable, corrupt)",
    EXIT_UNREACHABLE: "the site's Workflow Manager service cannot be reached",
    EXIT_UNAUTHENTICATED: "who is calling cannot be proved (no MUNGE credential) or the service refused it",
    EXIT_FORBIDDEN: "the session is shared with you, but not for this command (or the share token is "
    "unknown, used or expired)",
    EXIT_UNHEALTHY: "site check: at least one check of a host failed (unreachable, munge key, clock, slurmd, "
    "ganesha, tier or Workflow Manager)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C, SIGINT); the message says what was done and what was not",
    EXIT_TERMINATED: "terminated (SIGTERM); the message says what was done and what was not",
}


class IoseaError(Exception):
    """Root of every error iosea-wf reports to a user."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, *, details: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.details = list(details or [])

    def __str__(self) -> str:
        if not self.details:
            return self.message
        return self.message + "\n" + "\n".join(f"  {d}" for d in self.details)


class UsageError(IoseaError):
    """Raised when the command line is incomplete or malformed."""

    exit_code = EXIT_USAGE


class WDFError(IoseaError):
    """Raised when a Workflow Description File cannot be read or does not validate.

    ``problems`` holds every problem found (all of them, not the first one).
    """

    exit_code = EXIT_USAGE

    def __init__(self, message: str, problems: list | None = None):
        self.problems = list(problems or [])
        super().__init__(message, details=[str(p) for p in self.problems])


class SiteError(IoseaError):
    """Raised when the site inventory is missing, unreadable or inconsistent."""

    exit_code = EXIT_SITE


class SessionNotFound(IoseaError):
    """Raised when the user has no session (or step) of the given name."""

    exit_code = EXIT_NOT_FOUND


class SessionConflict(IoseaError):
    """Raised when a session's name or state forbids the command."""

    exit_code = EXIT_CONFLICT


class ResourcesUnavailable(IoseaError):
    """Raised when no datanode has room for a service's flavor."""

    exit_code = EXIT_RESOURCES


class OrchestrationError(IoseaError):
    """Raised when an Ansible run that provisions or tears down services fails."""

    exit_code = EXIT_ORCHESTRATION


class SlurmError(IoseaError):
    """Raised when a Slurm command fails or slurmctld cannot be reached."""

    exit_code = EXIT_SLURM


class SlurmUnreachable(SlurmError):
    """Raised when slurmctld does not answer (down, or too slow): Slurm said nothing, so nothing is known."""


class StoreError(IoseaError):
    """Raised when the state directory or its database cannot be used."""

    exit_code = EXIT_STORE


class WorkFailed(IoseaError):
    """Raised when waited-for work (a step, a data mover) ended in another state than COMPLETED."""

    exit_code = EXIT_FAILURE


class ServiceUnreachable(IoseaError):
    """Raised when the site's Workflow Manager service does not answer (socket missing, refused, ...)."""

    exit_code = EXIT_UNREACHABLE


class Unauthenticated(IoseaError):
    """Raised when no valid proof of who is calling comes with a request (or the service refused it)."""

    exit_code = EXIT_UNAUTHENTICATED


class Forbidden(IoseaError):
    """Raised when a user a session is shared with asks what their share does not allow.

    A read-only share asked to run, anyone but the owner asked to stop, share or cancel another
    user's run; also a share token that is unknown, already used or expired. A user the session
    is not shared with at all gets :class:`SessionNotFound`: for them it does not exist.
    """

    exit_code = EXIT_FORBIDDEN


def error_body(exc: IoseaError) -> dict:
    """The JSON form of an error (``--json`` output, the service's answers): enough to raise it again."""
    return {
        "error": {
            "type": type(exc).__name__,
            "exit_code": exc.exit_code,
            "message": exc.message,
            "details": exc.details,
        }
    }


class Interrupted(KeyboardInterrupt):
    """Raised when the user interrupts a command (SIGINT or SIGTERM): not an error, so no IoseaError.

    A KeyboardInterrupt, so ``except Exception`` never swallows it. Whoever catches it to clean up
    sets ``note`` to say what was done and what was not, then re-raises it.
    """

    def __init__(self, signum: int = 2, note: str = ""):
        super().__init__(signum)
        self.signum = signum
        self.note = note

    @property
    def exit_code(self) -> int:
        """130 for SIGINT, 143 for SIGTERM (128 + the signal, the shell's convention)."""
        return 128 + self.signum
