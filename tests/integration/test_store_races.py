"""The store never loses an update: many `iosea-wf` processes on one session at once (real Slurm)."""

from __future__ import annotations

import json
import random
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from iosea_wf import slurm
from tests.integration.conftest import BIN

WDF = """\
workflow:
  name: race
steps:
  - name: tick
    location: cpu_module
    command: 'sbatch -o /dev/null --wrap "sleep {sleep}"'
"""


@pytest.fixture
def race(tmp_path, monkeypatch, iosea_proc):
    """An ACTIVE session (no service) of a fresh name, whose step is a short sbatch --wrap."""

    def make(sleep: int = 1) -> str:
        work = tmp_path / "w"
        work.mkdir(exist_ok=True)
        monkeypatch.chdir(work)
        (work / "wdf.yaml").write_text(WDF.format(sleep=sleep))
        name = f"race-{uuid.uuid4().hex[:8]}"  # Slurm still knows the jobs of earlier runs
        r = iosea_proc("start", "WORKFLOW=wdf.yaml", f"SESSION={name}", cwd=work)
        assert r.returncode == 0, r.stderr
        names.append(name)
        return name

    names: list[str] = []
    yield make
    for name in names:
        iosea_proc("stop", f"SESSION={name}", "--force", timeout=120)


def _slurm_jobs(session: str) -> dict[str, tuple[str, str]]:
    """{job id: (name, state)} of every job slurmctld knows whose name is the session's."""
    out = subprocess.run(
        ["squeue", "--states=all", "-h", "-O", "JobID:|,Name:|,State:|"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    jobs = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) >= 3 and parts[1].startswith(f"iosea.{session}."):
            jobs[parts[0]] = (parts[1], parts[2])
    return jobs


def _allocations(iosea_proc, session: str) -> set[str]:
    """Job ids of the Slurm allocations the session's services record (iosea.SESSION.svc.SERVICE)."""
    r = iosea_proc("status", f"SESSION={session}", "--json")
    assert r.returncode == 0, r.stderr
    return {s["allocation"] for s in json.loads(r.stdout)["services"] if s.get("allocation")}


def _steps(iosea_proc, session: str) -> list[dict]:
    r = iosea_proc("status", f"SESSION={session}", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["steps"]


def test_concurrent_run_status_cancel_lose_nothing(race, iosea_proc):
    session = race(sleep=1)
    s = f"SESSION={session}"
    commands = [("run", s, "STEP=tick", "--json")] * 20 + [("status", s, "--json")] * 50
    commands += [("cancel", s, "STEP=tick"), ("cancel", s, "STEP=tick", "--instance", "3"), ("cancel", s)]
    random.Random(12).shuffle(commands)
    t0 = time.monotonic()
    # Eight at a time: every `run` runs a playbook (~1 s of CPU); 2 cores.
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda argv: (argv, iosea_proc(*argv, timeout=120)), commands))
    elapsed = time.monotonic() - t0
    # A cancel of a step may come before any run of it (exit 4); everything else succeeds.
    allowed = {"run": {0}, "status": {0}, "cancel": {0, 4}}
    bad = [(argv, r.returncode, r.stderr) for argv, r in results if r.returncode not in allowed[argv[0]]]
    assert not bad, bad
    runs = [json.loads(r.stdout) for argv, r in results if argv[0] == "run"]
    assert len(runs) == 20

    recorded = _steps(iosea_proc, session)
    numbers = [i["instance"] for i in recorded]
    assert sorted(numbers) == list(range(1, 21)), numbers  # none lost, none repeated
    by_number = {i["instance"]: i for i in recorded}
    for view in runs:
        # every run that exited 0 is exactly one recorded instance, with its job id
        assert view["job_id"] and by_number[view["instance"]]["job_id"] == view["job_id"]
    assert len({v["instance"] for v in runs}) == 20
    store_ids = {i["job_id"] for i in recorded}
    assert all(store_ids) and len(store_ids) == 20
    # every job Slurm knows for the session belongs to an instance of the store
    known = _slurm_jobs(session)
    held = _allocations(iosea_proc, session)
    assert set(known) <= store_ids | held, {j: known[j] for j in set(known) - store_ids - held}

    r = iosea_proc("stop", s, timeout=120)
    assert r.returncode == 0, r.stderr
    # stop waited for every job: none is left pending or running
    states = slurm.job_states(sorted(store_ids))
    assert all(js.terminal for js in states.values()), {j: js.state for j, js in states.items()}
    assert not [j for j, (_, state) in _slurm_jobs(session).items() if state in ("PENDING", "RUNNING")]
    assert elapsed < 75, f"the concurrent calls took {elapsed:.0f} s"


def test_run_racing_stop_is_refused_or_waited_for(race, iosea_proc, cli_env):
    session = race(sleep=1)
    s = f"SESSION={session}"
    runs = [
        subprocess.Popen(
            [str(BIN / "iosea-wf"), "run", s, "STEP=tick", "--json"],
            env=cli_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    time.sleep(1.0)  # some runs are submitting, some not yet at the lock
    stop = iosea_proc("stop", s, timeout=120)
    assert stop.returncode == 0, stop.stderr
    outcomes = [(p.wait(timeout=120), *p.communicate()) for p in runs]
    assert {rc for rc, _, _ in outcomes} <= {0, 5}, outcomes
    for rc, _, err in outcomes:
        if rc == 5:
            assert "not ACTIVE" in err or "were cancelled" in err, err
    # whatever reached Slurm is known to the store and ended before stop returned
    r = iosea_proc("status", s, "--json")
    recorded = json.loads(r.stdout)["steps"]
    store_ids = {i["job_id"] for i in recorded if i["job_id"]}
    known = _slurm_jobs(session)
    assert set(known) <= store_ids | _allocations(iosea_proc, session)
    assert all(state not in ("PENDING", "RUNNING") for _, state in known.values()), known
    assert all(i["state"] not in ("SUBMITTING", "SUBMITTED", "PENDING", "RUNNING") for i in recorded)
    ok = [json.loads(out) for rc, out, _ in outcomes if rc == 0]
    assert {v["instance"] for v in ok} <= {i["instance"] for i in recorded}


def test_run_while_stopping_is_refused_with_exit_5(race, iosea_proc, cli_env):
    session = race(sleep=30)
    s = f"SESSION={session}"
    first = iosea_proc("run", s, "STEP=tick", "--json")
    assert first.returncode == 0, first.stderr
    stop = subprocess.Popen(
        [str(BIN / "iosea-wf"), "stop", s],
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            state = json.loads(iosea_proc("status", s, "--json").stdout)["state"]
            if state == "STOPPING":
                break
            time.sleep(0.2)
        assert state == "STOPPING"
        r = iosea_proc("run", s, "STEP=tick")
        assert r.returncode == 5, (r.returncode, r.stderr)
        assert "STOPPING, not ACTIVE" in r.stderr and "Traceback" not in r.stderr
        assert stop.poll() is None  # stop still waits for the first instance
        assert iosea_proc("cancel", s).returncode == 0
        assert stop.wait(timeout=60) == 0
    finally:
        if stop.poll() is None:
            stop.kill()
    recorded = json.loads(iosea_proc("status", s, "--json").stdout)["steps"]
    assert [i["instance"] for i in recorded] == [1]


def test_stop_ends_a_submission_whose_run_was_killed(race, iosea_proc, cli_env, state_dir):
    session = race(sleep=1)
    s = f"SESSION={session}"
    run = subprocess.Popen(
        [str(BIN / "iosea-wf"), "run", s, "STEP=tick"], env=cli_env, stderr=subprocess.DEVNULL
    )
    db = state_dir / "iosea-wf.json"
    deadline = time.time() + 30
    while time.time() < deadline:
        sessions = json.loads(db.read_text())["sessions"].values()
        steps = next(x for x in sessions if x["name"] == session)["steps"]
        if steps and steps[0]["state"] == "SUBMITTING":
            break
        time.sleep(0.02)
    run.kill()  # kill -9 mid-submission: its ansible-playbook lives on
    run.wait()
    stop = iosea_proc("stop", s, timeout=120)
    assert stop.returncode == 0, stop.stderr
    recorded = json.loads(iosea_proc("status", s, "--json").stdout)["steps"]
    assert len(recorded) == 1 and recorded[0]["state"] != "SUBMITTING", recorded
    time.sleep(3)  # an orphaned playbook that was not ended would submit within this
    known = _slurm_jobs(session)
    # nothing of it runs untracked: every job is in the store, or was cancelled by stop
    untracked = {j: v for j, v in known.items() if j != recorded[0]["job_id"] and v[1] != "CANCELLED"}
    assert not untracked, untracked
    if recorded[0]["state"] == "NOT_SUBMITTED":
        assert "the submitting `run` died" in recorded[0]["reason"]
    else:  # the run recorded its job before it was killed
        assert set(known) <= {recorded[0]["job_id"]} | _allocations(iosea_proc, session)
