"""Site-free checks of how step instances live in the store: submissions in flight, tier directories."""

from __future__ import annotations

import os
import subprocess
import time

from iosea_wf import steps
from iosea_wf import store as st


def _instance(n: int, **extra) -> dict:
    inst = {
        "name": "tick",
        "instance": n,
        "cwd": "/tmp",
        "submitted_at": time.time(),
        "job_id": None,
        "state": None,
        "exit_code": None,
        "datamovers": [],
        "dir": "/tmp",
    }
    inst.update(extra)
    return inst


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_tier_dir_keeps_the_name_and_adds_the_id():
    sid = st.new_session_id()
    assert steps.tier_dir({"name": "run-1", "id": sid}) == f"run-1.{sid[:12]}"
    other = st.new_session_id()
    assert steps.tier_dir({"name": "run-1", "id": other}) != steps.tier_dir({"name": "run-1", "id": sid})


def test_a_submission_in_flight_is_neither_done_nor_an_active_job():
    here = {"pid": os.getpid(), "host": os.uname().nodename}
    session = {"steps": [_instance(1, state=steps.SUBMITTING, submitter=here)]}
    assert [i["instance"] for i in steps.submitting(session)] == [1]
    assert steps.active_jobs(session) == []
    assert not steps.instance_done(session["steps"][0])
    assert steps.view(session["steps"][0])["state"] == "SUBMITTING"
    assert steps.abandoned(session) == []  # its process lives


def test_a_submission_whose_process_died_or_is_overdue_is_abandoned():
    dead = {"pid": _dead_pid(), "host": os.uname().nodename}
    elsewhere = {"pid": os.getpid(), "host": "another-host"}
    session = {
        "steps": [
            _instance(1, state=steps.SUBMITTING, submitter=dead),
            _instance(2, state=steps.SUBMITTING, submitter=elsewhere),
            _instance(3, state=steps.SUBMITTING, submitter=elsewhere, submitted_at=0.0),
        ]
    }
    assert [i["instance"] for i in steps.abandoned(session)] == [1, 3]


def test_not_submitted_is_final_and_not_a_success():
    inst = _instance(4, state=steps.NOT_SUBMITTED, reason="not submitted: sbatch refused")
    assert steps.instance_done(inst) and not steps.instance_succeeded(inst)
    assert steps.active_jobs({"steps": [inst]}) == []


def test_view_says_where_each_mover_writes():
    mover = {
        "name": "archive",
        "service": "es",
        "trigger": "step_stop",
        "operation": "move",
        "target": "tape",
        "target_path": "/tiers/tape/alice/run-1.0123456789ab/es",
        "progress_file": None,
        "output": "/dev/null",
        "job_id": "7",
        "state": None,
        "exit_code": None,
    }
    view = steps.view(_instance(1, job_id="6", datamovers=[mover]))
    assert view["datamovers"][0]["target_path"] == "/tiers/tape/alice/run-1.0123456789ab/es"


def test_pipeline_job_names_are_every_job_of_the_chain():
    pipeline = {
        "start_movers": [{"name": "a", "argv": ["sbatch", "--job-name=iosea.s.t.1.dm.a", "x.sh"]}],
        "step": {"name": "t", "argv": ["sbatch", "--parsable", "--job-name=iosea.s.t.1", "s.sh"]},
        "stop_movers": [{"name": "b", "argv": ["sbatch", "--job-name=iosea.s.t.1.dm.b", "y.sh"]}],
    }
    assert steps._pipeline_names(pipeline) == ["iosea.s.t.1.dm.a", "iosea.s.t.1", "iosea.s.t.1.dm.b"]


def test_mark_not_submitted_changes_only_the_current_record_of_that_instance(tmp_path):
    """The write merges into the record as stored now: an instance added meanwhile survives."""

    class Ctx:
        store = st.Store(tmp_path / "state")

    sid = st.new_session_id()
    record = {"id": sid, "name": "s", "owner": "u", "state": st.ACTIVE, "created_at": 1.0}
    record["steps"] = [_instance(1, state=steps.SUBMITTING)]
    with Ctx.store.transaction() as tx:
        tx.put_session(dict(record))
    # another process records instance 2, already submitted, after ours read the session
    with Ctx.store.transaction() as tx:
        current = dict(tx.sessions.get(st.Query().id == sid))
        current["steps"] = [*current["steps"], _instance(2, job_id="9")]
        tx.put_session(current)
    steps._mark_not_submitted(Ctx, sid, "tick", 1, "not submitted: test")
    steps._mark_not_submitted(Ctx, sid, "tick", 2, "too late")  # it has its jobs: left alone
    with Ctx.store.transaction(shared=True) as tx:
        stored = tx.sessions.get(st.Query().id == sid)["steps"]
    assert [(i["instance"], i["state"], i["job_id"]) for i in stored] == [
        (1, steps.NOT_SUBMITTED, None),
        (2, None, "9"),
    ]
    assert stored[0]["reason"] == "not submitted: test"
