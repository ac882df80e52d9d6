"""A datanode drained by the administrator (`scontrol update ... state=drain`) gets no new service
(issue 16, section 3): start places the service on another datanode, or, with every datanode
drained, is refused with exit 6 saying so, and nothing is left behind."""

from __future__ import annotations

import json
import subprocess
import time
from contextlib import contextmanager

from iosea_wf import slurm
from tests.integration.conftest import write_wdf


def _scontrol(*argv: str) -> None:
    subprocess.run(["scontrol", "update", *argv], check=True, capture_output=True, timeout=30)


@contextmanager
def drained(*nodes: str):
    """The nodes drained inside (reason iosea-wf test); resumed afterwards, and back to work."""
    _scontrol(f"nodename={','.join(nodes)}", "state=drain", "reason=iosea-wf test")
    try:
        yield
    finally:
        _scontrol(f"nodename={','.join(nodes)}", "state=resume")
        deadline = time.monotonic() + 30
        while _states(nodes) - {"idle", "mixed", "allocated"}:  # resumed: "idle*" for a moment
            assert time.monotonic() < deadline, _states(nodes)
            time.sleep(0.2)


def _states(nodes) -> set[str]:
    out = subprocess.run(
        ["sinfo", "-h", "-N", "-n", ",".join(nodes), "-O", "StateLong"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def test_a_drained_datanode_gets_no_new_service(tmp_path, iosea_proc):
    wdf = write_wdf(tmp_path / "wdf.yaml", [tmp_path / "ns1"], tag="drain")
    with drained("datanode1"):
        # "draining" while a job of another test still runs there, "drained" once it is idle.
        assert slurm.unusable_nodes(["datanode1", "datanode2"])["datanode1"] in (
            "drained in Slurm (iosea-wf test)",
            "draining in Slurm (iosea-wf test)",
        )
        assert "datanode2" not in slurm.unusable_nodes(["datanode1", "datanode2"])
        r = iosea_proc("start", f"WORKFLOW={wdf}", "SESSION=drain-one", "--json")
        assert r.returncode == 0, r.stderr
        try:
            assert [s["datanode"] for s in json.loads(r.stdout)["services"]] == ["datanode2"]
        finally:
            assert iosea_proc("stop", "SESSION=drain-one").returncode == 0
    with drained("datanode1", "datanode2"):
        r = iosea_proc("start", f"WORKFLOW={wdf}", "SESSION=drain-all")
        assert r.returncode == 6, (r.returncode, r.stderr)
        assert "fits on no datanode" in r.stderr and "Traceback" not in r.stderr
        for node in ("datanode1", "datanode2"):
            assert f"{node} takes no new service: drain" in r.stderr, r.stderr
        listed = json.loads(iosea_proc("list", "--all", "--json").stdout)["sessions"]
        assert not [s for s in listed if s["session"] == "drain-all"], listed
