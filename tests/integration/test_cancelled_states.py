"""A cancelled step is CANCELLED, not SKIPPED (issue 14, finding 14), in-process and through the service."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from iosea_wf.site import load_site
from tests.integration import sides as two_ways

cli = two_ways.cli
sides = two_ways.sides  # the fixture: the CLI in-process and through a private service

WDF = """\
workflow:
  name: cancelled
services:
  - name: es
    type: NFS
    attributes:
      namespace: {ns}
      mountpoint: /mnt/iosea-test/{{{{ SESSION }}}}/es
datamovers:
  - name: stage
    trigger: step_start
    target: flash
    operation: copy
    elements: "data/*"
  - name: keep
    trigger: step_stop
    target: disk
    operation: copy
    elements: "data/*"
steps:
  - name: staged
    location: cpu_module
    command: "sbatch -o /dev/null ok.sh"
    services:
      - name: es RW
        datamovers: [stage, keep]
"""


def _final(view) -> bool:
    return all(
        s not in ("PENDING", "RUNNING", "SUBMITTED", "COMPLETING")  # COMPLETING: Slurm still ending it
        for s in [view["state"]] + [m["state"] for m in view["datamovers"]]
    )


def test_a_step_cancelled_while_its_step_start_mover_runs_is_cancelled(tmp_path, sides):
    work = tmp_path / "work"
    work.mkdir()
    (work / "ok.sh").write_text("#!/bin/bash\ntrue\n")
    try:
        for name, env in sides.items():
            ns = tmp_path / f"ns-{name}"
            (ns / "data").mkdir(parents=True)
            # Large enough that the mover is still pending or copying when the cancel comes.
            (ns / "data" / "blob").write_bytes(b"\0" * (256 << 20))
            (work / f"{name}.yaml").write_text(WDF.format(ns=ns))
            r = cli(env, work, "start", f"WORKFLOW={name}.yaml", "SESSION=cnl", "--json")
            assert r.returncode == 0, r.stderr
            for attempt in range(3):
                r = cli(env, work, "run", "SESSION=cnl", "STEP=staged")
                assert r.returncode == 0, (name, r.stderr)
                r = cli(env, work, "cancel", "SESSION=cnl", "STEP=staged", "--json")
                assert r.returncode == 0, (name, r.stderr)
                deadline = time.monotonic() + 30
                while True:
                    view = json.loads(cli(env, work, "status", "SESSION=cnl", "--json").stdout)["steps"][-1]
                    if _final(view) or time.monotonic() > deadline:
                        break
                    time.sleep(0.3)
                stage, keep = view["datamovers"]
                if stage["state"] == "COMPLETED":
                    continue  # the mover won the race with the cancel: try again
                assert stage["state"] == "CANCELLED", (name, attempt, view)
                assert view["state"] == "CANCELLED", (name, attempt, view)
                assert keep["state"] == "CANCELLED", (name, attempt, view)
                r = cli(env, work, "status", "SESSION=cnl")
                assert "SKIPPED" not in r.stdout, (name, r.stdout)
                break
            else:
                raise AssertionError(f"{name}: the step_start mover always completed before its cancel")
    finally:
        stopped = [cli(env, work, "stop", "SESSION=cnl", "--force") for env in sides.values()]
        for tier in load_site().tiers.values():
            for d in Path(tier.path).glob("*/cnl.*"):
                shutil.rmtree(d, ignore_errors=True)
        assert [r.returncode for r in stopped] == [0, 0], [r.stderr for r in stopped]
