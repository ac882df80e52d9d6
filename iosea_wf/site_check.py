"""A sysadmin's health check of a whole site: ``iosea-wf site check``.

Every host of the inventory is probed at once, in parallel, outside Ansible: one run of
:mod:`iosea_wf.site_probe` per host, in-process for hosts with ``ansible_connection: local``,
else over SSH with fabric (one command per host, host keys checked against the host's known-hosts
file: an unknown or changed host key is refused, never added). What one host tells is judged
with what the others tell:

- ``reachable``: the probe ran there and answered.
- ``munge``: the key is the same on every host (compared by an HMAC with a one-time nonce, never
  shown) and munged there encodes and decodes a credential.
- ``clock``: within :data:`CLOCK_TOLERANCE_S` of the median of every host's clock (see there).
- ``slurmctld`` (the controller) and ``slurmd`` (every host of ``compute`` and ``datanodes``): one
  ``sinfo`` on the controller (:mod:`iosea_wf.slurm` builds it and reads its answer) says each
  node is registered and not drained, down or failed.
- ``ganesha`` (datanodes): the host's nfs-ganesha instance answers a real NFSv4 listing and a
  MOUNT call, or is idle and ready (it starts with its first export).
- ``tier NAME`` (where data movers write: the controller, which makes each user's tier
  directory, and the datanodes, where data movers run): present, writable, enterable by users.
- ``workflow_manager`` (its host): the service at ``IOSEA_WF_URL`` or ``iosea_wm_url`` answers.

Nothing here prints or exits: the CLI prints the :class:`Report`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shlex
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import site_probe, slurm
from .errors import IoseaError
from .identity import CREDENTIAL_TTL
from .site import COMPUTE_GROUP, DATANODES_GROUP, Host, load_site_hosts

OK, FAIL, SKIP = "ok", "FAIL", "skip"
DEFAULT_TIMEOUT = 10.0
CONTROLLER_GROUP = "slurm_controller"
WM_GROUP = "workflow_manager"

# MUNGE accepts a credential on a host whose clock is up to its TTL behind the encoding host's,
# and for TTL - d seconds on one d seconds ahead (munged's dec_v1_validate_time). The shortest TTL
# on a site is the Workflow Manager's (identity.CREDENTIAL_TTL, 60 s; Slurm's is munge's default
# 300 s). Every host within TTL/4 of the median of all clocks puts any two hosts within TTL/2 of
# each other, so every credential of the site stays valid for at least 30 s wherever it is decoded.
CLOCK_TOLERANCE_S = CREDENTIAL_TTL / 4


@dataclass(frozen=True)
class Check:
    """One line of the report: a check of one host."""

    host: str
    check: str
    status: str
    detail: str

    def __post_init__(self) -> None:
        # One line per host and check: a command's multi-line message (sinfo's) is folded.
        object.__setattr__(self, "detail", " ".join(self.detail.split()))


@dataclass
class Report:
    """The outcome of a site check: every line, and enough to say what failed."""

    site: str
    hosts: list[str]
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0
    clock_tolerance_s: float = CLOCK_TOLERANCE_S

    @property
    def failed(self) -> list[Check]:
        """The checks that did not pass."""
        return [c for c in self.checks if c.status == FAIL]

    @property
    def ok(self) -> bool:
        """True when every check passed (skipped ones do not count)."""
        return not self.failed

    def clock_rule(self) -> str:
        """The clock tolerance, and why."""
        return (
            f"clocks within {self.clock_tolerance_s:g} s of the site's median, so any two within "
            f"{2 * self.clock_tolerance_s:g} s: half the {CREDENTIAL_TTL} s TTL of the Workflow Manager's "
            "MUNGE credentials (munge's default TTL, Slurm's, is 300 s)"
        )

    def summary(self) -> str:
        """One line: how many checks passed and which failed."""
        counted = [c for c in self.checks if c.status != SKIP]
        head = f"{len(counted)} checks on {len(self.hosts)} hosts in {self.seconds:.2f} s"
        if self.ok:
            return f"{head}: all passed"
        by_host: dict[str, list[str]] = {}
        for c in self.failed:
            by_host.setdefault(c.host, []).append(c.check)
        named = [
            f"{host} (unreachable)" if "reachable" in checks else f"{host} ({', '.join(checks)})"
            for host, checks in by_host.items()
        ]
        return f"{head}: {len(self.failed)} FAILED: {'; '.join(named)}"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``--json``)."""
        return {
            "site": self.site,
            "ok": self.ok,
            "hosts": self.hosts,
            "seconds": round(self.seconds, 3),
            "clock_tolerance_s": self.clock_tolerance_s,
            "clock_rule": self.clock_rule(),
            "checks": [asdict(c) for c in self.checks],
            "failed": len(self.failed),
            "summary": self.summary(),
        }


@dataclass
class _Outcome:
    """What probing one host gave: the probe's answer, or why there is none, and when it ran."""

    answer: dict[str, Any] | None = None
    error: str = ""
    how: str = ""
    sent: float = 0.0
    received: float = 0.0


def check_site(site_dir: str | os.PathLike | None = None, timeout: float = DEFAULT_TIMEOUT) -> Report:
    """Probe every host of the site in parallel and judge the answers together."""
    from .api.settings import configured_url

    started = time.monotonic()
    site, hosts, groups = load_site_hosts(site_dir)
    nonce = secrets.token_hex(16)
    controller = next(iter(groups.get(CONTROLLER_GROUP, [])), None)
    wm_host = next(iter(groups.get(WM_GROUP, [])), None)
    url = configured_url(site_dir)
    # A unix:// socket the inventory names is on the Workflow Manager's host; one IOSEA_WF_URL names
    # is where this client would use it, here; http:// is asked from here, as a login node asks it.
    wm_here = bool(url) and (
        not url.startswith("unix://") or bool(os.environ.get("IOSEA_WF_URL", "").strip())
    )
    wm_remote = bool(url) and not wm_here and wm_host is not None
    node_hosts = set(groups.get(COMPUTE_GROUP, [])) | set(groups.get(DATANODES_GROUP, []))
    tier_hosts = set(groups.get(CONTROLLER_GROUP, [])) | set(groups.get(DATANODES_GROUP, []))
    datanode_hosts = set(groups.get(DATANODES_GROUP, []))
    tiers = [{"name": t.name, "path": t.path} for t in site.tiers.values()]

    requests = {}
    for name, host in hosts.items():
        request: dict[str, Any] = {
            "nonce": nonce,
            "timeout": timeout,
            "munge": {
                "key_file": host.settings.get("munge_key_file"),
                "socket": host.settings.get("munge_socket"),
            },
        }
        if name in tier_hosts:
            request["tiers"] = tiers
        if name in datanode_hosts:
            request["ganesha"] = {
                "instance_dir": host.settings.get("nfs_ganesha_instance_dir"),
                "address": host.settings.get("nfs_ganesha_address"),
                "port": host.settings.get("nfs_ganesha_port"),
                "mount_port": host.settings.get("nfs_ganesha_mount_port"),
            }
        if wm_remote and name == wm_host:
            request["wm"] = url
        if name == controller and not host.local:
            request["run"] = {"slurm": slurm.node_states_argv()}
        requests[name] = request

    calls: dict[str, Any] = {name: (_probe, host, requests[name], timeout) for name, host in hosts.items()}
    if controller and hosts[controller].local:
        calls[" slurm"] = (_local_node_states, timeout)
    if wm_here:
        calls[" wm"] = (site_probe.workflow_manager, url, timeout)
    results = _in_parallel(calls)
    outcomes = {
        name: _Outcome(error=f"the probe failed: {type(r).__name__}: {r}") if isinstance(r, Exception) else r
        for name, r in ((name, results[name]) for name in hosts)
    }
    states = results.get(" slurm")
    if isinstance(states, Exception) and not isinstance(states, IoseaError):
        states = IoseaError(f"asking Slurm failed: {type(states).__name__}: {states}")
    wm_answer = results.get(" wm")
    if isinstance(wm_answer, Exception):
        wm_answer = {"error": f"asking {url} failed: {type(wm_answer).__name__}: {wm_answer}"}

    if controller and not hosts[controller].local:
        states = _remote_node_states(outcomes[controller])
    report = Report(site=str(site.path), hosts=list(hosts))
    munge_lines = _munge_checks(hosts, outcomes, controller)
    clock_lines = _clock_checks(outcomes)
    for name in hosts:
        outcome = outcomes[name]
        answer = outcome.answer or {}
        report.checks.append(
            Check(name, "reachable", FAIL if outcome.error else OK, outcome.error or outcome.how)
        )
        report.checks.append(munge_lines[name])
        report.checks.append(clock_lines[name])
        if name == controller:
            report.checks.append(_slurmctld_check(name, states))
        if name in node_hosts:
            report.checks.append(_slurmd_check(name, states))
        if name in datanode_hosts:
            report.checks.append(_ganesha_check(name, outcome, answer.get("ganesha")))
        if name in tier_hosts:
            report.checks.extend(_tier_checks(name, outcome, tiers, answer.get("tiers")))
        if name == wm_host and wm_remote:
            report.checks.append(_wm_check(name, url, answer.get("wm"), outcome))
    if wm_here:
        report.checks.append(_wm_check(wm_host or "(this machine)", url, wm_answer, None))
    elif url and wm_host is None:
        report.checks.append(
            Check(
                "(site)",
                "workflow_manager",
                FAIL,
                f"iosea_wm_url is {url}, a socket of the Workflow Manager's host, but the inventory has "
                f"no host in its {WM_GROUP} group",
            )
        )
    elif not url:
        report.checks.append(
            Check(
                wm_host or "(site)",
                "workflow_manager",
                SKIP,
                "the inventory names no Workflow Manager (iosea_wm_url): the CLI works in-process",
            )
        )
    report.seconds = time.monotonic() - started
    return report


# ---------------------------------------------------------------------------------------------
# probing


def _in_parallel(calls: dict[str, tuple]) -> dict[str, Any]:
    """{name: fn(*args)} of every ``name: (fn, *args)``, all run at once in daemon threads.

    Daemon threads, not a ThreadPoolExecutor: on Ctrl-C the command ends at once (the executor's
    exit would wait for every SSH probe to time out). Each call handles its own errors.
    """
    import threading

    results: dict[str, Any] = {}

    def run(name: str, fn: Any, *args: Any) -> None:
        try:
            results[name] = fn(*args)
        except Exception as exc:  # a bug or an unforeseen library error is that call's failure only
            results[name] = exc

    threads = [
        threading.Thread(target=run, args=(name, *call), name=f"site-check {name}", daemon=True)
        for name, call in calls.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def _probe(host: Host, request: dict[str, Any], timeout: float) -> _Outcome:
    """Run the probe on one host: in-process for a local connection, else over SSH."""
    if host.local:
        sent = time.time()
        try:
            answer = site_probe.probe(request)
        except Exception as exc:  # a probe bug is one host's failure, not the whole check's
            return _Outcome(error=f"the probe failed here: {type(exc).__name__}: {exc}", sent=sent)
        received = time.time()
        return _Outcome(
            answer=answer,
            how=f"local connection: probed on this machine without SSH ({received - sent:.2f} s)",
            sent=sent,
            received=received,
        )
    return _ssh_probe(host, request, timeout)


def _probe_command(host: Host, request: dict[str, Any]) -> str:
    """The one remote command: the host's Python reading the probe from stdin, the request its argument.

    Nothing depends on the remote shell's startup files or PATH: an absolute interpreter, ``-I``
    (no user site, no PYTHON* variables), and the request as one quoted word (data, never code).
    """
    argv = [host.python, "-I", "-", json.dumps(request, sort_keys=True)]
    if host.become:
        argv = ["sudo", "-n", "--", *argv]
    return shlex.join(argv)


_PROBE_SOURCE: str | None = None


def _probe_source() -> str:
    global _PROBE_SOURCE
    if _PROBE_SOURCE is None:
        _PROBE_SOURCE = Path(site_probe.__file__).read_text(encoding="utf-8")
    return _PROBE_SOURCE


def _ssh_probe(host: Host, request: dict[str, Any], timeout: float) -> _Outcome:
    """Probe a host over SSH with fabric, its host key checked (RejectPolicy: unknown or changed refused)."""

    from fabric import Config, Connection

    # paramiko logs a failed handshake with its traceback; with no logging configured Python would
    # print that on stderr. The report's line says what failed.
    quiet = logging.getLogger("paramiko")
    if not any(isinstance(h, logging.NullHandler) for h in quiet.handlers):
        quiet.addHandler(logging.NullHandler())
    from paramiko import AuthenticationException, BadHostKeyException, RejectPolicy, SSHException

    where = f"{host.user + '@' if host.user else ''}{host.address}:{host.port}"
    known = [path for path in host.known_hosts if os.path.isfile(path)]
    if not known:
        return _Outcome(
            error=f"ssh {where}: no known-hosts file ({', '.join(host.known_hosts)}): its host key cannot "
            "be checked, so it is not contacted (set iosea_ssh_known_hosts)"
        )
    connect_kwargs: dict[str, Any] = {
        "allow_agent": host.key_file is None,
        "look_for_keys": host.key_file is None,
        # paramiko waits 15 s for a banner and 30 s for authentication by default: a host that
        # accepts TCP and says nothing must not hold the check past --timeout.
        "banner_timeout": timeout,
        "auth_timeout": timeout,
    }
    if host.key_file:
        connect_kwargs["key_filename"] = host.key_file
    # No ~/.ssh/config nor /etc/ssh/ssh_config: the inventory alone says how to reach the host.
    config = Config(overrides={"load_ssh_configs": False})
    conn = Connection(
        host.address,
        user=host.user,
        port=host.port,
        connect_timeout=max(1, math.ceil(timeout)),
        connect_kwargs=connect_kwargs,
        config=config,
    )
    # fabric's Connection adds unknown host keys (AutoAddPolicy): never here.
    conn.client.set_missing_host_key_policy(RejectPolicy())
    deadline = time.monotonic() + timeout
    try:
        for path in known:
            try:
                conn.client.load_host_keys(path)
            except (OSError, SSHException) as exc:
                return _Outcome(error=f"ssh {where}: cannot read the known-hosts file {path}: {exc}")
        try:
            conn.open()
        except BadHostKeyException as exc:
            offered = f"{exc.key.get_name()} {_fingerprint(exc.key)}"
            return _Outcome(
                error=f"ssh {where}: host key MISMATCH: the host offers {offered}, {', '.join(known)} "
                f"expects {_fingerprint(exc.expected_key)}: refused (a reinstalled host, or someone "
                "in the middle: check before you fix known_hosts)"
            )
        except AuthenticationException:
            return _Outcome(
                error=f"ssh {where}: authentication refused"
                + (f" with key {host.key_file}" if host.key_file else "")
            )
        except SSHException as exc:
            if "not found in known_hosts" in str(exc):
                return _Outcome(
                    error=f"ssh {where}: host key unknown to {', '.join(known)}: refused "
                    "(host keys are checked, never added)"
                )
            return _Outcome(error=f"ssh {where}: {exc}")
        except (TimeoutError, OSError) as exc:
            return _Outcome(error=f"ssh {where}: cannot connect: {getattr(exc, 'strerror', None) or exc}")
        sent = time.time()
        try:
            exited, stdout, stderr = _exec(conn, _probe_command(host, request), _probe_source(), deadline)
        except TimeoutError:
            return _Outcome(error=f"ssh {where}: the probe did not answer within {timeout:g} s")
        except (OSError, SSHException) as exc:
            return _Outcome(error=f"ssh {where}: the probe's session failed: {exc}")
        received = time.time()
    finally:
        conn.close()
    if exited != 0:
        said = (stderr.strip().splitlines() or ["no message"])[-1]
        return _Outcome(error=f"ssh {where}: the probe exited {exited}: {said}")
    try:
        answer = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return _Outcome(error=f"ssh {where}: the probe printed no JSON answer")
    return _Outcome(
        answer=answer,
        how=f"ssh {where}, host key checked against {', '.join(known)} ({received - sent:.2f} s)",
        sent=sent,
        received=received,
    )


def _exec(conn: Any, command: str, program: str, deadline: float) -> tuple[int, str, str]:
    """Run one command on fabric's open connection, the program on its stdin; (exit status, stdout, stderr).

    Straight on the connection's transport rather than ``Connection.run``, whose stdin thread
    (invoke's, 1,000 bytes every 10 ms) failed here with "Socket is closed" on the probe's 15 KB.
    TimeoutError (``socket.timeout``) once ``deadline`` passes.
    """
    channel = conn.transport.open_session(timeout=max(0.5, deadline - time.monotonic()))
    try:
        channel.settimeout(max(0.5, deadline - time.monotonic()))
        channel.exec_command(command)
        channel.sendall(program.encode())
        channel.shutdown_write()
        out, err = bytearray(), bytearray()
        while True:
            chunk = channel.recv(65536)
            if not chunk:
                break
            out += chunk
            channel.settimeout(max(0.1, deadline - time.monotonic()))
        while channel.recv_stderr_ready():
            err += channel.recv_stderr(65536)
        status = channel.recv_exit_status()
        return status, out.decode(errors="replace"), err.decode(errors="replace")
    finally:
        channel.close()


def _fingerprint(key: Any) -> str:
    try:
        return key.fingerprint  # "SHA256:...", as ssh-keygen -l shows it (paramiko >= 3.2)
    except AttributeError:
        return key.get_base64()[:24] + "..."


def _local_node_states(timeout: float) -> dict[str, slurm.NodeState] | IoseaError:
    try:
        return slurm.node_states(timeout=timeout)
    except IoseaError as exc:
        return exc


def _remote_node_states(outcome: _Outcome) -> dict[str, slurm.NodeState] | IoseaError:
    if outcome.error:
        return IoseaError(f"the controller is unreachable ({outcome.error})")
    ran = (outcome.answer or {}).get("run", {}).get("slurm", {})
    if "error" in ran:
        return IoseaError(f"on the controller: {ran['error']}")
    try:
        return slurm.node_states_answer(ran["argv"], ran["returncode"], ran["stdout"], ran["stderr"])
    except IoseaError as exc:
        return exc
    except KeyError:
        return IoseaError("the controller's probe gave no answer of sinfo")


# ---------------------------------------------------------------------------------------------
# judging


def _unreached(outcome: _Outcome) -> str:
    return "not checked: the host did not answer"


def _munge_checks(
    hosts: dict[str, Host], outcomes: dict[str, _Outcome], controller: str | None
) -> dict[str, Check]:
    """The munge line of each host: its own munged, and its key against every other host's."""
    hmacs = {
        name: (o.answer or {}).get("munge", {}).get("key_hmac")
        for name, o in outcomes.items()
        if not o.error and (o.answer or {}).get("munge", {}).get("key_hmac")
    }
    counts: dict[str, int] = {}
    for value in hmacs.values():
        counts[value] = counts.get(value, 0) + 1
    # The reference key: the one most hosts have; on a tie, the controller's.
    reference = None
    if counts:
        best = max(counts.values())
        tied = [v for v, n in counts.items() if n == best]
        reference = hmacs.get(controller) if controller in hmacs and hmacs[controller] in tied else tied[0]
    lines = {}
    for name in hosts:
        outcome = outcomes[name]
        if outcome.error:
            lines[name] = Check(name, "munge", FAIL, _unreached(outcome))
            continue
        found = (outcome.answer or {}).get("munge", {})
        problems = [found[k] for k in ("key_error", "munged_error") if k in found]
        mine = hmacs.get(name)
        if mine is not None and mine != reference:
            same = sorted(h for h, v in hmacs.items() if v == reference)
            problems.append(
                f"its key differs from the one of {len(same)} other host(s) ({_few(same)}): "
                "munged there refuses this host's credentials"
            )
        if problems:
            lines[name] = Check(name, "munge", FAIL, "; ".join(problems))
        else:
            lines[name] = Check(
                name,
                "munge",
                OK,
                f"key identical on all {counts.get(reference, 0)} hosts that answered (one-time HMACs "
                "compared, the key never shown); munged encodes and decodes",
            )
    return lines


def _few(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _clock_checks(outcomes: dict[str, _Outcome]) -> dict[str, Check]:
    """Each host's clock against the median of all: within CLOCK_TOLERANCE_S (see there)."""
    offsets = {}
    for name, o in outcomes.items():
        if not o.error and o.answer and "time" in o.answer:
            # The probe read its clock between `sent` and `received` by this machine's clock.
            offsets[name] = (float(o.answer["time"]) - (o.sent + o.received) / 2, (o.received - o.sent) / 2)
    median = statistics.median(v for v, _ in offsets.values()) if offsets else 0.0
    lines = {}
    for name, o in outcomes.items():
        if name not in offsets:
            lines[name] = Check(name, "clock", FAIL, _unreached(o) if o.error else "the probe gave no time")
            continue
        offset, error = offsets[name]
        off_median = offset - median
        detail = (
            f"{off_median:+.3f} s from the site's median (±{error:.3f} s), tolerance {CLOCK_TOLERANCE_S:g} s"
        )
        status = OK if abs(off_median) <= CLOCK_TOLERANCE_S else FAIL
        if status == FAIL:
            detail = "clock off: " + detail
        lines[name] = Check(name, "clock", status, detail)
    return lines


def _slurmctld_check(name: str, states: Any) -> Check:
    if isinstance(states, IoseaError):
        return Check(name, "slurmctld", FAIL, states.message)
    if states is None:
        return Check(name, "slurmctld", FAIL, "Slurm was not asked")
    return Check(name, "slurmctld", OK, f"slurmctld answers: {len(states)} node(s) in sinfo")


def _slurmd_check(name: str, states: Any) -> Check:
    if isinstance(states, IoseaError):
        return Check(name, "slurmd", FAIL, f"unknown: {states.message}")
    if states is None:
        return Check(name, "slurmd", FAIL, "unknown: the inventory has no slurm_controller to ask")
    node = states.get(name)
    if node is None:
        return Check(
            name, "slurmd", FAIL, "not a node of Slurm (sinfo does not list it: slurm.conf lacks it)"
        )
    if node.problem:
        return Check(name, "slurmd", FAIL, node.problem)
    return Check(name, "slurmd", OK, f"registered, {node.state}")


def _ganesha_check(name: str, outcome: _Outcome, found: dict[str, Any] | None) -> Check:
    if outcome.error:
        return Check(name, "ganesha", FAIL, _unreached(outcome))
    if not found:
        return Check(name, "ganesha", FAIL, "the probe gave no answer for nfs-ganesha")
    where = f"{found.get('address')}:{found.get('port')}"
    if found.get("error"):
        return Check(name, "ganesha", FAIL, f"{found['error']}")
    if found.get("state") == "running":
        return Check(
            name,
            "ganesha",
            OK,
            f"answers NFSv4 at {where} and MOUNT v3 at port {found.get('mount_port')} "
            f"(pid {found.get('pid')}, {found.get('exports')} export(s))",
        )
    return Check(
        name,
        "ganesha",
        OK,
        f"idle, ready: no export, so no server (the first export starts it at {where}); rpcbind "
        f"answers, ganesha.nfsd installed, ports {found.get('port')}/{found.get('mount_port')} free",
    )


def _tier_checks(
    name: str, outcome: _Outcome, tiers: list[dict[str, str]], found: list[dict[str, Any]] | None
) -> list[Check]:
    if outcome.error or found is None:
        why = _unreached(outcome) if outcome.error else "the probe gave no answer for the tiers"
        return [Check(name, f"tier {t['name']}", FAIL, why) for t in tiers]
    lines = []
    for entry in found:
        label = f"tier {entry['name']}"
        if entry.get("error"):
            lines.append(Check(name, label, FAIL, f"{entry['path']}: {entry['error']}"))
            continue
        free = entry.get("free_bytes")
        room = f", {free / 2**30:.1f} GiB free" if isinstance(free, int) else ""
        lines.append(
            Check(name, label, OK, f"{entry['path']}: present, writable, mode {entry.get('mode')}{room}")
        )
    return lines


def _wm_check(name: str, url: str, found: dict[str, Any] | None, outcome: _Outcome | None) -> Check:
    if outcome is not None and outcome.error:
        return Check(name, "workflow_manager", FAIL, _unreached(outcome))
    if not found:
        return Check(name, "workflow_manager", FAIL, f"no answer from {url}")
    if found.get("error"):
        return Check(name, "workflow_manager", FAIL, found["error"])
    return Check(
        name,
        "workflow_manager",
        OK,
        f"answers at {url}: {found.get('title')} API v{found.get('version')} "
        f"({found.get('seconds', 0):.2f} s)",
    )
