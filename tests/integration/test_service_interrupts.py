"""Ctrl-C and kill -9 of the CLI at any moment of start, run, run --wait and stop, through a service.

Issue 14, the service's side: a client of the Workflow Manager that dies only stops waiting. The
service carries the change it was given on to its end and records it, and the client's last line
says so (or that nothing was sent). Each client runs as a terminal runs it, in its own process
group, the signal sent to the group. After each, through the service: every Slurm job of the
session is recorded or gone, every export belongs to a session that shows it ACTIVE, the
service's work ends (no session STARTING or STOPPING once it is done, never INTERRUPTED: the
service did not die), and `stop` then cleans everything.

Kept cheap: the service's work for one client goes on while the next client runs (checked once it
has settled), the sessions the start sweep leaves ACTIVE are the ones the stop sweep stops, and
run and run --wait share one session.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from iosea_wf import store as st
from tests.api_service import need_munge, running_service
from tests.integration.conftest import BIN
from tests.integration.test_interrupts import (
    _name,
    as_terminal,
    assert_interrupted_well,
    assert_invariants,
    exports_of,
    of,
    slurm_jobs,
    status,
)

# The long step stays in Slurm for the whole sweep (a job nobody records would still be seen);
# the short one runs on the other module, so the long ones never keep it pending.
WDF = """\
workflow:
  name: intr_wm
services:
  - name: es1
    type: NFS
    attributes:
      namespace: {ns}/{{{{ SESSION }}}}
      mountpoint: /mnt/iosea-test/{{{{ SESSION }}}}/es1
steps:
  - name: long
    location: cpu_module
    command: 'sbatch -o /dev/null --wrap "sleep 60"'
    services:
      - name: es1 RW
  - name: short
    location: gpu_module
    command: 'sbatch -o /dev/null --wrap "sleep 1"'
"""

SENT = "goes on with"  # the client's line once the service has the whole request
KILL = signal.SIGKILL


class Service:
    """A private `iosea-wf serve` and the environment of root's CLI talking to it."""

    def __init__(self, env: dict[str, str], work: Path, log: Path):
        self.env, self.work, self.log = env, work, log

    def __call__(self, *argv: str, timeout: float = 120, cwd=None) -> subprocess.CompletedProcess:
        """Run `iosea-wf ARGV` through the service."""
        return subprocess.run(
            [str(BIN / "iosea-wf"), *map(str, argv)],
            env=self.env,
            cwd=cwd or self.work,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def popen(self, *argv: str) -> subprocess.Popen:
        """Start `iosea-wf ARGV` through the service, its output captured."""
        return subprocess.Popen(
            [str(BIN / "iosea-wf"), *argv],
            env=self.env,
            cwd=self.work,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def new_session(self, tag: str) -> str:
        """A fresh session name, its namespace made."""
        name = _name(tag)
        (self.work / "ns" / name).mkdir(parents=True)
        return name

    def start(self, name: str) -> subprocess.CompletedProcess:
        """Start ``name`` (uninterrupted)."""
        return self("start", "WORKFLOW=wm.yaml", f"SESSION={name}")

    def settled(self, session: str, timeout: float = 40) -> dict | None:
        """Status once the service's work on the session has ended (None: it never recorded it).

        While it works the session may be STARTING or STOPPING, or an instance SUBMITTING: that
        is live work of a live process, never INTERRUPTED.
        """
        deadline = time.monotonic() + timeout
        while True:
            r = self("status", f"SESSION={session}", "--json")
            if r.returncode != 0:
                assert "no session named" in r.stderr, r.stderr
                return None
            view = json.loads(r.stdout)
            assert view["state"] != "INTERRUPTED", (view, self.log.read_text()[-3000:])
            busy = view["state"] in (st.STARTING, st.STOPPING) or any(
                s["state"] == "SUBMITTING" for s in view["steps"]
            )
            if not busy:
                return view
            assert time.monotonic() < deadline, f"the service's work never ended: {view}"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def wm(inprocess_site, tmp_path_factory):
    """A private service for the module, on the in-process twin of the local site."""
    need_munge()
    folder = Path(tempfile.mkdtemp(prefix="iosea-wf-wm-", dir="/tmp"))
    work = tmp_path_factory.mktemp("wm-intr")
    (work / "ns").mkdir()
    (work / "wm.yaml").write_text(WDF.format(ns=work / "ns"))
    env = {k: v for k, v in os.environ.items() if k != "IOSEA_WF_HOME"}
    env["IOSEA_WF_URL"] = f"unix://{folder / 'wm.sock'}"
    env["IOSEA_WF_SITE"] = str(inprocess_site)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    try:
        with running_service(folder / "wm.sock", folder / "state", "--site", str(inprocess_site)):
            service = Service(env, work, folder / "wm.log")
            yield service
            # Whatever a failed test left live goes before its store does (exports are real).
            listed = service("list", "--json")
            for row in json.loads(listed.stdout or '{"sessions": []}')["sessions"]:
                service("stop", f"SESSION={row['session']}", "--force")
            # Clients that died never made the service err.
            log = service.log.read_text()
            assert "Traceback" not in log and "internal error" not in log, log[-5000:]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def active(wm):
    """One ACTIVE session of the module's service (run and run --wait share it), stopped afterwards."""
    name = wm.new_session("wm-run")
    r = wm.start(name)
    assert r.returncode == 0, r.stderr
    yield name
    wm("stop", f"SESSION={name}", "--force")


def cut(wm: Service, argv: list[str], delay: float, sig: int) -> tuple[int, str]:
    """Run a client as a terminal does, signal its group after ``delay``; check it ended well.

    Delay 0: the moment iosea-wf's first line has run, surely before it sent anything.
    """
    rc, elapsed, output = as_terminal(wm.env, argv, delay, sig, cwd=wm.work)
    assert_interrupted_well(rc, elapsed, output, sig)
    if rc == 128 + signal.SIGINT and "iosea-wf:" in output:
        # Said whether the service has the request; never a message of an in-process rollback.
        told = (SENT, "nothing was", "may not have reached", "keeps running in Slurm")
        assert any(words in output for words in told), output
        assert "torn down" not in output, output
    return rc, output


def asked(rc: int, output: str) -> bool | None:
    """Whether the service got the client's request: True, False, or None when nobody can tell."""
    if rc == 0 or SENT in output or "keeps running in Slurm" in output:
        return True
    # The client's own words before it sent anything, or the CLI's before it even loaded; never the
    # CLI's "nothing was left half done", also said of a command cut once its request was answered.
    if rc == 128 + signal.SIGINT and ("nothing was sent" in output or ": nothing was done" in output):
        return False
    return None  # killed (-9), cut while it sent, or cut after the answer


def snapshot() -> tuple[dict[str, str], list[str]]:
    """Every session's unfinished jobs in Slurm and exports on the datanodes, in one look."""
    return slurm_jobs(), exports_of()


# ---------------------------------------------------------------------------------------------


def test_start_and_stop_clients_cut_at_any_moment(wm):
    """A start's client cut at any moment: the service ends it ACTIVE; a stop's: it ends it STOPPED."""
    # start takes about 1.2 s through the service, the request sent at about 0.15 s: moments
    # over all of it, and past its end.
    moments = [(d, signal.SIGINT) for d in (0.0, 0.1, 0.15, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95, 1.1, 1.5)]
    moments += [(d, KILL) for d in (0.12, 0.45, 0.9)]
    started: dict[str, bool | None] = {}
    try:
        for delay, sig in moments:
            name = wm.new_session("wm-start")
            started[name] = asked(*cut(wm, ["start", "WORKFLOW=wm.yaml", f"SESSION={name}"], delay, sig))
            r = wm("status", f"SESSION={name}", "--json")
            if r.returncode == 0:  # the service's start may still be at work: live, never otherwise
                assert json.loads(r.stdout)["state"] in (st.STARTING, st.ACTIVE), r.stdout
        views = {name: wm.settled(name) for name in started}
        found = snapshot()
        active = []
        for name, view in views.items():
            jobs, exports = of(name, *found)
            if view is None:
                assert started[name] is not True, f"{name}: the service had the start and did not record it"
                assert not exports, exports
                continue
            # Whoever listened, the service finished the start: ACTIVE, its export there.
            assert started[name] is not False, f"{name}: started with no request sent: {view}"
            assert view["state"] == st.ACTIVE, view
            assert [s["state"] for s in view["services"]] == ["ACTIVE"] and len(exports) == 1, view
            assert_invariants(wm, name, view=view, found=(jobs, exports))
            active.append(name)
        assert True in started.values() and False in started.values(), started

        # stop --force takes about 1.4 s (a job to cancel, the export to remove), the request sent
        # at about 0.15 s: moments over all of it, and past its end.
        moments = [(d, signal.SIGINT) for d in (0.0, 0.1, 0.15, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.2, 1.7)]
        moments += [(d, KILL) for d in (0.25, 0.7)]
        runs = [wm.popen("run", f"SESSION={name}", "STEP=long") for name in active]
        for proc in runs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
        stopped: dict[str, bool | None] = {}  # each session's last stop: was it asked?
        outcomes = []
        name = None
        for delay, sig in moments:
            if name is None:
                name = active.pop(0) if active else None
            if name is None:  # the start sweep left too few: one more, with its job
                name = wm.new_session("wm-stop")
                started[name] = True
                assert wm.start(name).returncode == 0
                assert wm("run", f"SESSION={name}", "STEP=long").returncode == 0
            stopped[name] = asked(*cut(wm, ["stop", f"SESSION={name}", "--force"], delay, sig))
            outcomes.append(stopped[name])
            view = status(wm, name)
            assert view["state"] in (st.ACTIVE, st.STOPPING, st.STOPPED), view
            assert view["state"] == st.ACTIVE or stopped[name] is not False, view
            if stopped[name] is not False:
                name = None  # else never asked: untouched, the next moment stops it
        views = {name: wm.settled(name) for name in stopped}
        found = snapshot()
        for name, view in views.items():
            jobs, exports = of(name, *found)
            if stopped[name]:
                # The service had the stop: it ended it, whoever listened.
                assert view["state"] == st.STOPPED and not jobs and not exports, (view, jobs, exports)
            elif stopped[name] is False:
                assert view["state"] == st.ACTIVE and jobs and exports, (view, jobs, exports)
            assert_invariants(wm, name, view=view, found=(jobs, exports))
        assert True in outcomes and False in outcomes, outcomes
    finally:
        # `stop` then cleans everything: all at once (the service stops them side by side).
        cleanup = {name: wm.popen("stop", f"SESSION={name}", "--force") for name in started}
        ends = {name: (proc.communicate(timeout=120)[1], proc.returncode) for name, proc in cleanup.items()}
    for err, rc in ends.values():
        assert rc in (0, 4, 5), err  # 4: never recorded; 5: already STOPPED
    deadline = time.monotonic() + 10
    while any(of(name, slurm_jobs(), [])[0] for name in started) and time.monotonic() < deadline:
        time.sleep(0.3)  # cancelled jobs leave squeue a moment after scancel
    found = snapshot()
    for name in started:
        assert of(name, *found) == ({}, []), name
        view = wm.settled(name)
        assert view is None or view["state"] == st.STOPPED, view


def test_stop_force_during_a_start_through_the_service(wm):
    """Finding 3 through the service: `stop --force` while a start runs wins; the start says so."""
    name = wm.new_session("wm-race")
    starter = wm.popen("start", "WORKFLOW=wm.yaml", f"SESSION={name}")
    try:
        deadline = time.monotonic() + 20
        while wm("status", f"SESSION={name}").returncode != 0:
            assert time.monotonic() < deadline, "the start was never recorded"
        time.sleep(0.2)  # while its service is provisioned
        stopped = wm("stop", f"SESSION={name}", "--force")
        _, start_err = starter.communicate(timeout=60)
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait()
    assert stopped.returncode == 0, stopped.stderr
    assert starter.returncode != 0, f"start said it succeeded over a stop: {start_err}"
    assert "stopped by another command" in start_err, start_err
    view = status(wm, name)
    assert view["state"] == st.STOPPED, view
    assert all(s["state"] == "STOPPED" for s in view["services"]), view
    assert not exports_of(name)


def test_run_client_cut_at_any_moment(wm, active):
    """Finding 1 through the service: a run's client cut anywhere; its jobs are recorded, never half."""
    # run takes about 0.65 s through the service, the request sent at about 0.15 s: moments over
    # all of it, and past its end.
    moments = [(d, signal.SIGINT) for d in (0.0, 0.1, 0.13, 0.16, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8)]
    moments += [(d, KILL) for d in (0.15, 0.35)]
    outcomes = []
    before = len(status(wm, active)["steps"])
    for delay, sig in moments:
        outcomes.append(asked(*cut(wm, ["run", f"SESSION={active}", "STEP=long"], delay, sig)))
        view = wm.settled(active)
        assert_invariants(wm, active, view=view)
        assert view["state"] == st.ACTIVE, view
        # The service never leaves a submission half done for a client that went away.
        assert all(s["state"] != "NOT_SUBMITTED" for s in view["steps"]), view
        if outcomes[-1]:
            # Submitted whole, and left to run: the service undoes nothing for a client gone.
            new = view["steps"][-1]
            assert len(view["steps"]) == before + 1 and new["job_id"], view
            assert new["state"] in ("SUBMITTED", "PENDING", "RUNNING"), view
        elif outcomes[-1] is False:
            assert len(view["steps"]) == before, view
        before = len(view["steps"])
    assert True in outcomes and False in outcomes, outcomes
    r = wm("cancel", f"SESSION={active}")
    assert r.returncode == 0, r.stderr


def test_run_wait_client_cut_at_any_moment(wm, active):
    """Finding 5 through the service: run --wait's client cut anywhere; the chain runs on, recorded."""
    # Submitted at about 0.6 s, the chain (a 1 s step) is followed until about 2 s.
    moments = [(d, signal.SIGINT) for d in (0.1, 0.2, 0.35, 0.5, 0.7, 0.9, 1.1, 1.3, 1.5, 1.7, 2.2)]
    moments += [(d, KILL) for d in (0.4, 1.2)]
    for delay, sig in moments:
        rc, output = cut(wm, ["run", f"SESSION={active}", "STEP=short", "--wait"], delay, sig)
        if "submitted: jobs" in output and rc == 128 + signal.SIGINT:
            assert "keeps running in Slurm" in output and "status" in output, output
        view = wm.settled(active)
        assert_invariants(wm, active, view=view)
        assert view["state"] == st.ACTIVE, view
        assert all(s["state"] != "NOT_SUBMITTED" for s in view["steps"]), view
