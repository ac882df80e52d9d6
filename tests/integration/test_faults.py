"""Faults of the site's daemons (issue 14): states stay honest while slurmctld or a ganesha is gone.

These tests stop daemons every user of this machine shares (the site's slurmctld, one of its
nfs-ganesha instances) for a few seconds, and restart each in a ``finally``, by pid, with the
command line, environment and working directory it had: what an operator's restart does.
Each outage is kept short (well under 20 s): other work on the site only waits.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from iosea_wf import slurm
from tests.integration import sides as two_ways
from tests.integration.conftest import BIN

_cli = two_ways.cli
sides = two_ways.sides  # the fixture: the CLI in-process and through a private service

# The lock the ganesha control script holds while it starts a server (rpcbind is one per machine).
GANESHA_START_LOCK = "/run/lock/iosea-wf-ganesha-start.lock"


@dataclass
class Daemon:
    """How a running daemon was started: enough to start it again the same way."""

    pid: int
    argv: list[str]
    env: dict[str, str]
    cwd: str

    @classmethod
    def of(cls, pid: int) -> Daemon:
        """Read the command line, environment and working directory of process ``pid``."""
        proc = Path(f"/proc/{pid}")
        argv = proc.joinpath("cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        env = dict(
            item.split(b"=", 1) for item in proc.joinpath("environ").read_bytes().split(b"\0") if b"=" in item
        )
        return cls(
            pid,
            [a.decode() for a in argv],
            {k.decode(): v.decode() for k, v in env.items()},
            os.readlink(proc / "cwd"),
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        """Send ``sig`` and wait until the process is gone (a zombie counts as gone)."""
        os.kill(self.pid, sig)
        deadline = time.monotonic() + timeout
        while _alive(self.pid):
            assert time.monotonic() < deadline, (
                f"{self.argv[0]} (pid {self.pid}) still runs {timeout} s after {sig}"
            )
            time.sleep(0.05)

    def start(self) -> None:
        """Start it again as it was started (both daemons fork into the background by themselves)."""
        subprocess.run(
            self.argv, env=self.env, cwd=self.cwd, check=True, timeout=30, stdin=subprocess.DEVNULL
        )


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] not in ("Z", "X")


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# slurmctld


def _slurmctld() -> Daemon:
    """The slurmctld the Slurm clients here talk to: the pid in its slurm.conf's SlurmctldPidFile."""
    conf = os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")
    pid_file = next(
        line.split("=", 1)[1].strip()
        for line in Path(conf).read_text().splitlines()
        if line.strip().startswith("SlurmctldPidFile=")
    )
    daemon = Daemon.of(int(Path(pid_file).read_text().strip()))
    assert Path(daemon.argv[0]).name == "slurmctld" and conf in daemon.argv, daemon.argv
    return daemon


@contextmanager
def slurmctld_down() -> Iterator[float]:
    """slurmctld stopped (SIGTERM, it saves its state) inside; started again as it was, afterwards."""
    daemon = _slurmctld()
    t0 = time.monotonic()
    daemon.stop()
    try:
        yield t0
    finally:
        daemon.start()
        _wait(slurm.controller_up, 30, "slurmctld did not answer 30 s after its restart")
        assert time.monotonic() - t0 < 20, f"slurmctld was down {time.monotonic() - t0:.1f} s"


WDF_JOBS = """\
workflow:
  name: faults
steps:
  - name: long
    location: cpu_module
    command: "sbatch -o /dev/null long.sh"
  - name: later
    location: cpu_module
    command: "sbatch -o /dev/null --begin=now+600 long.sh"
"""


def _states(env, cwd, session) -> dict[str, str]:
    r = _cli(env, cwd, "status", f"SESSION={session}", "--json")
    assert r.returncode == 0, r.stderr
    return {s["name"]: s["state"] for s in json.loads(r.stdout)["steps"]}


def test_with_slurmctld_down_status_shows_last_known_states_and_stop_says_so(tmp_path, sides):
    work = tmp_path / "work"
    work.mkdir()
    (work / "wf.yaml").write_text(WDF_JOBS)
    (work / "long.sh").write_text("#!/bin/bash\nsleep 600\n")
    followers: dict[str, tuple[subprocess.Popen, object]] = {}
    try:
        for name, env in sides.items():
            assert _cli(env, work, "start", "WORKFLOW=wf.yaml", "SESSION=fault").returncode == 0
            for step in ("long", "later"):
                r = _cli(env, work, "run", "SESSION=fault", f"STEP={step}")
                assert r.returncode == 0, (name, r.stderr)
        # Seen live once by status, which records them as the last known states.
        for name, env in sides.items():
            _wait(
                lambda env=env: _states(env, work, "fault") == {"long": "RUNNING", "later": "PENDING"},
                60,
                f"{name}: the steps are not RUNNING and PENDING",
            )
        # A `run --wait` following a step that stays PENDING, each way: it is told about the outage.
        for name, env in sides.items():
            log = open(tmp_path / f"follow-{name}.err", "w+")  # noqa: SIM115 (closed below)
            proc = subprocess.Popen(
                [str(BIN / "iosea-wf"), "run", "SESSION=fault", "STEP=later", "--wait"],
                env=env,
                cwd=work,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
            followers[name] = (proc, log)

        def said(name: str, text: str) -> bool:
            proc, log = followers[name]
            log.seek(0)
            return text in log.read() or proc.poll() is not None

        for name in sides:
            _wait(lambda name=name: said(name, "step later: PENDING"), 30, f"{name}: no PENDING shown")
        with slurmctld_down():
            for name, env in sides.items():
                r = _cli(env, work, "status", "SESSION=fault", "--json")
                assert r.returncode == 0, (name, r.stderr)
                view = json.loads(r.stdout)
                assert view["slurm_reachable"] is False, (name, view)
                assert {s["name"]: s["state"] for s in view["steps"]} == {
                    "long": "RUNNING",
                    "later": "PENDING",
                }
                assert "warning: Slurm is unreachable" in r.stderr, (name, r.stderr)
                r = _cli(env, work, "status", "SESSION=fault")
                assert r.returncode == 0 and "RUNNING" in r.stdout and "SUBMITTED" not in r.stdout, (name, r)
                assert "warning: Slurm is unreachable" in r.stderr, (name, r.stderr)

                # (Through the service, the CLI's `scontrol token` first waits its 5 s for slurmctld.)
                t0 = time.monotonic()
                r = _cli(env, work, "stop", "SESSION=fault", timeout=30)
                took = time.monotonic() - t0
                assert r.returncode == 8, (name, r.returncode, r.stderr)
                assert "Slurm is unreachable" in r.stderr and "nothing was stopped" in r.stderr, (
                    name,
                    r.stderr,
                )
                assert took < 30, (name, took)
                if name == "in-process":  # once is enough: each call through the service costs 5 s
                    r = _cli(env, work, "stop", "SESSION=fault", "--force", "--json", timeout=30)
                    assert r.returncode == 8 and json.loads(r.stdout)["error"]["exit_code"] == 8, (name, r)
                    t0 = time.monotonic()
                    r = _cli(env, work, "cancel", "SESSION=fault", timeout=30)
                    assert r.returncode == 8 and "Slurm is unreachable" in r.stderr, (name, r)
                    assert time.monotonic() - t0 < 5, "cancel waited for Slurm's retries"
                # Nothing changed: the session is still ACTIVE (list reads the store, no Slurm).
                listed = json.loads(_cli(env, work, "list", "--json").stdout)["sessions"]
                assert [s["state"] for s in listed if s["session"] == "fault"] == ["ACTIVE"], (name, listed)
            # Checked last, when the outage is several seconds old.
            for name in sides:
                _wait(
                    lambda name=name: said(name, "warning: Slurm is unreachable"),
                    5,
                    f"{name}: run --wait did not say Slurm is unreachable",
                )
        for name, (proc, log) in followers.items():
            _wait(lambda name=name: said(name, "Slurm answers again"), 15, f"{name}: no 'answers again'")
            assert proc.poll() is None, (name, proc.returncode)
            os.killpg(proc.pid, signal.SIGINT)
            assert proc.wait(5) == 130
            log.seek(0)
            text = log.read()
            assert "its chain keeps running in Slurm" in text and "Traceback" not in text, (name, text)
        for name, env in sides.items():
            view = json.loads(_cli(env, work, "status", "SESSION=fault", "--json").stdout)
            assert view["slurm_reachable"] is True and view["warnings"] == [], (name, view)
            assert {s["state"] for s in view["steps"]} == {"RUNNING", "PENDING"}, (name, view)
    finally:
        for proc, log in followers.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
            log.close()
        for env in sides.values():
            _cli(env, work, "stop", "SESSION=fault", "--force")


# ---------------------------------------------------------------------------------------------
# nfs-ganesha


def _ganesha_of(port: int) -> Daemon:
    """The ganesha.nfsd whose instance (the directory of its -f conf) serves NFS on ``port``."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = proc.joinpath("cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv[0].endswith(b"ganesha.nfsd") or b"-f" not in argv:
            continue
        conf = Path(argv[argv.index(b"-f") + 1].decode())
        settings = json.loads(conf.with_name("instance.json").read_text())
        if settings["port"] == port and _alive(int(proc.name)):
            return Daemon.of(int(proc.name))
    raise AssertionError(f"no ganesha.nfsd serves port {port}")


@contextmanager
def ganesha_killed(ports: set[int], answers) -> Iterator[None]:
    """The ganesha instances of these ports killed (SIGKILL) inside; started again as they were after."""
    daemons = [_ganesha_of(p) for p in sorted(ports)]
    t0 = time.monotonic()
    for d in daemons:
        d.stop(signal.SIGKILL)
    try:
        yield
    finally:
        # As the control script starts one: under its machine-wide lock, with no stale pid file.
        with open(GANESHA_START_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for d in daemons:
                pid_file = Path(d.argv[d.argv.index("-p") + 1])
                if pid_file.exists() and pid_file.read_text().strip() == str(d.pid):
                    pid_file.unlink()
                d.start()
            _wait(answers, 20, "the restarted ganesha instances do not answer")
        assert time.monotonic() - t0 < 20, f"ganesha was down {time.monotonic() - t0:.1f} s"


WDF_NFS = """\
workflow:
  name: lost
services:
  - name: es
    type: NFS
    attributes:
      namespace: {ns}
      mountpoint: /mnt/iosea-test/{{{{ SESSION }}}}/es
steps:
  - name: s
    location: cpu_module
    command: "sbatch true.sh"
    services:
      - name: es RW
"""


def test_a_killed_ganesha_shows_its_services_lost_until_it_answers_again(tmp_path, sides):
    work = tmp_path / "work"
    work.mkdir()
    services = {}
    try:
        for name, env in sides.items():
            ns = tmp_path / f"ns-{name}"
            ns.mkdir()
            (work / f"{name}.yaml").write_text(WDF_NFS.format(ns=ns))
            r = _cli(env, work, "start", f"WORKFLOW={name}.yaml", "SESSION=lost", "--json")
            assert r.returncode == 0, r.stderr
            services[name] = json.loads(r.stdout)["services"][0]
        ports = {int(s["url"].split("nfsport=")[1].split("&")[0]) for s in services.values()}

        def all_active() -> bool:
            return all(
                json.loads(_cli(env, work, "status", "SESSION=lost", "--json").stdout)["services"][0]["state"]
                == "ACTIVE"
                for env in sides.values()
            )

        assert all_active()
        with ganesha_killed(ports, all_active):
            for name, env in sides.items():
                t0 = time.monotonic()
                r = _cli(env, work, "status", "SESSION=lost", "--json")
                assert r.returncode == 0 and time.monotonic() - t0 < 5, (name, r.stderr)
                svc = json.loads(r.stdout)["services"][0]
                assert svc["state"] == "LOST", (name, svc)
                assert "does not answer" in svc["error"] and svc["datanode"] in svc["error"], (name, svc)
                r = _cli(env, work, "status", "SESSION=lost")
                assert "LOST" in r.stdout and "lost     es: the NFS server" in r.stdout, (name, r.stdout)
                # list never probes: it shows the recorded state.
                listed = json.loads(_cli(env, work, "list", "--json").stdout)["sessions"]
                assert [s["services"][0]["state"] for s in listed if s["session"] == "lost"] == ["ACTIVE"]
        # Restarted with its exports: ACTIVE again (LOST is what status sees, never recorded).
        assert all_active()
    finally:
        stopped = [_cli(env, work, "stop", "SESSION=lost") for env in sides.values()]
        assert [r.returncode for r in stopped] == [0, 0], [r.stderr for r in stopped]


def test_the_nfs_probe_tells_a_missing_export_from_a_silent_server(tmp_path, cli_env):
    from iosea_wf.service_types import nfs

    # A live session of this test's own keeps its datanode's ganesha running (an instance stops
    # by itself when its last export is removed): "gone" asks that server for an export it lacks.
    work = tmp_path / "work"
    work.mkdir()
    ns = tmp_path / "ns"
    ns.mkdir()
    (work / "wdf.yaml").write_text(WDF_NFS.format(ns=ns))
    r = _cli(cli_env, work, "start", "WORKFLOW=wdf.yaml", "SESSION=probe", "--json")
    assert r.returncode == 0, r.stderr
    try:
        svc = json.loads(r.stdout)["services"][0]
        port = int(svc["url"].split("nfsport=")[1].split("&")[0])
        base = {"type": "NFS", "address": "127.0.0.1", "datanode": svc["datanode"]}
        _probe_a_missing_export_a_silent_and_a_refusing_server(nfs, base, port)
    finally:
        r = _cli(cli_env, work, "stop", "SESSION=probe")
        assert r.returncode == 0, r.stderr


def _probe_a_missing_export_a_silent_and_a_refusing_server(nfs, base, port) -> None:
    with socket.socket() as silent, socket.socket() as closed:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # accepts connections (the kernel does), never answers a call
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        records = [
            {**base, "name": "gone", "port": port, "pseudo": "/iosea/no-such-owner-here/key"},
            {**base, "name": "silent", "port": silent.getsockname()[1], "pseudo": "/iosea/u/k"},
            {**base, "name": "refused", "port": closed.getsockname()[1], "pseudo": "/iosea/u/k"},
        ]
        t0 = time.monotonic()
        lost = nfs.probe(records, timeout=1.0)
        took = time.monotonic() - t0
    assert took < 1.5, f"the probes were not bounded by their timeout, or not run at once: {took:.2f} s"
    assert "no longer serves its export /iosea/no-such-owner-here/key" in lost["gone"], lost
    assert "did not answer within 1 s" in lost["silent"], lost
    assert "does not answer: Failed to mount" in lost["refused"], lost
