"""Datanode resources held in Slurm (issue 16, section 3): each ephemeral service holds a Slurm
allocation on its datanode, sized by its flavor, as the session owner's job; Slurm decides whether a
datanode has room; the export lives as long as its allocation; stop cancels the allocations."""

from __future__ import annotations

import json
import subprocess
import time
from contextlib import contextmanager

import pytest

from iosea_wf import slurm
from iosea_wf.errors import ResourcesUnavailable
from tests.integration.conftest import nfs_list, write_wdf
from tests.integration.test_interrupts import exports_of, slurm_jobs


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job` of one job, as {Key: value}."""
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return dict(word.split("=", 1) for word in out.split() if "=" in word)


def status(run, session: str) -> dict:
    r = run("status", f"SESSION={session}", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@contextmanager
def competing(cores: int = 29, seconds: int = 60):
    """Jobs of another user of the datanodes partition, holding ``cores`` of each datanode inside.

    29 of 32: a `medium` service (4 cores) no longer fits, while a one-core data mover of another
    test running meanwhile still does.
    """
    ids = []
    try:
        for node in ("datanode1", "datanode2"):
            argv = ["sbatch", "--parsable", "-p", "datanodes", "-w", node, "-c", str(cores),
                    "--mem=1000", "-J", "iosea-test-competitor", "-o", "/dev/null",
                    f"--wrap=sleep {seconds}"]  # fmt: skip
            ids.append(subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip())
        deadline = time.monotonic() + 10
        while not all(js.state == "RUNNING" for js in slurm.job_states(ids).values()):
            assert time.monotonic() < deadline, slurm.job_states(ids)
            time.sleep(0.1)
        yield ids
    finally:
        slurm.cancel(ids)


def assert_nothing_left(run, session: str) -> None:
    deadline = time.monotonic() + 10
    while slurm_jobs(session) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not slurm_jobs(session), slurm_jobs(session)
    assert not exports_of(session)


def test_each_service_holds_an_allocation_of_its_flavor_until_stop(tmp_path, iosea_proc):
    """In-process as root (~6 s): one RUNNING job per service, the flavor's cores and memory, on
    the service's datanode; status shows its id; stop cancels them all."""
    wdf = write_wdf(tmp_path / "wdf.yaml", [tmp_path / "a", tmp_path / "b"], flavor="medium", tag="alloc")
    r = iosea_proc("start", f"WORKFLOW={wdf}", "SESSION=alloc-held", "--json")
    assert r.returncode == 0, r.stderr
    try:
        services = json.loads(r.stdout)["services"]
        assert len(services) == 2
        for svc in services:
            info = job_info(svc["allocation"])
            assert info["JobName"] == f"iosea.alloc-held.svc.{svc['name']}", info
            assert info["JobState"] == "RUNNING", info
            assert info["Partition"] == "datanodes" and info["NodeList"] == svc["datanode"], info
            assert info["NumCPUs"] == "4" and info["MinMemoryNode"] == "10000M", info
            assert info["UserId"].startswith("root("), info
            assert info["StdOut"] == "/dev/null", info
        text = iosea_proc("status", "SESSION=alloc-held")
        assert all(svc["allocation"] in text.stdout for svc in services), text.stdout
        assert set(slurm_jobs("alloc-held")) == {s["allocation"] for s in services}
    finally:
        assert iosea_proc("stop", "SESSION=alloc-held").returncode == 0
    # Cancelled by stop; a job may still be COMPLETING for a moment (its node ends it).
    deadline = time.monotonic() + 10
    while True:
        states = slurm.job_states([s["allocation"] for s in services])
        if all(js.state != "COMPLETING" for js in states.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {js.state for js in states.values()} == {"CANCELLED"}, states
    assert_nothing_left(iosea_proc, "alloc-held")


def test_a_start_slurm_has_no_room_for_is_refused_with_exit_6(tmp_path, iosea_proc):
    """Another job holds the datanodes' cores (~10 s): start exits 6 within 10 s naming the datanode
    and Slurm's reason, and leaves no job, no export and no live session."""
    wdf = write_wdf(tmp_path / "wdf.yaml", [tmp_path / "a"], flavor="medium", tag="full")
    with competing():
        began = time.monotonic()
        r = iosea_proc("start", f"WORKFLOW={wdf}", "SESSION=alloc-full")
        took = time.monotonic() - began
    try:
        assert r.returncode == 6, (r.returncode, r.stderr)
        assert took < 10, took
        assert "Slurm has no room" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert "on datanode" in r.stderr and "PENDING (Resources)" in r.stderr, r.stderr
        assert status(iosea_proc, "alloc-full")["state"] == "FAILED"
        assert_nothing_left(iosea_proc, "alloc-full")
    finally:
        stopped = iosea_proc("stop", "SESSION=alloc-full", "--force")
    assert stopped.returncode == 5, stopped.stderr  # nothing was left to stop


def test_wait_resources_waits_for_the_competing_job_to_end(tmp_path, iosea_proc):
    """--wait-resources 60s (~8 s): start says it waits, then starts once the competing job ends."""
    wdf = write_wdf(tmp_path / "wdf.yaml", [tmp_path / "a"], flavor="medium", tag="wait")
    with competing(seconds=4):
        began = time.monotonic()
        r = iosea_proc("start", f"WORKFLOW={wdf}", "SESSION=alloc-wait", "--wait-resources", "60s", "--json")
        took = time.monotonic() - began
    try:
        assert r.returncode == 0, r.stderr
        assert "waiting up to 60 s for Slurm" in r.stderr, r.stderr
        assert took > 2, took
        assert json.loads(r.stdout)["state"] == "ACTIVE"
    finally:
        assert iosea_proc("stop", "SESSION=alloc-wait").returncode == 0
    assert_nothing_left(iosea_proc, "alloc-wait")


def test_bad_durations_are_usage_errors(iosea_proc, tmp_path):
    """~1 s: a duration is 90s, 30m, 12h or 7d."""
    for bad in ("10", "1w", "-5s", "1.5h", ""):
        r = iosea_proc("start", "WORKFLOW=x.yaml", "SESSION=s", f"--wait-resources={bad}")
        assert r.returncode == 2 and "is not a duration" in r.stderr, (bad, r.stderr)


def test_slurm_refuses_an_allocation_bigger_than_the_datanode():
    """A request no datanode can ever hold is refused by Slurm's own answer (~0.1 s)."""
    with pytest.raises(ResourcesUnavailable, match="Requested node configuration is not available"):
        slurm.submit_allocation("iosea.alloc-big.svc.es1", "datanodes", "datanode1", 40, 1000)


def test_an_allocation_cancelled_by_the_administrator_loses_its_service(tmp_path, iosea_proc):
    """scancel of a service's allocation (~8 s): status shows it LOST with the reason, its export no
    longer answers a real NFS client; stop cleans the rest."""
    wdf = write_wdf(tmp_path / "wdf.yaml", [tmp_path / "a", tmp_path / "b"], tag="lost")
    (tmp_path / "a" / "f.txt").write_text("x")
    r = iosea_proc("start", f"WORKFLOW={wdf}", "SESSION=alloc-lost", "--json")
    assert r.returncode == 0, r.stderr
    try:
        es1, es2 = json.loads(r.stdout)["services"]
        assert "f.txt" in nfs_list(es1["url"]).stdout
        subprocess.run(["scancel", es1["allocation"]], check=True, timeout=30)
        deadline = time.monotonic() + 10
        while (view := status(iosea_proc, "alloc-lost"))["services"][0]["state"] != "LOST":
            assert time.monotonic() < deadline, view
            time.sleep(0.5)
        lost, kept = view["services"]
        assert lost["error"] == f"its Slurm allocation {es1['allocation']} ended: CANCELLED", lost
        assert kept["state"] == "ACTIVE", kept
        assert nfs_list(es1["url"]).returncode != 0
        assert nfs_list(es2["url"]).returncode == 0
        # A step or an access that would attach the lost service is refused, nothing submitted.
        (tmp_path / "job.sh").write_text("#!/bin/sh\ntrue\n")
        for argv in (["run", "STEP=step1"], ["access", "--immediate", "--", "true"]):
            r = iosea_proc(argv[0], "SESSION=alloc-lost", *argv[1:], cwd=tmp_path)
            assert r.returncode == 5 and "service es1 is LOST" in r.stderr, (argv, r.stderr)
            assert "Traceback" not in r.stderr
        assert status(iosea_proc, "alloc-lost")["steps"] == []
    finally:
        r = iosea_proc("stop", "SESSION=alloc-lost")
    assert r.returncode == 0, r.stderr
    assert_nothing_left(iosea_proc, "alloc-lost")
