"""The orchestrator's entry point: the ONLY module that calls Ansible (through ansible-runner).

Each call runs one playbook of ``playbooks/`` against the site inventory, in its own
``private_data_dir`` under the state directory, with an ident naming the session and the action;
the directories of finished runs are pruned to the newest :data:`KEEP_RUNS`. Variables are passed
as dicts, never as command strings. Events stream back to a callback while the run goes on;
failures are turned into one readable message per host.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import Interrupted, OrchestrationError
from .identity import current_user
from .procs import alive
from .site import DATA_DIR
from .warm_playbook import idle_seconds

PLAYBOOKS_DIR = DATA_DIR / "playbooks"
ROLES_DIR = DATA_DIR / "roles"

# How many finished runs keep their private directory (events, stdout) under state_dir/runs for
# debugging. ansible-runner's own rotate_artifacts only rotates inside ONE private_data_dir, and
# there it races: concurrent runs (`run` while `status` ...) list and rmtree the same directories.
# Each run keeps its own directory instead (end_orphaned_run finds a run's processes by its path)
# and old finished ones are pruned here, tolerating a concurrent prune.
KEEP_RUNS = 20
# A run directory that never got a final status (its runner was killed) is pruned after this long:
# no playbook of iosea-wf runs for a day.
STALE_RUN_SECONDS = 24 * 3600

# Seconds an interrupted playbook has to end after SIGTERM before it is killed (the interrupted
# command must still exit within 2 s).
INTERRUPT_GRACE = 0.8

# Tasks whose result a role reports back to Python, and the event kind each becomes:
# a service role's last task when its service answers (roles/nfs_service), and the job ids of a
# submitted step (roles/slurm_job).
REPORT_TASKS = {"iosea service ready": "ready", "iosea jobs submitted": "submitted"}


@dataclass
class HostOutcome:
    """What one inventory host (one service pseudo-host) ended with in a run."""

    ok: bool = True
    message: str = ""
    results: dict[str, Any] = field(default_factory=dict)
    # True when the failure is Slurm's refusal of a job (sbatch answered an error), not Ansible's.
    refused_by_slurm: bool = False


@dataclass
class PlaybookResult:
    """The outcome of one playbook run."""

    ident: str
    status: str
    rc: int
    artifacts: str
    hosts: dict[str, HostOutcome]

    @property
    def ok(self) -> bool:
        """True when the run succeeded on every host."""
        return self.status == "successful" and all(h.ok for h in self.hosts.values())

    @property
    def refused_by_slurm(self) -> bool:
        """True when a host failed because Slurm refused a job (roles/slurm_job's sbatch_refused)."""
        return any(not h.ok and h.refused_by_slurm for h in self.hosts.values())


EventCallback = Callable[[str, str, dict[str, Any]], None]


def _failure_message(res: dict[str, Any]) -> str:
    """The most telling message of a failed task result."""
    for key in ("msg", "stderr", "module_stderr", "stdout"):
        value = res.get(key)
        if value:
            text = str(value).strip()
            if key == "msg" and res.get("stderr"):
                text = f"{text}: {str(res['stderr']).strip()}"
            return text.splitlines()[-1] if len(text) > 2000 else text
    return "failed without a message"


def handle_event(
    event: dict[str, Any], hosts: dict[str, HostOutcome], on_event: EventCallback | None = None
) -> None:
    """Fold one ansible-runner event into ``hosts`` and tell ``on_event`` what it means for a host."""
    kind = event.get("event", "")
    data = event.get("event_data") or {}
    host = data.get("host") or ""
    res = data.get("res") or {}
    if kind == "runner_on_ok" and data.get("task") in REPORT_TASKS:
        outcome = hosts.setdefault(host, HostOutcome())
        outcome.results = res.get("msg") if isinstance(res.get("msg"), dict) else {"msg": res.get("msg")}
        if on_event:
            on_event(host, REPORT_TASKS[data["task"]], outcome.results)
    elif kind in ("runner_on_failed", "runner_on_unreachable") and not data.get("ignore_errors"):
        outcome = hosts.setdefault(host, HostOutcome())
        outcome.ok = False
        outcome.message = f"{data.get('task', 'a task')}: {_failure_message(res)}"
        outcome.refused_by_slurm = bool(res.get("sbatch_refused"))
        if on_event:
            on_event(
                host, "failed" if kind == "runner_on_failed" else "unreachable", {"msg": outcome.message}
            )
    elif kind == "runner_on_ok" and host:
        hosts.setdefault(host, HostOutcome())


def prune_runs(state_dir: Path, keep: int | None = None, now: float | None = None) -> list[str]:
    """Delete old run directories under ``state_dir/runs``; return the ones removed.

    Finished runs (ansible-runner wrote their ``status``) beyond the newest ``keep`` (default
    :data:`KEEP_RUNS`) go, and so do unfinished ones older than :data:`STALE_RUN_SECONDS`; a run in
    progress is never touched.
    """
    keep = KEEP_RUNS if keep is None else keep
    now = time.time() if now is None else now
    try:
        entries = [e for e in os.scandir(Path(state_dir) / "runs") if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []
    finished: list[tuple[float, str]] = []
    doomed: list[str] = []
    for entry in entries:
        try:
            finished.append(
                (os.stat(Path(entry.path, "artifacts", entry.name, "status")).st_mtime, entry.path)
            )
        except FileNotFoundError:
            with contextlib.suppress(FileNotFoundError):  # pruned meanwhile by another process
                if now - entry.stat(follow_symlinks=False).st_mtime > STALE_RUN_SECONDS:
                    doomed.append(entry.path)
    finished.sort()
    doomed += [path for _, path in finished[: max(0, len(finished) - keep)]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return sorted(doomed)


class _UntrustedDumper(yaml.SafeDumper):
    """A YAML dumper that tags every string ``!unsafe``: Ansible then never renders it as a template."""


def _represent_untrusted(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # Double quotes escape every control character, so the value reads back exactly.
    return dumper.represent_scalar("!unsafe", value, style='"')


def _represent_mapping(dumper: yaml.SafeDumper, value: dict) -> yaml.MappingNode:
    # Keys are variable and field names: plain, so Ansible looks them up as usual.
    pairs = [
        (yaml.ScalarNode("tag:yaml.org,2002:str", str(k), style='"'), dumper.represent_data(v))
        for k, v in value.items()
    ]
    return yaml.MappingNode("tag:yaml.org,2002:map", pairs, flow_style=False)


def _represent_sequence(dumper: yaml.SafeDumper, value: list | tuple) -> yaml.SequenceNode:
    return dumper.represent_list(list(value))


# Exact types first (SafeDumper's own would win), then subclasses: values read from the site
# inventory or the store may be str/dict subclasses.
for _type, _represent in (
    (str, _represent_untrusted),
    (dict, _represent_mapping),
    (list, _represent_sequence),
    (tuple, _represent_sequence),
):
    _UntrustedDumper.add_representer(_type, _represent)
    _UntrustedDumper.add_multi_representer(_type, _represent)


def untrusted_extravars(extravars: dict[str, Any]) -> str:
    """``extravars`` as the YAML of ansible-runner's ``env/extravars``, every string tagged ``!unsafe``.

    ansible-core 2.19 trusts what it reads from a vars file (ansible-runner passes
    ``-e @env/extravars``) and renders any ``{{ }}`` in it when a role uses the value. Everything
    here comes from users (names, paths, commands), so none of it may ever be a template, even one
    that slipped past validation. Keys are our own names and stay plain.
    """
    return yaml.dump(extravars, Dumper=_UntrustedDumper, default_flow_style=False, allow_unicode=True)


def _no_delay_after_close() -> None:
    """Take out the 0.1 s ptyprocess sleeps in ``close()`` of every playbook ansible-runner ran.

    PtyProcess.close() sleeps ``delayafterclose`` (0.1 s) "to give the kernel time" before it
    checks whether the child still lives. ansible-runner closes the playbook's pty only after
    its loop saw the process end (``while child.isalive()``, then EOF), cancelled runs included,
    so that sleep is pure delay on every `run`, `start` and `stop` (measured: 0.1 s of a 0.45 s
    `run` in-process). Nothing else in iosea-wf uses ptyprocess; a child still alive at close
    would still be terminated (SIGHUP, SIGINT, then SIGKILL, with ptyprocess's own waits).
    """
    import ptyprocess

    if getattr(ptyprocess.PtyProcess, "_iosea_no_close_delay", False):
        return
    original = ptyprocess.PtyProcess.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.delayafterclose = 0.0

    ptyprocess.PtyProcess.__init__ = __init__
    ptyprocess.PtyProcess._iosea_no_close_delay = True


def run_playbook(
    playbook: str,
    *,
    site_path: Path,
    state_dir: Path,
    ident: str,
    extravars: dict[str, Any],
    on_event: EventCallback | None = None,
    verbose: bool = False,
    keep_going: Callable[[], bool] | None = None,
) -> PlaybookResult:
    """Run ``playbooks/<playbook>.yml`` against the site and return per-host outcomes.

    ``on_event(host, kind, data)`` is called as hosts finish tasks: kind is ``ready`` when a
    service role's ready task succeeded (data = its message), ``submitted`` when a step's jobs
    were submitted (data = their ids), ``failed`` or ``unreachable``.

    SIGINT or SIGTERM (in the main thread) ends the playbook and raises :class:`Interrupted`;
    ``keep_going()``, asked every half second, ends it when False (status ``canceled``).
    """
    from .procs import deferred_interrupts

    # Imported here (read-only commands never pay for it), whole: an import cut by Ctrl-C would
    # leave a half-initialised ansible_runner for the rollback's own playbook.
    with deferred_interrupts():
        import ansible_runner

        _no_delay_after_close()

    private_dir = Path(state_dir) / "runs" / ident
    private_dir.mkdir(parents=True, exist_ok=True)
    # Written here rather than handed to ansible-runner, which writes it as plain (trusted) JSON;
    # rewritten on every run, so a reused ident never sees stale values.
    env_dir = private_dir / "env"
    env_dir.mkdir(exist_ok=True)
    try:
        # Who runs the playbook tells the roles whether a privileged action is done directly or
        # through the site's privileged helpers (the service's account: iosea_wf/privileged.py).
        (env_dir / "extravars").write_text(
            untrusted_extravars({**extravars, "iosea_controller_user": current_user()})
        )
    except yaml.YAMLError as exc:  # a value that is not data (a bug of the caller, never of a user)
        raise OrchestrationError(f"cannot run the playbook {playbook}: {exc}") from None
    hosts: dict[str, HostOutcome] = {}

    def handle(event: dict[str, Any]) -> bool:
        handle_event(event, hosts, on_event)
        return True

    bin_dir = str(Path(sys.executable).parent)
    envvars = {
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "ANSIBLE_ROLES_PATH": str(ROLES_DIR),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
    }
    # A warm ansible-playbook (iosea_wf/warm_playbook.py) saves its ~0.4 s of start-up on every
    # run after the first; ansible-runner runs it as its `binary`, so nothing else changes.
    warm = Path(bin_dir) / "iosea-wf-ansible-playbook"
    binary = str(warm) if idle_seconds() > 0 and warm.exists() else None
    started = time.time()
    signals: list[int] = []
    previous = _catch_signals(signals)
    if signals:  # interrupted before the run began: it never starts
        _restore_signals(previous)
        raise Interrupted(signals[0])

    asked = [time.monotonic()]

    def cancel() -> bool:
        # ansible-runner would SIGKILL the playbook's process group at once (and, given no
        # callback, install signal handlers it never restores): the playbook gets SIGTERM and a
        # moment to end instead, and whatever it leaves is found by its caller.
        stop = bool(signals)
        if not stop and keep_going is not None and time.monotonic() - asked[0] > 0.5:
            asked[0] = time.monotonic()
            stop = not keep_going()
        if stop:
            end_orphaned_run(state_dir, ident, grace=INTERRUPT_GRACE)
        return stop

    try:
        runner = ansible_runner.run(
            private_data_dir=str(private_dir),
            project_dir=str(PLAYBOOKS_DIR),
            playbook=f"{playbook}.yml",
            binary=binary,
            # With a `binary`, ansible-runner leaves the playbook out of the command: give it here.
            cmdline=shlex.quote(f"{playbook}.yml") if binary else None,
            inventory=str(site_path),
            envvars=envvars,
            ident=ident,
            quiet=not verbose,
            forks=16,
            event_handler=handle,
            cancel_callback=cancel,
            # How often ansible-runner calls `cancel` (its default, 5 s, would delay an interrupt).
            settings={"suppress_ansible_output": not verbose, "pexpect_timeout": 0.1},
        )
    except Exception as exc:  # ansible-runner raises bare exceptions for setup problems
        raise OrchestrationError(f"cannot run the playbook {playbook}: {exc}") from None
    finally:
        _restore_signals(previous)
    if signals:
        prune_runs(state_dir)
        raise Interrupted(signals[0])
    artifacts = str(private_dir / "artifacts" / ident)
    result = PlaybookResult(
        ident=ident, status=runner.status, rc=runner.rc or 0, artifacts=artifacts, hosts=hosts
    )
    if runner.status != "successful" and not any(not h.ok for h in hosts.values()):
        # The run failed before any host reported (syntax error, missing role, ...).
        tail = (runner.stdout.read() if runner.stdout else "").strip().splitlines()[-5:]
        hosts["(playbook)"] = HostOutcome(
            ok=False,
            message=f"{playbook} ended {runner.status} (rc={runner.rc}) after {time.time() - started:.1f}s: "
            + " | ".join(tail),
        )
    prune_runs(state_dir)
    return result


def _catch_signals(caught: list[int]) -> dict:
    """While a playbook runs, SIGINT and SIGTERM are noted in ``caught`` (the run is then ended).

    Only in the main thread (a service runs playbooks in worker threads: no signal reaches them).
    Returns the handlers to restore.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}

    def note(signum, _frame):
        caught.append(signum)

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    for handler in previous.values():
        # A signal held by procs.deferred_interrupts before the run began: it ends the run too.
        caught.extend(getattr(handler, "caught", [])[:1])
    return previous


def _restore_signals(previous: dict) -> None:
    import signal

    for sig, handler in previous.items():
        signal.signal(sig, handler)


def end_orphaned_run(state_dir: Path, ident: str, grace: float = 5.0) -> int:
    """Stop what is left of a run whose caller died (e.g. ``kill -9`` of ``iosea-wf start``).

    ansible-playbook outlives a killed parent; tearing services down while it still provisions
    would race with it. Its processes are found by the run's private directory on their command
    line, terminated, and waited for. Returns how many were found.
    """
    import os
    import signal

    marker = str(Path(state_dir) / "runs" / ident)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                if marker.encode() in fh.read():
                    found.append(int(entry))
        except OSError:
            continue
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + grace
        while time.time() < deadline and any(alive(p) for p in found):
            time.sleep(0.1)
    return len(found)
