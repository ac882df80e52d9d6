"""How Slurm's answers fold into a step instance, and what status shows of it (no site needed)."""

from __future__ import annotations

import json
import os

import pytest

from iosea_wf import steps
from iosea_wf.errors import SessionNotFound, UsageError
from iosea_wf.slurm import JobState


def _instance(step_state=None, *, movers=(("stage", "step_start"), ("archive", "step_stop")), n=1):
    """A recorded instance: step job 10, its movers 11, 12, ... (as steps.submit records it)."""
    return {
        "name": "step_B",
        "instance": n,
        "submitted_at": 1000.0,
        "job_id": "10",
        "state": step_state,
        "exit_code": None,
        "datamovers": [
            {
                "name": name,
                "service": "es",
                "trigger": trigger,
                "operation": "copy",
                "target": "flash",
                "job_id": str(11 + i),
                "state": None,
                "exit_code": None,
                "progress_file": None,
            }
            for i, (name, trigger) in enumerate(movers)
        ],
    }


def test_running_jobs_are_live_states_not_recorded_ones():
    inst = _instance()
    changed = steps._apply(
        inst, {"10": JobState("10", "PENDING", reason="Dependency"), "11": JobState("11", "RUNNING")}
    )
    assert changed is True  # new live states: recorded, the last known ones while Slurm is unreachable
    assert inst["state"] is None and inst["live_state"] == "PENDING" and inst["reason"] == "Dependency"
    v = steps.view(inst)
    assert v["state"] == "PENDING"
    assert [m["state"] for m in v["datamovers"]] == ["RUNNING", "SUBMITTED"]
    # The same answer again learns nothing: a poll writes the store only when something changed.
    again = {"10": JobState("10", "PENDING", reason="Dependency"), "11": JobState("11", "RUNNING")}
    assert steps._apply(inst, again) is False


def test_a_cancelled_step_is_cancelled_not_skipped():
    # `cancel` while the step_start mover ran: every job of the instance was asked to cancel.
    inst = _instance()
    for entry in [inst, *inst["datamovers"]]:
        entry["cancelled_at"] = 2000.0
    states = {j: JobState(j, "CANCELLED", 0, 15) for j in ("10", "11", "12")}
    assert steps._apply(inst, states) is True
    v = steps.view(inst)
    assert v["state"] == "CANCELLED", v
    assert [m["state"] for m in v["datamovers"]] == ["CANCELLED", "CANCELLED"]
    # The step answered before its cancel reached it (DependencyNeverSatisfied): not SKIPPED either.
    inst = _instance()
    for entry in [inst, *inst["datamovers"]]:
        entry["cancelled_at"] = 2000.0
    steps._apply(
        inst,
        {
            "11": JobState("11", "CANCELLED"),
            "10": JobState("10", "PENDING", reason="DependencyNeverSatisfied"),
        },
    )
    assert inst["state"] is None and not steps.instance_done(inst)
    # `stop --force` (no cancel recorded): a step whose step_start mover was cancelled, not failed.
    inst = _instance()
    steps._apply(inst, {j: JobState(j, "CANCELLED") for j in ("10", "11", "12")})
    assert inst["state"] == "CANCELLED"


def test_final_states_are_recorded_once_with_exit_codes():
    inst = _instance()
    states = {
        "10": JobState("10", "COMPLETED", 0, 0),
        "11": JobState("11", "COMPLETED", 0, 0),
        "12": JobState("12", "COMPLETED", 0, 0),
    }
    assert steps._apply(inst, states) is True
    assert steps.instance_done(inst) and steps.instance_succeeded(inst)
    # A final state is never overwritten by a later answer (e.g. UNKNOWN once slurmctld forgot it).
    assert steps._apply(inst, {"10": JobState("10", "UNKNOWN")}) is False
    assert inst["state"] == "COMPLETED" and inst["exit_code"] == 0


def test_failed_step_skips_its_step_stop_movers():
    inst = _instance()
    inst["datamovers"][0]["state"] = "COMPLETED"
    assert steps._apply(inst, {"10": JobState("10", "FAILED", 3, 0), "12": JobState("12", "PENDING")})
    archive = inst["datamovers"][1]
    assert (inst["state"], inst["exit_code"]) == ("FAILED", 3)
    assert archive["state"] == steps.SKIPPED and "step FAILED" in archive["reason"]
    assert steps.instance_done(inst) and not steps.instance_succeeded(inst)
    assert steps.active_jobs({"steps": [inst]}) == []


def test_failed_step_start_mover_skips_a_step_that_can_never_run():
    inst = _instance()
    states = {
        "11": JobState("11", "FAILED", 1, 0),
        "10": JobState("10", "PENDING", reason="DependencyNeverSatisfied"),
        "12": JobState("12", "PENDING", reason="Dependency"),
    }
    assert steps._apply(inst, states) is True
    assert inst["state"] == steps.SKIPPED and "stage FAILED" in inst["reason"]
    assert inst["datamovers"][1]["state"] == steps.SKIPPED
    assert steps.instance_done(inst)


def test_failed_step_start_mover_with_step_still_deciding_is_left_alone():
    inst = _instance()
    states = {"11": JobState("11", "FAILED", 1, 0), "10": JobState("10", "PENDING", reason="Dependency")}
    steps._apply(inst, states)
    assert inst["state"] is None and not steps.instance_done(inst)
    assert steps.active_jobs({"steps": [inst]}) == ["10", "12"]


def test_active_jobs_counts_steps_movers_and_accesses():
    done = _instance("COMPLETED", n=1)
    for m in done["datamovers"]:
        m["state"] = "COMPLETED"
    running = _instance(n=2)
    running["job_id"] = "20"
    session = {
        "steps": [done, running],
        "accesses": [
            {"job_id": "30", "state": None},
            {"job_id": "31", "state": "COMPLETED"},
            {"job_id": None},
        ],
    }
    assert steps.active_jobs(session) == ["20", "11", "12", "30"]
    assert steps._job_ids(running) == ["20", "11", "12"]


def test_find_instance_latest_or_numbered():
    session = {"name": "s", "steps": [_instance(n=1), _instance(n=2)]}
    assert steps.find_instance(session, "step_B")["instance"] == 2
    assert steps.find_instance(session, "step_B", 1)["instance"] == 1
    with pytest.raises(SessionNotFound, match="no run of instance 3 of step 'step_B'"):
        steps.find_instance(session, "step_B", 3)
    with pytest.raises(SessionNotFound, match="no run of step 'other'"):
        steps.find_instance(session, "other")


def test_step_name_is_mandatory():
    assert steps.check_step_name("s") == "s"
    with pytest.raises(UsageError, match="STEP= is mandatory"):
        steps.check_step_name(None)


def test_view_reads_the_mover_progress_file(tmp_path):
    inst = _instance()
    progress = tmp_path / "p.json"
    progress.write_text(json.dumps({"files_done": 2, "files_total": 4}))
    inst["datamovers"][0]["progress_file"] = str(progress)
    inst["datamovers"][1]["progress_file"] = str(tmp_path / "missing.json")
    v = steps.view(inst)
    assert v["datamovers"][0]["progress"] == {"files_done": 2, "files_total": 4}
    assert v["datamovers"][1]["progress"] is None
    progress.write_text("{half")  # being rewritten: no progress rather than an error
    assert steps.read_progress(str(progress)) is None
    assert steps.read_progress(None) is None


def test_starting_accesses_are_those_whose_salloc_lives():
    session = {
        "accesses": [
            {"job_id": None, "pid": os.getpid()},
            {"job_id": None, "pid": os.getpid(), "ended_at": 5.0},
            {"job_id": "7", "pid": os.getpid()},
            {"job_id": None, "pid": 2**22 + 12345},
        ]
    }
    assert steps.starting_accesses(session) == [session["accesses"][0]]
