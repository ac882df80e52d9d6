"""Two overlapping runs of one step with a `step_start` mover (issue 14, finding 4), on the real
local site, in-process and through the Workflow Manager service: each instance has its own job
directory and progress file; the two movers write into one target, where a mover in flight (its
lock on the target directory held, its temporary file there) is waited for, its temporary never
removed; both runs complete."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from iosea_wf.identity import current_user
from iosea_wf.site import load_site
from tests.api_service import temporary_service
from tests.integration.conftest import BIN
from tests.integration.sides import cli

WDF = """\
workflow:
  name: wf_overlap
services:
  - name: es1
    type: NFS
    attributes:
      namespace: {ns}
      mountpoint: /mnt/iosea-test/{{{{ SESSION }}}}/es1
datamovers:
  - name: stage_in
    trigger: step_start
    target: flash
    operation: copy
    elements: "data/*"
steps:
  - name: twice
    location: cpu_module
    command: "sbatch -o /dev/null --wrap true"
    services:
      - name: es1 RO
        datamovers: [stage_in]
"""
FINAL = ("COMPLETED", "FAILED", "SKIPPED", "CANCELLED", "NOT_SUBMITTED")


def _wait_for(what, predicate, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _check(run, work: Path, session: str) -> None:
    """``run(*argv)`` -> (code, out, err), the CLI working in ``work``."""
    ns = work / "ns"
    for i in range(50):
        path = ns / "data" / f"f{i:02}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(1000 + i))
    (work / "wdf.yaml").write_text(WDF.format(ns=ns))
    code, _, err = run("start", "WORKFLOW=wdf.yaml", f"SESSION={session}")
    assert code == 0, err
    try:

        def status():
            return json.loads(run("status", f"SESSION={session}", "--json")[1])

        sid = status()["id"]
        tier = load_site().tiers["flash"].path
        target = Path(tier, current_user(), f"{session}.{sid[:12]}", "es1")
        target.mkdir(parents=True)
        # A mover in flight into this target: its lock held, its temporary file there.
        live = target / "data" / ".f00.bin.iosea-tmp-5eed1"
        live.parent.mkdir()
        live.write_bytes(b"half written")
        held = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            for _ in range(2):
                code, _, err = run("run", f"SESSION={session}", "STEP=twice")
                assert code == 0, err

            def movers():
                found = [m["state"] for s in status()["steps"] for m in s["datamovers"]]
                return found if found == ["RUNNING"] * 2 or any(m in FINAL for m in found) else None

            # Both wait behind the mover in flight (before: they ran, the first removing its file).
            assert _wait_for("both movers to run", movers) == ["RUNNING"] * 2
            time.sleep(1)
            assert live.exists()  # before: removed, "left by an interrupted run"
        finally:
            live.unlink(missing_ok=True)  # the mover in flight renames it into place, then ends
            os.close(held)

        def ended():
            found = status()["steps"]
            return found if all(i["state"] in FINAL for i in found) else None

        steps = _wait_for("both runs to end", ended)
        assert [(s["instance"], s["state"]) for s in steps] == [(1, "COMPLETED"), (2, "COMPLETED")], steps
        assert [m["state"] for s in steps for m in s["datamovers"]] == ["COMPLETED"] * 2
        # Each instance's own progress file says what its mover did.
        assert all(m["progress"]["state"] == "completed" for s in steps for m in s["datamovers"])
        assert sorted(p.name for p in (target / "data").iterdir()) == [f"f{i:02}.bin" for i in range(50)]
    finally:
        code, _, err = run("stop", f"SESSION={session}", "--force")
        for tier in load_site().tiers.values():
            for d in Path(tier.path, current_user()).glob(f"{session}.*"):
                shutil.rmtree(d, ignore_errors=True)
    assert code == 0, err


def test_overlapping_runs_in_process(iosea, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def run(*argv):
        r = iosea(*argv)
        return r.code, r.out, r.err

    _check(run, tmp_path, f"overlap-{os.getpid()}")


@pytest.fixture(scope="module")
def service():
    """The service on a temporary socket with a temporary store: its URL."""
    with temporary_service() as (url, _):
        yield url


def test_overlapping_runs_through_the_service(service, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "IOSEA_WF_HOME"}
    env.update(IOSEA_WF_URL=service, PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")

    def run(*argv):
        p = cli(env, tmp_path, *argv, timeout=180)
        return p.returncode, p.stdout, p.stderr

    _check(run, tmp_path, f"overlap-svc-{os.getpid()}")
