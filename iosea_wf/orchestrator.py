"""The orchestrator's entry point: the ONLY module that calls Ansible (through ansible-runner).

Each call runs one playbook of ``playbooks/`` against the site inventory, in its own
``private_data_dir`` under the state directory, with an ident naming the session and the action.
Variables are passed as dicts, never as command strings. Events stream back to a callback while the
run goes on; failures are turned into one readable message per host.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import OrchestrationError
from .procs import alive
from .site import PACKAGE_ROOT
from .warm_playbook import idle_seconds

PLAYBOOKS_DIR = PACKAGE_ROOT / "playbooks"
ROLES_DIR = PACKAGE_ROOT / "roles"

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


def run_playbook(
    playbook: str,
    *,
    site_path: Path,
    state_dir: Path,
    ident: str,
    extravars: dict[str, Any],
    on_event: EventCallback | None = None,
    verbose: bool = False,
) -> PlaybookResult:
    """Run ``playbooks/<playbook>.yml`` against the site and return per-host outcomes.

    ``on_event(host, kind, data)`` is called as hosts finish tasks: kind is ``ready`` when a
    service role's ready task succeeded (data = its message), ``submitted`` when a step's jobs
    were submitted (data = their ids), ``failed`` or ``unreachable``.
    """
    import ansible_runner  # imported here: read-only commands never pay for it

    private_dir = Path(state_dir) / "runs" / ident
    private_dir.mkdir(parents=True, exist_ok=True)
    # Written here rather than handed to ansible-runner, which writes it as plain (trusted) JSON,
    # and only when that file is missing: rewriting it also keeps a reused ident from stale values.
    env_dir = private_dir / "env"
    env_dir.mkdir(exist_ok=True)
    (env_dir / "extravars").write_text(untrusted_extravars(extravars))
    hosts: dict[str, HostOutcome] = {}

    def handle(event: dict[str, Any]) -> bool:
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
            if on_event:
                on_event(
                    host, "failed" if kind == "runner_on_failed" else "unreachable", {"msg": outcome.message}
                )
        elif kind == "runner_on_ok" and host:
            hosts.setdefault(host, HostOutcome())
        return True

    bin_dir = str(Path(sys.executable).parent)
    envvars = {
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "ANSIBLE_ROLES_PATH": str(ROLES_DIR),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_HOST_KEY_CHECKING": "False",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
    }
    # A warm ansible-playbook (iosea_wf/warm_playbook.py) saves its ~0.4 s of start-up on every
    # run after the first; ansible-runner runs it as its `binary`, so nothing else changes.
    warm = Path(bin_dir) / "iosea-wf-ansible-playbook"
    binary = str(warm) if idle_seconds() > 0 and warm.exists() else None
    started = time.time()
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
            settings={"suppress_ansible_output": not verbose},
        )
    except Exception as exc:  # ansible-runner raises bare exceptions for setup problems
        raise OrchestrationError(f"cannot run the playbook {playbook}: {exc}") from None
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
    return result


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
