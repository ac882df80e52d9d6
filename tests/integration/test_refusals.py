"""Exit codes of refusals on the real site: Slurm refusing a step's job (8), and bounded run dirs."""

from __future__ import annotations

import pytest

from iosea_wf import orchestrator, slurm

WDF = """\
workflow:
  name: refusals
services:
  - name: es
    type: NFS
    attributes:
      namespace: {ns}
      mountpoint: /mnt/iosea-test/{{{{ SESSION }}}}/es
datamovers:
  - name: stage_in
    trigger: step_start
    target: flash
    operation: copy
    elements: "*.dat"
steps:
  - name: greedy
    location: cpu_module
    command: "sbatch --mem=99999999 ok.sh"
    services:
      - name: es RW
        datamovers: [stage_in]
  - name: ok
    location: cpu_module
    command: "sbatch ok.sh"
"""


@pytest.fixture
def session(tmp_path, monkeypatch, iosea):
    """An ACTIVE session whose step `greedy` asks more memory than any node has."""
    work = tmp_path / "w"
    work.mkdir()
    monkeypatch.chdir(work)
    ns = tmp_path / "ns"
    ns.mkdir()
    (ns / "a.dat").write_text("data\n")
    (work / "wf.yaml").write_text(WDF.format(ns=ns))
    (work / "ok.sh").write_text("#!/bin/bash\necho ok\n")
    r = iosea("start", "WORKFLOW=wf.yaml", "SESSION=refused")
    assert r.code == 0, r.err
    yield work
    iosea("stop", "SESSION=refused", "--force")


def test_a_job_slurm_refuses_exits_8_and_leaves_nothing_behind(iosea, session):
    r = iosea("validate", "WORKFLOW=wf.yaml")
    assert r.code == 0, r.err  # only slurmctld knows no node has that much memory
    r = iosea("run", "SESSION=refused", "STEP=greedy")
    assert r.code == 8, r.err
    assert "sbatch refused the job" in r.err
    assert "Requested node configuration is not available" in r.err
    assert "Traceback" not in r.err
    # The step_start mover submitted before the refusal was cancelled, and the instance is recorded
    # honestly: NOT_SUBMITTED, with no job id (its number is never reused).
    left = [j for j, state, _ in slurm.jobs_named("iosea.refused.greedy.1.dm.stage_in") if state == "PENDING"]
    assert left == []
    steps = iosea("status", "SESSION=refused", "--json").json()["steps"]
    assert [(s["name"], s["instance"], s["state"], s["job_id"]) for s in steps] == [
        ("greedy", 1, "NOT_SUBMITTED", None)
    ]


def test_run_directories_do_not_grow_without_bound(iosea, session, state_dir, monkeypatch):
    monkeypatch.setattr(orchestrator, "KEEP_RUNS", 2)
    for _ in range(3):
        r = iosea("run", "SESSION=refused", "STEP=ok")
        assert r.code == 0, r.err
    runs = sorted(p.name for p in (state_dir / "runs").iterdir())
    # start + 3 runs finished; only the newest two are kept, the last run among them
    assert len(runs) == 2, runs
    assert any("-run-ok-3-" in name for name in runs), runs
