"""Parsing of Slurm's answers (squeue, sacct, scontrol ping) without a site: the text is Slurm 22.05's."""

from __future__ import annotations

import pytest

from iosea_wf import slurm
from iosea_wf.slurm import JobState

# `squeue --states=all -h -O JobID:|,State:|,Reason:|,exit_code:` as printed on the local site.
SQUEUE = """\
60|CANCELLED|None|15
68|CANCELLED|DependencyNeverSatisfied|0
70|PENDING|Dependency|0
71|RUNNING|None|0
72|FAILED|NonZeroExitCode|768
73|COMPLETED|None|0
74|TIMEOUT|TimeLimit|15
99|COMPLETED|None|0
garbage line
"""

# `sacct -c -n -P -o JobID,State,ExitCode` (the job-completion log).
SACCT = """\
93|CANCELLED by 0|0:0
92|COMPLETED|0:0
94|FAILED|3:0
95|FAILED|0:9
96|TIMEOUT|weird
"""


def test_squeue_rows_become_states_with_exit_codes_of_ended_jobs_only():
    ids = ["60", "68", "70", "71", "72", "73", "74"]
    found = slurm.parse_squeue(SQUEUE, ids)
    assert set(found) == set(ids)  # 99 was not asked for; the garbage line is ignored
    assert found["72"] == JobState("72", "FAILED", 3, 0, "NonZeroExitCode")
    assert found["60"] == JobState("60", "CANCELLED", 0, 15, None)
    assert found["74"].exit_code == 0 and found["74"].signal == 15 and found["74"].terminal
    # A pending or running job has no exit code yet, whatever squeue prints in that column.
    assert found["70"] == JobState("70", "PENDING", None, None, "Dependency")
    assert found["71"].active and not found["71"].terminal and found["71"].exit_code is None
    assert found["68"].reason == "DependencyNeverSatisfied"
    assert found["73"].reason is None


def test_sacct_rows_keep_code_and_signal_and_normalise_the_state():
    found = slurm.parse_sacct(SACCT, ["92", "93", "94", "95", "96"])
    assert found["93"] == JobState("93", "CANCELLED", 0, 0)
    assert found["94"] == JobState("94", "FAILED", 3, 0)
    assert found["95"] == JobState("95", "FAILED", 0, 9)
    assert found["96"] == JobState("96", "TIMEOUT", None, None)
    assert slurm.parse_sacct(SACCT, ["92"]).keys() == {"92"}


@pytest.mark.parametrize(
    "raw, expected",
    [("CANCELLED by 0", "CANCELLED"), ("COMPLETED", "COMPLETED"), ("FAILED+", "FAILED"), ("", slurm.UNKNOWN)],
)
def test_state_names_are_normalised(raw, expected):
    assert slurm._normal_state(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [("0", (0, 0)), ("768", (3, 0)), ("9", (0, 9)), ("36608", (143, 0)), ("N/A", (None, None))],
)
def test_squeue_exit_code_is_a_wait_status(raw, expected):
    assert slurm._from_wait_status(raw) == expected


@pytest.mark.parametrize(
    "raw, expected", [("0:0", (0, 0)), ("7:0", (7, 0)), ("0:15", (0, 15)), ("x", (None, None))]
)
def test_sacct_exit_code_is_a_pair(raw, expected):
    assert slurm._from_exit_pair(raw) == expected


def test_no_job_ids_asks_slurm_nothing(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # any Slurm call would raise SlurmError
    assert slurm.job_states([]) == {}
    assert slurm.job_states(["", None]) == {}
    slurm.cancel([])


def test_missing_client_commands_are_slurm_errors(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(slurm.SlurmError, match="squeue is not installed here"):
        slurm.job_states(["1"])
    with pytest.raises(slurm.SlurmError, match="salloc is not installed here"):
        slurm.allocate_and_run(["salloc", "true"])
    assert slurm.controller_up() is False
