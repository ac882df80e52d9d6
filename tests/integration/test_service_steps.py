"""A session's whole life through the Workflow Manager service, on the real local site (as root).

start provisions a real NFS export, `run` submits the batch script the CLI read and sent (the
copy in the instance directory runs, from the caller's directory), `cancel` ends a running step,
`access -- COMMAND` runs here and is recorded there, `stop` tears the export down.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from iosea_wf import identity
from tests.api_service import temporary_service
from tests.integration.conftest import BIN, nfs_read

WDF = """\
workflow:
  name: svc_steps
services:
  - name: es1
    type: NFS
    attributes:
      namespace: {ns}
      mountpoint: /mnt/iosea-test/{{{{ SESSION }}}}/es1
steps:
  - name: later
    command: "sbatch --begin=now+3 -o later-%j.out job.sh first-arg"
    services:
      - name: es1 RO
  - name: long
    command: "sbatch -o /dev/null long.sh"
    services:
      - name: es1 RO
"""
JOB = """\
#!/bin/bash
echo "sent copy ran in $(pwd) with $1 for $IOSEA_SERVICE_ES1_URL"
"""


@pytest.fixture(scope="module")
def service():
    """The service on a temporary socket with a temporary store: (URL, state dir)."""
    with temporary_service() as url_and_state:
        yield url_and_state


@pytest.fixture
def wf(service, tmp_path):
    """wf(*argv) runs the CLI through the service, from the test's work directory."""
    url, _ = service
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "IOSEA_WF_HOME"}
    env.update(IOSEA_WF_URL=url, PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")

    def run(*argv: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "iosea-wf"), *argv], cwd=work, env=env, capture_output=True, text=True, timeout=timeout
        )

    run.work = work
    return run


def test_start_run_cancel_access_stop_through_the_service(wf, service, tmp_path):
    _, state = service
    ns = tmp_path / "ns"
    ns.mkdir()
    (ns / "hello.txt").write_text("hello through the service\n")
    wdf = wf.work / "wdf.yaml"
    wdf.write_text(WDF.format(ns=ns))
    (wf.work / "job.sh").write_text(JOB)
    (wf.work / "long.sh").write_text("#!/bin/bash\nsleep 120\n")
    name = f"svc-{os.getpid()}"

    started = wf("start", f"WORKFLOW={wdf}", f"SESSION={name}", "--json")
    assert started.returncode == 0, started.stderr
    assert "es1: ready on" in started.stderr  # progress streamed as in-process
    url = json.loads(started.stdout)["services"][0]["url"]
    assert nfs_read(url, "hello.txt").stdout == "hello through the service\n"

    ran = wf("run", f"SESSION={name}", "STEP=later")
    assert ran.returncode == 0, ran.stderr
    # The job has not begun (--begin=now+3): what runs is the copy the service received, not this file.
    (wf.work / "job.sh").write_text("#!/bin/bash\necho the file was read again\nexit 3\n")
    waited = wf("run", f"SESSION={name}", "STEP=later", "--wait")  # a second instance, for its wait
    assert waited.returncode == 1  # it ran the new file, as a new run must
    status = json.loads(wf("status", f"SESSION={name}", "--json").stdout)
    first = next(s for s in status["steps"] if s["name"] == "later" and s["instance"] == 1)
    assert first["state"] == "COMPLETED"
    output = (wf.work / f"later-{first['job_id']}.out").read_text()
    assert f"sent copy ran in {wf.work} with first-arg for {url}" in output

    long = wf("run", f"SESSION={name}", "STEP=long")
    assert long.returncode == 0, long.stderr
    cancelled = wf("cancel", f"SESSION={name}", "STEP=long", "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert len(json.loads(cancelled.stdout)["cancelled"]) == 1

    for _ in range(10):  # the site is shared: other tests may hold the nodes for a moment
        inner = ["sh", "-c", "echo $IOSEA_SERVICES; exit 7"]
        access = wf("access", f"SESSION={name}", "--immediate", "--", *inner)
        if not (access.returncode == 8 and "busy" in access.stderr):
            break
        time.sleep(2)
    assert (access.returncode, access.stdout.strip()) == (7, "es1"), access.stderr
    record = _session_record(state, name)
    (entry,) = [a for a in record["accesses"] if a.get("state") != "NOT_GRANTED"]
    assert entry["job_id"] and entry["ended_at"]

    stopped = wf("stop", f"SESSION={name}")
    assert stopped.returncode == 0, stopped.stderr
    assert "es1: removed" in stopped.stderr
    assert nfs_read(url, "hello.txt").returncode != 0


def _session_record(state: Path, name: str) -> dict:
    data = json.loads((state / "iosea-wf.json").read_text())
    return next(s for s in data["sessions"].values() if s["name"] == name)


def test_a_follow_whose_client_went_away_is_abandoned_but_its_step_runs_on(wf, service):
    url, state = service
    (wf.work / "wdf.yaml").write_text(
        'workflow:\n  name: follow_wf\nsteps:\n  - name: long\n    command: "sbatch -o /dev/null long.sh"\n'
    )
    (wf.work / "long.sh").write_text("#!/bin/bash\nsleep 120\n")
    name = f"follow-{os.getpid()}"
    assert wf("start", "WORKFLOW=wdf.yaml", f"SESSION={name}").returncode == 0
    assert wf("run", f"SESSION={name}", "STEP=long").returncode == 0
    sock = url.removeprefix("unix://")
    path = f"/v1/sessions/{name}/steps/long/runs/1/follow"
    cred = identity.make_credential(identity.request_digest("GET", path, b"", b""))
    with (
        httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://wm") as client,
        client.stream("GET", path, headers={identity.CREDENTIAL_HEADER: cred}) as answer,
    ):
        first = json.loads(next(answer.iter_lines()))
    assert first["update"]["name"] == "long"
    log = state.parent / "wm.log"
    deadline = time.time() + 20
    while "abandoned, its client went away" not in log.read_text() and time.time() < deadline:
        time.sleep(0.2)
    assert f"root's follow of {name} long#1: abandoned" in log.read_text()
    # The step runs on (it may still wait for the scheduler a moment on a busy machine).
    deadline, state_now = time.time() + 30, None
    while state_now != "RUNNING" and time.time() < deadline:
        state_now = json.loads(wf("status", f"SESSION={name}", "--json").stdout)["steps"][0]["state"]
        assert state_now in ("PENDING", "RUNNING"), state_now
        time.sleep(0.5)
    assert state_now == "RUNNING"
    assert wf("stop", f"SESSION={name}", "--force").returncode == 0
