"""Interactive access to a session, and cancel, on the real local site."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pexpect
import pytest

from iosea_wf import slurm
from iosea_wf.identity import current_user
from tests.integration.conftest import BIN

WDF = """\
workflow:
  name: acc
services:
  - name: es1
    type: NFS
    attributes:
      namespace: {ns1}
      mountpoint: /mnt/iosea-test/{{{{ SESSION }}}}/es1
  - name: es2
    type: NFS
    attributes:
      namespace: {ns2}
      mountpoint: /mnt/iosea-test/{{{{ SESSION }}}}/es2
datamovers:
  - name: archive
    trigger: step_start
    target: disk
    operation: move
    elements: "big/*"
steps:
  - name: archive_step
    command: "sbatch -o /dev/null ok.sh"
    services:
      - name: es2 RW
        datamovers: [archive]
  - name: long
    command: "sbatch -o /dev/null long.sh"
    services:
      - name: es1 RO
"""


@pytest.fixture
def session(tmp_path, monkeypatch, iosea):
    work = tmp_path / "w"
    work.mkdir()
    monkeypatch.chdir(work)
    ns1, ns2 = tmp_path / "ns1", tmp_path / "ns2"
    ns1.mkdir()
    ns2.mkdir()
    (ns1 / "a.txt").write_text("from es1\n")
    (ns2 / "b.txt").write_text("from es2\n")
    (work / "wf.yaml").write_text(WDF.format(ns1=ns1, ns2=ns2))
    (work / "ok.sh").write_text("#!/bin/bash\ntrue\n")
    (work / "long.sh").write_text("#!/bin/bash\nsleep 600\n")
    assert iosea("start", "WORKFLOW=wf.yaml", "SESSION=acc").code == 0
    yield {"work": work, "ns1": ns1, "ns2": ns2}
    iosea("stop", "SESSION=acc", "--force")


def test_access_command_reads_every_service_and_returns_its_exit_code(iosea_proc, session):
    cmd = 'cat "$IOSEA_SERVICE_ES1_MOUNTPOINT/a.txt" "$IOSEA_SERVICE_ES2_MOUNTPOINT/b.txt"; exit 7'
    r = iosea_proc("access", "SESSION=acc", "--immediate", "--", "sh", "-c", cmd)
    assert r.stdout == "from es1\nfrom es2\n", r.stderr
    assert r.returncode == 7


def test_access_interactive_shell_in_the_allocation(cli_env, session):
    child = pexpect.spawn(
        str(BIN / "iosea-wf"),
        ["access", "SESSION=acc"],
        env={**cli_env, "SHELL": "/bin/sh", "PS1": "acc$ "},
        encoding="utf-8",
        timeout=60,
    )
    try:
        child.expect_exact("acc$ ")
        child.sendline('echo "job=$SLURM_JOB_ID"; cat "$IOSEA_SERVICE_ES2_MOUNTPOINT/b.txt"')
        child.expect(r"job=(\d+)")
        job = child.match.group(1)
        child.expect_exact("from es2")
        assert slurm.job_states([job])[job].state == "RUNNING"
        child.sendline("exit 0")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def _open_access(cli_env, iosea_proc, seconds: int, *, until_job_known: bool) -> subprocess.Popen:
    """Start `access -- sleep N` in the background; return once status lists it (with its job id)."""
    access = subprocess.Popen(
        [str(BIN / "iosea-wf"), "access", "SESSION=acc", "--", "sleep", str(seconds)],
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        accesses = json.loads(iosea_proc("status", "SESSION=acc", "--json").stdout)["accesses"]
        if accesses and (accesses[0]["job_id"] or not until_job_known):
            assert accesses[0]["state"] in ("RUNNING", "STARTING", "PENDING")
            return access
        time.sleep(0.3)
    raise AssertionError("the access never showed in the status")


def test_stop_waits_for_an_open_access(iosea_proc, cli_env, session):
    access = _open_access(cli_env, iosea_proc, 8, until_job_known=True)
    t0 = time.time()
    r = iosea_proc("stop", "SESSION=acc")
    assert r.returncode == 0, r.stderr
    assert "waiting for job(s)" in r.stderr
    assert time.time() - t0 > 2  # it waited for the access to end by itself
    assert access.wait(30) == 0


def test_stop_force_ends_an_open_access(iosea_proc, cli_env, session):
    # Right away, perhaps before the access knows its job id: stop must still find and end it.
    access = _open_access(cli_env, iosea_proc, 300, until_job_known=False)
    t0 = time.time()
    r = iosea_proc("stop", "SESSION=acc", "--force")
    assert r.returncode == 0, r.stderr
    assert time.time() - t0 < 60
    # srun inside the revoked allocation waits up to KillWait (30 s) + 2 s for its step to end.
    access.wait(60)
    assert access.returncode != 0


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_cancel_during_large_move_loses_nothing_and_rerun_completes(iosea, session, state_dir):
    big = session["ns2"] / "big"
    big.mkdir()
    disk = Path(
        next(t["path"] for t in iosea("show", "tiers", "--json").json()["tiers"] if t["name"] == "disk")
    )
    originals = {}
    block = os.urandom(1 << 20)
    for i in range(256):
        data = block * 7 + i.to_bytes(4, "big") * 1024  # 7 MiB + 4 KiB each, distinct, ~1.8 GiB in all
        (big / f"f{i:03}.bin").write_bytes(data)
        originals[f"f{i:03}.bin"] = hashlib.sha256(data).hexdigest()
    view = iosea("run", "SESSION=acc", "STEP=archive_step", "--json").json()
    mover = view["datamovers"][0]
    # Watch the mover's own progress file closely and cancel as soon as it has moved something.
    deadline = time.time() + 60
    progress_file = None
    while time.time() < deadline:
        found = list(state_dir.glob("jobs/*/archive_step.1/*.progress.json"))
        if found:
            progress_file = found[0]
            try:
                if json.loads(progress_file.read_text())["files_done"] >= 2:
                    break
            except (ValueError, OSError):
                pass
        time.sleep(0.02)
    assert progress_file is not None, "the data mover never started"
    r = iosea("cancel", "SESSION=acc", "STEP=archive_step", "--json")
    assert r.code == 0 and mover["job_id"] in r.json()["cancelled"]
    deadline = time.time() + 30
    while time.time() < deadline and slurm.job_states([mover["job_id"]])[mover["job_id"]].active:
        time.sleep(0.2)
    status = iosea("status", "SESSION=acc", "--json").json()
    inst = status["steps"][0]
    assert inst["datamovers"][0]["state"] == "CANCELLED", inst
    assert inst["state"] in ("CANCELLED", "SKIPPED")
    progress = inst["datamovers"][0]["progress"]
    assert progress["state"] == "cancelled", progress
    assert any((big / name).exists() for name in originals), "the move finished before the cancel reached it"
    # status says where the mover's data goes: the session's own directory on the tier
    dest = Path(inst["datamovers"][0]["target_path"]) / "big"
    assert dest.parent.parent.name.startswith("acc.") and dest.parent.parent.parent == disk / current_user()
    # every file complete at the source or at the target (or both), never half
    for name, digest in originals.items():
        here = [p for p in (big / name, dest / name) if p.exists()]
        assert here, f"{name} lost"
        bad = [f"{p} ({p.stat().st_size} bytes)" for p in here if _sha(p) != digest]
        assert not bad, f"{name} is not complete: {bad}"
    # a rerun completes the move
    r = iosea("run", "SESSION=acc", "STEP=archive_step", "--wait")
    assert r.code == 0, r.err
    assert sorted(p.name for p in dest.iterdir()) == sorted(originals)
    assert list(big.iterdir()) == []
    assert all(_sha(dest / n) == d for n, d in originals.items())
    shutil.rmtree(dest.parent.parent, ignore_errors=True)


def _fill_partition(partition: str = "cpu") -> str:
    """Occupy every node of a partition with one exclusive job; return its id."""
    nodes = subprocess.run(
        ["sinfo", "-h", "-p", partition, "-o", "%D"], capture_output=True, text=True
    ).stdout
    job = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "-p",
            partition,
            f"--nodes={int(nodes.split()[0])}",
            "--exclusive",
            "-o",
            "/dev/null",
            "--wrap",
            "sleep 120",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    deadline = time.time() + 30
    while time.time() < deadline and slurm.job_states([job])[job].state != "RUNNING":
        time.sleep(0.2)
    return job


def test_access_on_busy_resources_says_so(iosea_proc, cli_env, session):
    blocker = _fill_partition()
    try:
        t0 = time.time()
        r = iosea_proc("access", "SESSION=acc", "--immediate", "--", "true", timeout=60)
        assert r.returncode == 8, r.stderr
        assert "busy right now (--immediate)" in r.stderr
        assert time.time() - t0 < 20
        waiting = subprocess.Popen(
            [str(BIN / "iosea-wf"), "access", "SESSION=acc", "--", "true"],
            env=cli_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(6)
        slurm.cancel([blocker])
        out, err = waiting.communicate(timeout=90)
        assert "access: waiting for resources on partition cpu" in err
        assert waiting.returncode == 0, err
    finally:
        slurm.cancel([blocker])
