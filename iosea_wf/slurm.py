"""The ONLY Python module that runs Slurm's commands (squeue, sacct, scontrol, scancel, salloc).

Commands are argument lists, never shell strings. Job states come from Slurm and are reported as
Slurm names them; a job that left ``squeue`` is looked up in the job-completion log (``sacct -c``)
and is never assumed to have succeeded. One :func:`job_states` call makes at most two Slurm calls,
whatever the number of jobs.

Acting for another user: a process running as root on behalf of a user (the Workflow Manager
service) submits and cancels that user's jobs only with the user's own Slurm token (``scontrol
token``, auth/jwt): :func:`acting_for` says whether that is the case and refuses when the token is
missing. The token reaches ``sbatch``/``scancel`` through their environment (``SLURM_JWT``), never
their argument list (visible in ``ps``), and is never logged or kept: :func:`token_file` hands it
to the orchestrator in a 0600 file on a memory file system that its reader removes at once.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from .errors import SlurmError, SlurmUnreachable, UsageError
from .identity import current_user

PENDING_STATES = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
RUNNING_STATES = {"RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESIZING"}
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
    "REVOKED",
    "SPECIAL_EXIT",
}
UNKNOWN = "UNKNOWN"

_TIMEOUT = 30
# What every client command prints once its ~18 s of retries on a silent slurmctld are spent.
_NO_CONTROLLER = "Unable to contact slurm controller"
UNREACHABLE = "Slurm is unreachable: slurmctld does not answer"


@dataclass(frozen=True)
class JobState:
    """A job's state as Slurm reports it, with its exit code and reason when known."""

    job_id: str
    state: str
    exit_code: int | None = None
    signal: int | None = None
    reason: str | None = None

    @property
    def terminal(self) -> bool:
        """True once the job has ended (whatever the way)."""
        return self.state in TERMINAL_STATES

    @property
    def active(self) -> bool:
        """True while the job is pending or running."""
        return self.state in PENDING_STATES or self.state in RUNNING_STATES


def _run(
    argv: list[str],
    *,
    check: bool = True,
    timeout: float = _TIMEOUT,
    env: dict[str, str] | None = None,
    own_session: bool = False,
) -> subprocess.CompletedProcess:
    if shutil.which(argv[0]) is None:
        raise SlurmError(f"{argv[0]} is not installed here: is this a Slurm client host?")
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=env, start_new_session=own_session
        )
    except subprocess.TimeoutExpired:
        raise SlurmUnreachable(f"{UNREACHABLE} ({argv[0]} got no answer within {timeout:.0f} s)") from None
    if check and proc.returncode != 0:
        _raise_failure(argv, proc)
    return proc


def _raise_failure(argv: list[str], proc: subprocess.CompletedProcess) -> None:
    """SlurmUnreachable when the command found no slurmctld, else SlurmError with what it said."""
    said = (proc.stderr or proc.stdout).strip()
    if _NO_CONTROLLER in said:
        raise SlurmUnreachable(f"{UNREACHABLE} ({argv[0]}: {said})")
    raise SlurmError(f"{' '.join(argv[:2])} failed: {said}")


def _normal_state(raw: str) -> str:
    # squeue prints "CANCELLED by 0"; sacct may print "CANCELLED by 0" too.
    return raw.split()[0].rstrip("+") if raw else UNKNOWN


def _from_wait_status(raw: str) -> tuple[int | None, int | None]:
    """squeue's exit_code is a wait status: high byte exit code, low 7 bits signal."""
    try:
        status = int(raw)
    except ValueError:
        return None, None
    return (status >> 8) & 0xFF, status & 0x7F


def _from_exit_pair(raw: str) -> tuple[int | None, int | None]:
    """sacct's ExitCode is ``code:signal``."""
    try:
        code, sig = raw.split(":")
        return int(code), int(sig)
    except ValueError:
        return None, None


def parse_squeue(stdout: str, ids: list[str]) -> dict[str, JobState]:
    """States from ``squeue -O JobID:|,State:|,Reason:|,exit_code:`` output, for the asked ids only."""
    found: dict[str, JobState] = {}
    for line in stdout.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) < 4 or parts[0] not in ids:
            continue
        code, sig = _from_wait_status(parts[3])
        state = _normal_state(parts[1])
        terminal = state in TERMINAL_STATES
        found[parts[0]] = JobState(
            parts[0],
            state,
            code if terminal else None,
            sig if terminal else None,
            None if parts[2] in ("None", "") else parts[2],
        )
    return found


def parse_sacct(stdout: str, ids: list[str]) -> dict[str, JobState]:
    """States from ``sacct -c -n -P -o JobID,State,ExitCode`` output, for the asked ids only."""
    found: dict[str, JobState] = {}
    for line in stdout.splitlines():
        parts = line.split("|")
        if len(parts) >= 3 and parts[0] in ids:
            code, sig = _from_exit_pair(parts[2])
            found[parts[0]] = JobState(parts[0], _normal_state(parts[1]), code, sig)
    return found


def job_states(job_ids: list[str]) -> dict[str, JobState]:
    """States of the given jobs: one ``squeue`` call, plus one ``sacct -c`` for jobs it no longer knows."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return {}
    found: dict[str, JobState] = {}
    proc = _run(
        ["squeue", "--states=all", "-h", "-j", ",".join(ids), "-O", "JobID:|,State:|,Reason:|,exit_code:"],
        check=False,
    )
    if proc.returncode == 0:
        found.update(parse_squeue(proc.stdout, ids))
    elif "Invalid job id" not in proc.stderr:
        _raise_failure(["squeue"], proc)
    missing = [j for j in ids if j not in found]
    if missing:
        proc = _run(
            ["sacct", "-c", "-n", "-P", "-j", ",".join(missing), "-o", "JobID,State,ExitCode"], check=False
        )
        if proc.returncode == 0:
            found.update(parse_sacct(proc.stdout, missing))
    for j in ids:
        found.setdefault(j, JobState(j, UNKNOWN, reason="unknown to squeue and to the job-completion log"))
    return found


@dataclass(frozen=True)
class OnBehalf:
    """A user this (root) process acts for, with that user's Slurm token (never shown in a repr)."""

    user: str
    uid: int
    gid: int
    home: str
    token: str = field(repr=False)

    def sbatch_options(self) -> list[str]:
        """Options that make root's ``sbatch`` submit the job as the user.

        ``--export=NONE``: the job gets the user's own login environment on the node, not the
        service's (its HOME, PATH, ... would be root's).
        """
        return [f"--uid={self.uid}", f"--gid={self.gid}", "--export=NONE"]

    def environ(self) -> dict[str, str]:
        """This process's environment plus the token, for a Slurm command run for the user."""
        return {**os.environ, "SLURM_JWT": self.token}


def acting_for(user: str, token: str | None) -> OnBehalf | None:
    """None when this process runs as ``user``; else whom root acts for (refused without a token)."""
    if user == current_user():
        return None
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise UsageError(f"user {user!r} is unknown on this host: no job can run as them") from None
    if pw.pw_uid == os.geteuid():
        return None
    if os.geteuid() != 0:
        raise SlurmError(
            f"this process runs as {current_user()}, not root: it cannot submit or cancel jobs for {user}"
        )
    if not token:
        raise SlurmError(
            f"no Slurm token of user {user} came with the request: nothing is submitted or cancelled "
            "for them (the CLI gets one with `scontrol token` run as the user)"
        )
    return OnBehalf(user=user, uid=pw.pw_uid, gid=pw.pw_gid, home=pw.pw_dir, token=token)


@contextlib.contextmanager
def token_file(on_behalf: OnBehalf | None) -> Iterator[str]:
    """A 0600 file holding the token (``""`` without one), on a memory file system, removed afterwards.

    Why a file: ansible-runner writes its whole environment (``artifacts/*/command``,
    ``env/envvars``) and its extra variables to disk, so the token can go through neither; its
    reader (the slurm_job role's action plugin) removes the file as soon as it has read it.
    """
    if on_behalf is None:
        yield ""
        return
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    directory = tempfile.mkdtemp(prefix="iosea-wf-jwt-", dir=base)  # 0700
    path = os.path.join(directory, "token")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(on_behalf.token)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(directory)


def cancel(job_ids: list[str], on_behalf: OnBehalf | None = None) -> None:
    """Cancel jobs in one batched ``scancel`` (jobs already ended are ignored).

    ``on_behalf`` (from :func:`acting_for`): ``scancel`` runs with that user's token, so Slurm
    cancels as the user, with the user's rights, not root's.
    """
    ids = [str(j) for j in job_ids if j]
    if ids:
        env = on_behalf.environ() if on_behalf else None
        proc = _run(["scancel", *ids], check=False, env=env)
        if (
            proc.returncode != 0
            and "Invalid job id" not in proc.stderr
            and "already completing" not in proc.stderr
        ):
            _raise_failure(["scancel"], proc)


def controller_up() -> bool:
    """True when slurmctld answers (checked before calls that would otherwise retry for ~18 s)."""
    try:
        proc = _run(["scontrol", "ping"], check=False, timeout=10)
    except SlurmError:
        return False
    return "UP" in proc.stdout


def require_controller() -> None:
    """Raise SlurmUnreachable unless slurmctld answers (within seconds, not the clients' ~18 s of retries)."""
    if not controller_up():
        raise SlurmUnreachable(f"{UNREACHABLE} (`scontrol ping`)")


# sinfo's long state names of a node an administrator (or Slurm, after SlurmdTimeout) took out of
# service. Not "unknown" nor a "*" suffix (not responding) alone: every node is so for a moment
# after slurmctld restarts or a node is resumed, and the allocation's own wait decides then.
_NO_NEW_WORK = {
    "down", "drained", "draining", "drain", "fail", "failing", "maint", "future",
    "reboot_issued", "reboot_requested", "powered_down", "powering_down", "inval",
}  # fmt: skip


def unusable_nodes(names: list[str]) -> dict[str, str]:
    """{node: why} for the nodes among ``names`` that Slurm gives no new work (drained, down, ...).

    {} when slurmctld does not answer: what Slurm would say is then unknown, not a refusal.
    """
    if not names or not controller_up():
        return {}
    fields = "NodeList:|,StateLong:|,Reason:|"
    proc = _run(["sinfo", "-h", "-N", "-n", ",".join(names), "-O", fields], check=False)
    unusable = {}
    for line in proc.stdout.splitlines():
        node, state, reason = ([p.strip() for p in line.split("|")] + ["", "", ""])[:3]
        base = state.rstrip("*~#!%$@^-").lower()
        if node in names and base in _NO_NEW_WORK:
            unusable[node] = f"{base} in Slurm" + (f" ({reason})" if reason and reason != "none" else "")
    return unusable


def jobs_named(name: str) -> list[tuple[str, str, str]]:
    """(job id, state, reason) of the jobs of that exact name slurmctld still knows (ended ones too)."""
    return _squeue_rows(["--states=all", "--name", name], "JobID:|,State:|,Reason:|")


def allocate_and_run(argv: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``salloc`` in the foreground on this terminal; return its exit code (the command's)."""
    if shutil.which("salloc") is None:
        raise SlurmError("salloc is not installed here: is this a Slurm client host?")
    if argv[0] != "salloc":
        raise SlurmError(f"not an salloc command: {argv[0]}")
    return subprocess.run(argv, env=env).returncode


def user_token(lifespan: int = 120) -> str | None:
    """A short-lived Slurm JWT of this process's user (``scontrol token``), or None where none is issued.

    A site without auth/jwt issues none: the caller then sends no token and the service decides.
    """
    try:
        proc = _run(["scontrol", "token", f"lifespan={lifespan}"], check=False, timeout=5)
    except SlurmError:
        return None
    for line in proc.stdout.splitlines():
        if proc.returncode == 0 and line.startswith("SLURM_JWT="):
            return line.split("=", 1)[1].strip() or None
    return None


def user_jobs(user: str) -> list[tuple[str, str, str]]:
    """(job id, name, state) of the unfinished jobs slurmctld holds for a user."""
    return _squeue_rows(["-u", user], "JobID:|,Name:|,State:|")


def _squeue_rows(selection: list[str], fields: str) -> list[tuple[str, str, str]]:
    """The three ``|``-separated ``fields`` of each job ``squeue`` selects (rows without a job id dropped)."""
    proc = _run(["squeue", "-h", *selection, "-O", fields], check=False)
    rows = []
    for line in proc.stdout.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) >= 3 and parts[0]:
            rows.append((parts[0], parts[1], parts[2]))
    return rows


# What sbatch says when no node of the request's partition could ever hold it (too many cores, too
# much memory): an answer about the datanodes' resources, not a failure of Slurm.
_NEVER_FITS = (
    "Requested node configuration is not available",
    "Memory required by task is not available",
    "More processors requested than permitted",
    "Node count specification invalid",
)


def submit_allocation(
    name: str, partition: str, node: str, cores: int, memory_mb: int, on_behalf: OnBehalf | None = None
) -> str:
    """Submit a job that only holds ``cores`` and ``memory_mb`` of ``node`` until cancelled; its id.

    No output file (``/dev/null``), working directory ``/``. ``on_behalf``: submitted as that user
    with their token (the allocation is theirs, accounted to them). ResourcesUnavailable when Slurm
    answers that the node can never hold it.
    """
    from .errors import ResourcesUnavailable

    argv = ["sbatch", "--parsable", *(on_behalf.sbatch_options() if on_behalf else [])]
    argv += [
        f"--job-name={name}",
        f"--partition={partition}",
        f"--nodelist={node}",
        "--nodes=1",
        "--ntasks=1",
        f"--cpus-per-task={cores}",
        f"--mem={memory_mb}M",
        "--output=/dev/null",
        "--error=/dev/null",
        "--chdir=/",
        "--wrap=exec sleep infinity",
    ]
    # In a session of its own: a Ctrl-C at the terminal never cuts sbatch between Slurm's accepting
    # the job and its printing the id (the caller defers the interrupt until the id is recorded).
    proc = _run(argv, check=False, env=on_behalf.environ() if on_behalf else None, own_session=True)
    if proc.returncode != 0:
        said = (proc.stderr or proc.stdout).strip()
        if any(text in said for text in _NEVER_FITS):
            raise ResourcesUnavailable(
                f"Slurm refuses the allocation {name} ({cores} cores, {memory_mb} MB on {node}): {said}"
            )
        _raise_failure(argv, proc)
    job_id = proc.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch gave no job id for {name}: {proc.stdout.strip()!r}")
    return job_id


@dataclass(frozen=True)
class NodeState:
    """A Slurm node as ``sinfo`` reports it: its long state (with Slurm's flag suffixes) and reason."""

    node: str
    state: str
    reason: str = ""

    @property
    def problem(self) -> str | None:
        """Why the node is not a healthy member of the cluster (None when it is): the health check's rule.

        Not registered: Slurm has not heard from its slurmd (``unknown``, or ``*``: not responding).
        Out of service: drained, down, failed... (the states where Slurm gives it no new work).
        """
        base = self.state.rstrip("*~#!%$@^-").lower()
        why = f" ({self.reason})" if self.reason and self.reason.lower() != "none" else ""
        if base == "unknown" or self.state.endswith("*"):
            return f"slurmd not registered with slurmctld: state {self.state}{why}"
        if base in _NO_NEW_WORK:
            return f"{base} in Slurm{why}"
        return None


_NODE_FIELDS = "NodeList:|,StateLong:|,Reason:|"


def node_states_argv() -> list[str]:
    """The one ``sinfo`` that tells every node's state (run by :func:`node_states`, or on the controller)."""
    return ["sinfo", "-h", "-N", "-O", _NODE_FIELDS]


def parse_node_states(stdout: str) -> dict[str, NodeState]:
    """{node: NodeState} from the output of :func:`node_states_argv` (a node in two partitions once)."""
    found: dict[str, NodeState] = {}
    for line in stdout.splitlines():
        node, state, reason = ([p.strip() for p in line.split("|")] + ["", "", ""])[:3]
        if node and state and node not in found:
            found[node] = NodeState(node, state, reason)
    return found


def node_states(timeout: float = 10) -> dict[str, NodeState]:
    """Every node's state, asked of slurmctld once (SlurmUnreachable when it does not answer)."""
    argv = node_states_argv()
    return parse_node_states(_run(argv, timeout=timeout).stdout)


def node_states_answer(argv: list[str], returncode: int, stdout: str, stderr: str) -> dict[str, NodeState]:
    """What :func:`node_states` returns, from the answer of its ``sinfo`` run on another host."""
    if returncode != 0:
        _raise_failure(argv, subprocess.CompletedProcess(argv, returncode, stdout, stderr))
    return parse_node_states(stdout)
