"""Ctrl-C and SIGTERM at any moment of start, run, run --wait and stop (issue 14), on the real site.

Each command runs as a terminal runs it: in its own process group, the signal sent to the group.
After each interrupt the invariants hold: every Slurm job named for the session is recorded or
gone, every export of the session's services belongs to a session that shows it ACTIVE, `status`
never shows the dead command's state as live, and `stop` then cleans everything. The same
sweeps through the Workflow Manager service are in test_service_interrupts.py.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from iosea_wf import store as st
from iosea_wf.identity import current_user
from tests.integration.conftest import BIN

GANESHA = "/usr/local/libexec/iosea-wf/ganesha-export"
GANESHA_INSTANCES = "/var/lib/iosea-wf/local/ganesha/*"
USER = current_user()

WDF_STEPS = """\
workflow:
  name: intr
steps:
  - name: long
    location: cpu_module
    command: 'sbatch -o /dev/null --wrap "sleep {sleep}"'
"""

WDF_SERVICE = """\
workflow:
  name: intr_svc
services:
  - name: es1
    type: NFS
    attributes:
      namespace: {ns}
      mountpoint: /mnt/iosea-test/{{{{ SESSION }}}}/es1
steps:
  - name: long
    location: cpu_module
    command: 'sbatch -o /dev/null --wrap "sleep {sleep}"'
    services:
      - name: es1 RW
"""


def _name(tag: str) -> str:
    # A fresh name each time: Slurm still knows the jobs of earlier sessions of a name.
    return f"{tag}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working directory holding both WDFs (sleep 60 steps) and the service's namespace."""
    d = tmp_path / "w"
    (d / "ns").mkdir(parents=True)
    (d / "steps.yaml").write_text(WDF_STEPS.format(sleep=60))
    (d / "short.yaml").write_text(WDF_STEPS.format(sleep=1))
    (d / "svc.yaml").write_text(WDF_SERVICE.format(ns=d / "ns", sleep=60))
    monkeypatch.chdir(d)
    return d


@pytest.fixture
def sessions(iosea_proc, work):
    """Start sessions (stopped with --force afterwards, whatever happened)."""
    names: list[str] = []

    def start(wdf: str, tag: str = "intr") -> str:
        name = _name(tag)
        names.append(name)
        r = iosea_proc("start", f"WORKFLOW={wdf}", f"SESSION={name}", cwd=work)
        assert r.returncode == 0, r.stderr
        return name

    start.names = names  # type: ignore[attr-defined]
    yield start
    for name in names:
        iosea_proc("stop", f"SESSION={name}", "--force", timeout=120)


def as_terminal(cli_env, argv, delay: float, sig: int = signal.SIGINT, cwd=None):
    """Run iosea-wf in its own process group, send ``sig`` to the group after ``delay``.

    Returns (exit code as a shell shows it, seconds from the signal to the exit, stdout+stderr).
    Never before the first line of iosea-wf has run (its handlers set): a signal in Python's own
    start (its site import, the console script's first import; only reached on a loaded
    machine) tests nothing of iosea-wf's, and Python there prints a traceback or even drops it.
    """
    proc = subprocess.Popen(
        [str(BIN / "iosea-wf"), *argv],
        env=cli_env,
        cwd=cwd,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(delay)
    deadline = time.monotonic() + 10
    while sig != signal.SIGKILL and proc.poll() is None and not _iosea_wf_running(proc.pid):
        assert time.monotonic() < deadline, f"{argv} never set its signal handlers"
        time.sleep(0.001)
    sent = time.monotonic()
    with_signal = proc.poll() is None
    if with_signal:
        os.killpg(proc.pid, sig)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{argv} ignored signal {sig} for 30 s: {err}")
    rc = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
    return rc, time.monotonic() - sent, out + err


def _iosea_wf_running(pid: int) -> bool:
    """True once iosea-wf's first line has run: it catches SIGTERM (Python alone never does)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            caught = next(line for line in fh if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)))


def assert_interrupted_well(rc: int, elapsed: float, output: str, sig: int) -> None:
    """Exit 128+sig within 2 s with one line saying what was done (or 0: the command had finished)."""
    assert elapsed < 2.0, f"took {elapsed:.2f}s to exit after the signal: {output}"
    assert "PLAY RECAP" not in output and "Traceback" not in output, output
    if rc == 0:
        return
    assert rc == 128 + sig, output
    lines = [x for x in output.strip().splitlines() if x.startswith("iosea-wf:")]
    assert len(lines) <= 1, output
    if lines:
        assert "interrupted" in lines[0] or "terminated" in lines[0], output


def slurm_jobs(session: str | None = None) -> dict[str, str]:
    """{job id: name} of the unfinished jobs Slurm holds for the session (squeue -h -o '%i %j').

    Without a session: those of every session, for :func:`of` to sort out.
    """
    out = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True, check=True)
    prefix = f"iosea.{session}." if session else "iosea."
    jobs = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].startswith(prefix):
            jobs[parts[0]] = parts[1]
    return jobs


def status(iosea_proc, session: str) -> dict:
    r = iosea_proc("status", f"SESSION={session}", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def exports_of(session: str | None = None) -> list[str]:
    """Keys of the exports the datanodes' ganesha instances hold for the session's services.

    Without a session: those of every session of this user, for :func:`of` to sort out.
    """
    prefix = f"{USER}.{session}." if session else f"{USER}."
    keys = []
    for instance in sorted(glob.glob(GANESHA_INSTANCES)):
        out = subprocess.run(
            [GANESHA, "list", "--instance", instance], capture_output=True, text=True, timeout=30
        )
        if out.returncode == 0 and out.stdout.strip():
            for export in json.loads(out.stdout).get("exports", []):
                if export["key"].startswith(prefix):
                    keys.append(export["key"])
    return keys


def of(session: str, jobs: dict[str, str], exports: list[str]) -> tuple[dict[str, str], list[str]]:
    """The session's share of what ``slurm_jobs()`` and ``exports_of()`` found for all sessions."""
    return (
        {j: n for j, n in jobs.items() if n.startswith(f"iosea.{session}.")},
        [k for k in exports if k.startswith(f"{USER}.{session}.")],
    )


def assert_invariants(iosea_proc, session: str, *, view=None, found=None) -> dict:
    """Every job recorded or gone, every export shown ACTIVE, no dead command shown live.

    ``view`` (the session's status) and ``found`` (``of()`` its jobs and exports) when the caller
    has them already.
    """
    view = view or status(iosea_proc, session)
    jobs, exports = found or (slurm_jobs(session), exports_of(session))
    recorded = {s["job_id"] for s in view["steps"]} | {
        m["job_id"] for s in view["steps"] for m in s["datamovers"]
    }
    # Each service's Slurm allocation (iosea.SESSION.svc.SERVICE) is recorded in its service.
    recorded |= {s["allocation"] for s in view["services"] if s.get("allocation")}
    stray = set(jobs) - recorded
    assert not stray, f"jobs in Slurm that session {session} does not record: {stray}"
    # The command has exited: a STARTING or STOPPING session would be a dead command shown live.
    assert view["state"] not in (st.STARTING, st.STOPPING), view
    if exports and view["state"] == st.FAILED:
        # A teardown cut short, left for `stop` to finish: each service is shown as it is, ACTIVE
        # (its export untouched yet) or STOPPING (its removal begun), never STOPPED with an export.
        assert all(s["state"] in ("ACTIVE", "STOPPING") for s in view["services"]), (view, exports)
        assert "stop" in view["error"], view
    elif exports:
        assert view["state"] == st.ACTIVE, (view, exports)
        assert all(s["state"] == "ACTIVE" for s in view["services"]), (view, exports)
    # Finding 7: never a service shown ACTIVE whose export is gone, in whatever state.
    for svc in view["services"]:
        if svc["state"] == "ACTIVE":
            assert any(k.startswith(f"{USER}.{session}.{svc['name']}.") for k in exports), (view, exports)
    return view


def assert_stop_cleans(iosea_proc, session: str) -> None:
    """`stop --force` leaves no job, no export, and a STOPPED or FAILED session holding nothing."""
    r = iosea_proc("stop", f"SESSION={session}", "--force", timeout=120)
    assert r.returncode in (0, 5), r.stderr  # 5: it was already cleanly FAILED
    deadline = time.monotonic() + 10
    while slurm_jobs(session) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not slurm_jobs(session)
    assert not exports_of(session)
    view = status(iosea_proc, session)
    assert view["state"] in (st.STOPPED, st.FAILED), view


# ---------------------------------------------------------------------------------------------
# run


def test_run_interrupted_at_any_moment_leaves_no_unrecorded_job(sessions, cli_env, iosea_proc, work):
    """Finding 1: Ctrl-C (and SIGTERM) of `run` while it submits: its jobs are recorded or cancelled."""
    session = sessions("steps.yaml", "intr-run")
    # `run` takes about 0.7 s warm: moments over all of it, and past its end. Not before 0.05 s:
    # Python's own start (site, the editable install's import hooks) is no code of iosea-wf's.
    moments = [(d, signal.SIGINT) for d in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.9, 1.2)]
    moments += [(d, signal.SIGTERM) for d in (0.25, 0.45, 0.65)]
    outcomes = []
    for delay, sig in moments:
        rc, elapsed, output = as_terminal(
            cli_env, ["run", f"SESSION={session}", "STEP=long"], delay, sig, cwd=work
        )
        assert_interrupted_well(rc, elapsed, output, sig)
        outcomes.append(rc)
        view = assert_invariants(iosea_proc, session)
        assert view["state"] == st.ACTIVE
    assert any(rc in (130, 143) for rc in outcomes), outcomes
    assert_stop_cleans(iosea_proc, session)


def test_run_wait_obeys_ctrl_c_and_sigterm(sessions, cli_env, iosea_proc, work):
    """Finding 5: `run --wait` exits 130/143 at once, saying the chain keeps running in Slurm."""
    session = sessions("short.yaml", "intr-wait")
    # The chain (a 1 s step) is submitted at about 0.6 s and followed until about 1.7 s: moments
    # over all of it, and past its end.
    moments = [(d, signal.SIGINT) for d in (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.9, 2.4)]
    moments += [(d, signal.SIGTERM) for d in (0.9, 1.5)]
    for delay, sig in moments:
        rc, elapsed, output = as_terminal(
            cli_env, ["run", f"SESSION={session}", "STEP=long", "--wait"], delay, sig, cwd=work
        )
        assert_interrupted_well(rc, elapsed, output, sig)
        if "submitted: jobs" in output and rc != 0:
            assert "keeps running in Slurm" in output and "status" in output, output
        assert_invariants(iosea_proc, session)
    assert_stop_cleans(iosea_proc, session)


# ---------------------------------------------------------------------------------------------
# start


def test_start_interrupted_at_any_moment(cli_env, iosea_proc, work):
    """Finding 10: Ctrl-C of `start` exits 130 in one line (no PLAY RECAP), nothing half started."""
    moments = [(d, signal.SIGINT) for d in (0.1, 0.4, 0.7, 0.9, 1.1, 1.3, 1.5, 1.7, 1.9, 2.3)]
    moments += [(d, signal.SIGTERM) for d in (1.0, 1.6)]
    for delay, sig in moments:
        session = _name("intr-start")
        rc, elapsed, output = as_terminal(
            cli_env, ["start", "WORKFLOW=svc.yaml", f"SESSION={session}"], delay, sig, cwd=work
        )
        try:
            assert_interrupted_well(rc, elapsed, output, sig)
            if "no session named" not in iosea_proc("status", f"SESSION={session}").stderr:
                wait_for_rollback(iosea_proc, session)
                assert_invariants(iosea_proc, session)
        finally:
            iosea_proc("stop", f"SESSION={session}", "--force", timeout=120)
        assert not exports_of(session)


def wait_until_recorded(state_dir, session: str) -> None:
    """Return as soon as the store records the session (STARTING): a start is then under way."""
    store = st.Store(Path(state_dir))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with store.transaction(shared=True) as tx:
            if tx.session(USER, session):
                return
        time.sleep(0.02)
    pytest.fail(f"session {session} was never recorded")


def wait_for_rollback(iosea_proc, session: str) -> None:
    """Wait while the process an interrupted start left to roll back is at work (STOPPING, live)."""
    deadline = time.monotonic() + 20
    while status(iosea_proc, session)["state"] == st.STOPPING:
        assert time.monotonic() < deadline, "the rollback of an interrupted start never ended"
        time.sleep(0.2)


def test_kill_9_of_start_shows_interrupted_and_stop_cleans(cli_env, iosea_proc, work, state_dir):
    """Finding 10: after kill -9 of `start`, status says INTERRUPTED (not STARTING); stop cleans."""
    session = _name("intr-k9")
    starter = subprocess.Popen(
        [str(BIN / "iosea-wf"), "start", "WORKFLOW=svc.yaml", f"SESSION={session}"],
        env=cli_env,
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_recorded(state_dir, session)
        starter.kill()
        starter.wait()
        view = status(iosea_proc, session)
        assert view["state"] == "INTERRUPTED", view
        assert "died" in view["error"] and "stop" in view["error"]
        listed = json.loads(iosea_proc("list", "--json").stdout)["sessions"]
        assert [s["state"] for s in listed if s["session"] == session] == ["INTERRUPTED"]
    finally:
        assert_stop_cleans(iosea_proc, session)


def test_stop_force_during_start_wins(cli_env, iosea_proc, work, state_dir):
    """Finding 3: `stop --force` while `start` runs: the start fails, the session ends STOPPED, clean."""
    session = _name("intr-race")
    starter = subprocess.Popen(
        [str(BIN / "iosea-wf"), "start", "WORKFLOW=svc.yaml", f"SESSION={session}"],
        env=cli_env,
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Once the session is recorded (STARTING), while its service is provisioned.
        wait_until_recorded(state_dir, session)
        time.sleep(0.2)
        stopped = iosea_proc("stop", f"SESSION={session}", "--force", timeout=120)
        _, start_err = starter.communicate(timeout=60)
    finally:
        if starter.poll() is None:
            starter.kill()
    assert stopped.returncode == 0, stopped.stderr
    assert starter.returncode != 0, f"start said it succeeded over a stop: {start_err}"
    view = status(iosea_proc, session)
    assert view["state"] == st.STOPPED, view
    assert all(s["state"] == "STOPPED" for s in view["services"]), view
    assert not exports_of(session)


# ---------------------------------------------------------------------------------------------
# stop


def test_stop_interrupted_at_any_moment(sessions, cli_env, iosea_proc, work):
    """Finding 7: Ctrl-C/SIGTERM of `stop --force`: the session is ACTIVE (untouched) or not shown live."""
    # stop --force takes about 1.3 s here (cancel, the job gone, the export removed): moments over
    # all of it, and past its end.
    moments = [(d, signal.SIGINT) for d in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9, 1.1, 1.8)]
    moments += [(d, signal.SIGTERM) for d in (0.35, 0.7, 1.0)]
    session = None
    for delay, sig in moments:
        session = session or sessions("svc.yaml", "intr-stop")
        r = iosea_proc("run", f"SESSION={session}", "STEP=long", cwd=work)
        assert r.returncode == 0, r.stderr
        rc, elapsed, output = as_terminal(
            cli_env, ["stop", f"SESSION={session}", "--force"], delay, sig, cwd=work
        )
        assert_interrupted_well(rc, elapsed, output, sig)
        view = assert_invariants(iosea_proc, session)
        if rc == 0:
            assert view["state"] == st.STOPPED
        elif view["state"] == st.STOPPED:
            # Cut after its last write (seen on a loaded machine): stopped, with nothing left.
            assert not exports_of(session) and not slurm_jobs(session), view
        else:
            # Given back untouched (ACTIVE), or cut in its teardown: FAILED, no service ACTIVE.
            assert view["state"] in (st.ACTIVE, st.FAILED), view
            assert all(s["state"] != "ACTIVE" for s in view["services"]) or view["state"] == st.ACTIVE
        if view["state"] == st.ACTIVE:
            # Given back untouched: a session like any other, which the next moment stops again.
            continue
        assert_stop_cleans(iosea_proc, session)
        session = None
    if session:
        assert_stop_cleans(iosea_proc, session)


def test_stop_cut_while_it_releases_the_allocations_is_failed_and_stop_finishes_it(
    sessions, iosea_proc, work, state_dir, monkeypatch, capsys
):
    """The one phase a time sweep rarely hits: the exports are gone, the allocations not yet."""
    from iosea_wf import allocations, cli

    session = sessions("svc.yaml", "intr-rel")
    allocation = status(iosea_proc, session)["services"][0]["allocation"]

    def cut_short(*_args, **_kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler raises in here
        raise AssertionError("SIGINT did not interrupt the stop")

    monkeypatch.setattr(allocations, "release", cut_short)
    monkeypatch.setenv("IOSEA_WF_HOME", str(state_dir))
    assert cli.main(["stop", f"SESSION={session}", "--force"]) == 130
    assert "finishes it" in capsys.readouterr().err
    monkeypatch.undo()
    view = assert_invariants(iosea_proc, session)
    # Not a dead stop shown live (INTERRUPTED), nor given back ACTIVE with its export gone.
    assert view["state"] == st.FAILED and "stop" in view["error"], view
    assert allocation in slurm_jobs(session)  # not released: the next stop does it
    assert_stop_cleans(iosea_proc, session)


def test_a_waiting_stop_killed_leaves_the_session_active(sessions, cli_env, iosea_proc, work):
    """Finding 6: a `stop` that only waited for a job and was killed (-9) leaves the session ACTIVE."""
    session = sessions("steps.yaml", "intr-wk")
    r = iosea_proc("run", f"SESSION={session}", "STEP=long", cwd=work)
    assert r.returncode == 0, r.stderr
    rc, _, _ = as_terminal(cli_env, ["stop", f"SESSION={session}"], 1.5, signal.SIGKILL, cwd=work)
    assert rc == 128 + 9
    assert status(iosea_proc, session)["state"] == st.ACTIVE
    r = iosea_proc("run", f"SESSION={session}", "STEP=long", cwd=work)
    assert r.returncode == 0, r.stderr
    # Interrupted the polite way while it waits: ACTIVE again, and it says nothing was torn down.
    rc, elapsed, output = as_terminal(cli_env, ["stop", f"SESSION={session}"], 1.5, cwd=work)
    assert rc == 130 and elapsed < 2.0, output
    assert "nothing was torn down" in output
    assert status(iosea_proc, session)["state"] == st.ACTIVE
    assert_stop_cleans(iosea_proc, session)


def test_a_job_left_in_an_ended_session_can_be_cancelled(sessions, iosea_proc, work, state_dir):
    """Finding 2: a step RUNNING in a STOPPED session (a `run` raced the stop): cancel and stop --force."""
    session = sessions("steps.yaml", "intr-left")
    for command in ("cancel", "stop"):
        r = iosea_proc("run", f"SESSION={session}", "STEP=long", "--json", cwd=work)
        assert r.returncode == 0, r.stderr
        job = json.loads(r.stdout)["job_id"]
        # The state such a race leaves: the session recorded STOPPED while its step still runs.
        store = st.Store(Path(state_dir))
        with store.transaction() as tx:
            record = dict(tx.session(USER, session))
            record["state"] = st.STOPPED
            tx.put_session(record)
        argv = ["cancel", f"SESSION={session}"] if command == "cancel" else ["stop", f"SESSION={session}"]
        r = iosea_proc(*argv, *(["--force"] if command == "stop" else []))
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 10
        while job in slurm_jobs(session) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert job not in slurm_jobs(session)
        with store.transaction() as tx:
            record = dict(tx.session(USER, session))
            record["state"] = st.ACTIVE
            tx.put_session(record)
