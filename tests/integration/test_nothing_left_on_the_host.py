"""After `stop`, nothing of a session is left on the host (issue 14, finding 15): no mountpoint
directory made for a job, no instance directory of a submission that failed. In-process and
through the Workflow Manager service, on the real local site (as root, whose jobs could create
directories anywhere)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.api_service import temporary_service
from tests.integration.conftest import BIN

WDF = """\
workflow:
  name: wf_left
services:
  - name: es1
    type: NFS
    attributes:
      namespace: {ns}
      mountpoint: {mountpoint}
steps:
  - name: writes
    location: cpu_module
    command: "sbatch -o /dev/null job.sh"
    services:
      - name: es1 RW
  - name: refused_by_slurm
    command: "sbatch --partition=no_such_partition -o /dev/null job.sh"
    services:
      - name: es1 RW
  - name: refused_here
    location: cpu_module
    command: "sbatch bad.sh"
"""
JOB = '#!/bin/sh\necho "$IOSEA_SESSION" > "$IOSEA_SERVICE_ES1_MOUNTPOINT/written"\n'


def _prepare(work: Path, tag: str) -> tuple[Path, Path]:
    """The WDF, its scripts and namespace in ``work``; returns (namespace, the mountpoint's top)."""
    ns = work / "ns"
    ns.mkdir()
    # A top directory of its own, missing: whatever a job creates under it would show.
    top = Path("/mnt/iosea-test-left") / tag
    assert not top.exists()
    (work / "wdf.yaml").write_text(WDF.format(ns=ns, mountpoint=top / "es1"))
    (work / "job.sh").write_text(JOB)
    (work / "bad.sh").write_text("#!/bin/sh\n#SBATCH -QW\ntrue\n")
    return ns, top


def _check(run, work: Path, state: Path, session: str) -> None:
    """``run(*argv)`` -> (code, out, err) with the CLI in ``work`` and the store in ``state``."""
    ns, top = _prepare(work, session)
    code, _, err = run("start", "WORKFLOW=wdf.yaml", f"SESSION={session}")
    assert code == 0, err
    try:
        code, _, err = run("run", f"SESSION={session}", "STEP=writes", "--wait")
        assert code == 0, err
        assert (ns / "written").read_text().strip() == session  # attached at its mountpoint
        code, _, err = run("run", f"SESSION={session}", "STEP=refused_by_slurm")
        assert code != 0 and "invalid partition" in err.lower(), err
        code, _, err = run("run", f"SESSION={session}", "STEP=refused_here")
        assert code == 2 and "cannot be given" in err, err
        code, out, err = run("status", f"SESSION={session}", "--json")
        view = json.loads(out)
        [failed] = [s for s in view["steps"] if s["name"] == "refused_by_slurm"]
        assert failed["state"] == "NOT_SUBMITTED"
        jobs = state / "jobs" / view["id"]
        # Before: refused_by_slurm.1 and refused_here.1 stayed, with scripts that would never run.
        assert sorted(p.name for p in jobs.iterdir()) == ["writes.1"]
    finally:
        code, _, err = run("stop", f"SESSION={session}", "--force")
    assert code == 0, err
    # Before: /mnt/iosea-test-left/<session>/es1 stayed, made by the job on the host.
    assert not top.exists(), list(top.rglob("*"))
    assert not top.parent.exists() or not any(top.parent.iterdir())


def test_nothing_left_in_process(iosea, state_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def run(*argv):
        r = iosea(*argv)
        return r.code, r.out, r.err

    _check(run, tmp_path, state_dir, f"left-{os.getpid()}")


@pytest.fixture(scope="module")
def service():
    """The service on a temporary socket with a temporary store: (URL, state dir)."""
    with temporary_service() as url_and_state:
        yield url_and_state


def test_nothing_left_through_the_service(service, tmp_path):
    url, state = service
    env = {k: v for k, v in os.environ.items() if k != "IOSEA_WF_HOME"}
    env.update(IOSEA_WF_URL=url, PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")

    def run(*argv):
        p = subprocess.run(
            [str(BIN / "iosea-wf"), *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
        )
        return p.returncode, p.stdout, p.stderr

    _check(run, tmp_path, state, f"left-svc-{os.getpid()}")
