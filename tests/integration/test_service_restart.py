"""kill -9 of the Workflow Manager in the middle of a `start`: after a restart, `stop` cleans it all."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.api_service import need_munge, running_service
from tests.integration.conftest import BIN, nfs_list, write_wdf


def test_stop_after_the_service_died_during_start_cleans_every_export_and_allocation(tmp_path):
    need_munge()
    folder = Path(tempfile.mkdtemp(prefix="iosea-wf-wm-", dir="/tmp"))
    sock, state = folder / "wm.sock", folder / "state"
    ns = tmp_path / "ns"
    ns.mkdir()
    wdf = write_wdf(tmp_path / "wdf.yaml", [ns], tag="killed")
    env = {k: v for k, v in os.environ.items() if k != "IOSEA_WF_HOME"}
    env.update(IOSEA_WF_URL=f"unix://{sock}", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")

    def wf(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "iosea-wf"), *argv], env=env, capture_output=True, text=True, timeout=180
        )

    try:
        with running_service(sock, state) as service:
            start = subprocess.Popen(
                [str(BIN / "iosea-wf"), "start", f"WORKFLOW={wdf}", "SESSION=killed"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for line in start.stderr:
                if "starting 1 service(s)" in line:
                    break
            # The playbook provisions now, in a child of the service: the service dies under it.
            os.kill(service.pid, signal.SIGKILL)
            service.wait(10)
            _, err = start.communicate(timeout=60)
        assert start.returncode == 10, err
        assert "went away during the request" in err and "Traceback" not in err

        with running_service(sock, state):
            before = json.loads(wf("status", "SESSION=killed", "--json").stdout)
            # The service that started it died: INTERRUPTED, not STARTING forever (issue 14).
            assert before["state"] == "INTERRUPTED"
            url = before["services"][0]["url"]
            stopped = wf("stop", "SESSION=killed")
            assert stopped.returncode == 0, stopped.stderr
            after = json.loads(wf("status", "SESSION=killed", "--json").stdout)
        assert after["state"] == "STOPPED"
        assert [s["state"] for s in after["services"]] == ["STOPPED"]
        store = json.loads((state / "iosea-wf.json").read_text())
        assert store.get("allocations", {}) == {}
        assert nfs_list(url).returncode != 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)
