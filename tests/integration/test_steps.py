"""Step runs on the real local site: data movers, services attached, honest Slurm states."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from iosea_wf.identity import current_user
from iosea_wf.site import load_site

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def sample(tmp_path, monkeypatch):
    """The design note's sample WDF and step scripts in a work dir, with two filled namespaces."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("sample-wdf.yaml", "My_Step_A", "My_Step_B"):
        shutil.copy2(EXAMPLES / name, work / name)
    monkeypatch.chdir(work)
    namespaces = {}
    for ns in ("ns1", "ns2"):
        d = tmp_path / ns
        (d / "gauges").mkdir(parents=True)
        (d / "input").mkdir()
        for i in range(3):
            (d / "gauges" / f"g{i}.hdf5").write_bytes(os.urandom(50_000 + i))
        (d / "input" / "in.txt").write_text("1 2 3\n" * 100)
        namespaces[ns] = d
    return work, namespaces


def _session_id(iosea, session: str) -> str:
    return iosea("status", f"SESSION={session}", "--json").json()["id"]


def _remove_tier_dirs(session: str) -> None:
    for tier in load_site().tiers.values():
        for d in Path(tier.path, current_user()).glob(f"{session}.*"):
            shutil.rmtree(d, ignore_errors=True)


def _start(iosea, session, namespaces):
    r = iosea(
        "start", "WORKFLOW=sample-wdf.yaml", f"SESSION={session}", f"NS1={namespaces['ns1']}",
        f"NS2={namespaces['ns2']}",
    )  # fmt: skip
    assert r.code == 0, r.err


def test_design_note_workflow_as_written(iosea, sample):
    work, ns = sample
    before = {p.name: _sha(p) for p in (ns["ns2"] / "gauges").iterdir()}
    _start(iosea, "note", ns)
    try:
        r = iosea("run", "SESSION=note", "STEP=step_A", "--wait")
        assert r.code == 0, r.err + r.out
        out_a = next(work.glob("My_Step_A-*.out")).read_text()
        assert "write to ES1 refused, as it should be (RO)" in out_a
        assert "gauges/g0.hdf5" in out_a  # step_A read its dataset through the mountpoint
        assert not (ns["ns1"] / "step_A-was-here").exists()

        r = iosea("run", "SESSION=note", "STEP=step_B", "--wait", "--json")
        assert r.code == 0, r.err
        view = r.json()
        assert view["state"] == "COMPLETED"
        assert {(m["name"], m["trigger"], m["state"]) for m in view["datamovers"]} == {
            ("datamover1", "step_start", "COMPLETED"),
            ("datamover2", "step_stop", "COMPLETED"),
        }
        site = load_site()
        where = {m["name"]: Path(m["target_path"]) for m in view["datamovers"]}
        flash, tape = where["datamover1"], where["datamover2"]
        sid = _session_id(iosea, "note")
        for tier, path in (("flash", flash), ("tape", tape)):
            # the session's own directory: its name and the start of its id
            assert path == Path(
                site.tiers[tier].path, current_user(), f"note.{sid[:12]}", "ephemeral_service_2"
            )
        # step_start copied gauges and input to flash, as they were before the step
        assert {p.name: _sha(p) for p in (flash / "gauges").iterdir()} == before
        assert (flash / "input" / "in.txt").read_text() == "1 2 3\n" * 100
        # the step wrote through its RW mountpoint
        assert (ns["ns2"] / "output" / "summary.txt").read_text().startswith("input bytes:")
        # step_stop moved every gauge (old and new) to tape: gone from the namespace, identical on tape
        assert list((ns["ns2"] / "gauges").iterdir()) == []
        on_tape = {p.name: _sha(p) for p in (tape / "gauges").iterdir()}
        assert {k: v for k, v in on_tape.items() if k in before} == before
        assert len(on_tape) == len(before) + 2

        status = iosea("status", "SESSION=note", "--json").json()
        steps = [(s["name"], s["instance"], s["state"]) for s in status["steps"]]
        assert steps == [("step_A", 1, "COMPLETED"), ("step_B", 1, "COMPLETED")]
        mover = status["steps"][1]["datamovers"][1]
        assert {"name", "trigger", "state", "job_id", "progress"} <= set(mover)
        assert mover["progress"]["state"] == "completed" and mover["progress"]["files_done"] == 5
    finally:
        assert iosea("stop", "SESSION=note").code == 0
        _remove_tier_dirs("note")


WDF_FAIL = """\
workflow:
  name: failing
services:
  - name: es
    type: NFS
    attributes:
      namespace: {ns}
      mountpoint: /mnt/iosea-test/{{{{ SESSION }}}}/es
datamovers:
  - name: archive
    trigger: step_stop
    target: tape
    operation: move
    elements: "*.dat"
steps:
  - name: fails
    location: cpu_module
    command: "sbatch fail.sh"
    services:
      - name: es RW
        datamovers: [archive]
  - name: slow
    location: cpu_module
    command: "sbatch --time=1 slow.sh"
  - name: ok
    command: "sbatch ok.sh"
"""


@pytest.fixture
def failing(tmp_path, monkeypatch, iosea):
    work = tmp_path / "w"
    work.mkdir()
    monkeypatch.chdir(work)
    ns = tmp_path / "ns"
    ns.mkdir()
    (ns / "keep.dat").write_text("must stay: the step failed\n")
    (work / "wf.yaml").write_text(WDF_FAIL.format(ns=ns))
    (work / "fail.sh").write_text("#!/bin/bash\necho failing\nexit 3\n")
    (work / "slow.sh").write_text("#!/bin/bash\nsleep 600\n")
    (work / "ok.sh").write_text("#!/bin/bash\necho ok\n")
    assert iosea("start", "WORKFLOW=wf.yaml", "SESSION=f").code == 0
    yield work, ns
    iosea("stop", "SESSION=f", "--force")


def test_failed_step_shows_exit_code_and_skips_step_stop_movers(iosea, failing):
    _, ns = failing
    r = iosea("run", "SESSION=f", "STEP=fails", "--wait")
    assert r.code == 1
    assert "step fails: FAILED (exit code 3)" in r.err
    status = iosea("status", "SESSION=f", "--json").json()
    inst = status["steps"][0]
    assert (inst["state"], inst["exit_code"]) == ("FAILED", 3)
    assert inst["datamovers"][0]["state"] == "SKIPPED"
    assert (ns / "keep.dat").exists()


def test_timeout_is_told_apart(iosea, failing):
    # Slurm's time limit granularity is a minute, and it checks it every 30 s: this takes ~1-1.5 min.
    r = iosea("run", "SESSION=f", "STEP=slow", "--wait")
    assert r.code == 1
    status = iosea("status", "SESSION=f", "--json").json()
    assert status["steps"][0]["state"] == "TIMEOUT"


def test_run_returns_job_ids_and_a_rerun_is_a_new_instance(iosea, failing):
    first = iosea("run", "SESSION=f", "STEP=ok", "--json").json()
    second = iosea("run", "SESSION=f", "STEP=ok", "--json").json()
    assert first["job_id"] != second["job_id"]
    assert (first["instance"], second["instance"]) == (1, 2)
    r = iosea("run", "SESSION=f", "STEP=nope")
    assert r.code == 4 and "not in the WDF" in r.err
    r = iosea("stop", "SESSION=f")  # waits for both instances
    assert r.code == 0
    assert "waiting for job(s)" in r.err or all(
        s["state"] == "COMPLETED" for s in iosea("status", "SESSION=f", "--json").json()["steps"]
    )
    states = [s["state"] for s in iosea("status", "SESSION=f", "--json").json()["steps"]]
    assert states == ["COMPLETED", "COMPLETED"]
    assert json.loads(iosea("status", "SESSION=f", "--json").out)["state"] == "STOPPED"


def test_run_on_stopped_session_is_refused(iosea, failing):
    assert iosea("stop", "SESSION=f").code == 0
    r = iosea("run", "SESSION=f", "STEP=ok")
    assert r.code == 5 and "not ACTIVE" in r.err


def test_cancel_long_step(iosea, failing):
    assert iosea("run", "SESSION=f", "STEP=slow").code == 0
    time.sleep(1)
    t0 = time.time()
    r = iosea("cancel", "SESSION=f", "STEP=slow", "--json")
    assert r.code == 0 and r.json()["cancelled"]
    job = r.json()["cancelled"][0]
    from iosea_wf import slurm

    while time.time() - t0 < 10 and slurm.job_states([job])[job].active:
        time.sleep(0.2)
    assert not slurm.job_states([job])[job].active, "still in squeue 10 s after cancel"
    status = iosea("status", "SESSION=f", "--json").json()
    assert status["steps"][0]["state"] == "CANCELLED"
    assert status["state"] == "ACTIVE"
