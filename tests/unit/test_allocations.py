"""Pure parts of iosea_wf/allocations.py: durations, allocation names, which services lost theirs."""

from __future__ import annotations

import pytest

from iosea_wf import allocations, steps
from iosea_wf.durations import parse_duration
from iosea_wf.errors import UsageError
from iosea_wf.slurm import JobState


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800)])
def test_durations(text, seconds):
    assert parse_duration(text, "--wait-resources") == seconds


@pytest.mark.parametrize("text", ["", "10", "0s", "1w", "-5s", "1.5h", "5 s", "s", "90S"])
def test_bad_durations(text):
    with pytest.raises(UsageError, match="--wait-resources: .* is not a duration"):
        parse_duration(text, "--wait-resources")


def _session(state="ACTIVE"):
    services = [
        {"name": "es1", "state": "ACTIVE", "allocation": "11", "allocation_state": "PENDING"},
        {"name": "es2", "state": "ACTIVE", "allocation": "12", "allocation_state": "CANCELLED"},
        {"name": "es3", "state": "FAILED", "allocation": None},
    ]
    return {"name": "s1", "owner": "u", "state": state, "services": services, "steps": [], "wdf": {}}


def test_names_recorded_and_unended():
    s = _session()
    assert allocations.job_name("s1", "es1") == "iosea.s1.svc.es1"
    assert allocations.is_allocation_name(s, "iosea.s1.svc.es3")
    assert not allocations.is_allocation_name(s, "iosea.s1.svc.other")
    assert not allocations.is_allocation_name(s, "iosea.s2.svc.es1")
    assert allocations.recorded(s) == ["11", "12"]
    assert allocations.unended(s) == ["11"]
    # An allocation is never a job stop waits for.
    assert steps.active_jobs(s) == []


def test_only_an_active_service_of_an_active_session_is_lost():
    states = {"11": JobState("11", "CANCELLED"), "12": JobState("12", "RUNNING")}
    assert allocations.ended(_session(), states) == {"es1": "its Slurm allocation 11 ended: CANCELLED"}
    assert allocations.ended(_session(), {"11": JobState("11", "RUNNING")}) == {}
    assert allocations.ended(_session("STOPPING"), states) == {}
    assert allocations.watched(_session()) == ["11", "12"]
    assert allocations.watched(_session("STOPPING")) == []
