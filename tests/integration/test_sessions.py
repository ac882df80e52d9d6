"""Sessions on the real local site: start, list, status, stop, with real nfs-ganesha exports."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from iosea_wf import store as st
from tests.integration.conftest import BIN, nfs_list, nfs_read, write_wdf


def _allocations(state_dir):
    with st.Store(state_dir).transaction(shared=True) as tx:
        return tx.allocations.all()


def test_start_serves_namespace_then_stop_removes_it(iosea, tmp_path, state_dir):
    ns = tmp_path / "ns1"
    ns.mkdir()
    (ns / "hello.txt").write_text("hello through NFS\n")
    wdf = write_wdf(tmp_path / "wf.yaml", [ns])

    r = iosea("start", f"WORKFLOW={wdf}", "SESSION=s1", "--json")
    assert r.code == 0, r.err
    svc = r.json()["services"][0]
    assert svc["state"] == "ACTIVE" and svc["datanode"].startswith("datanode")
    assert svc["url"].startswith("nfs://127.0.0.1" + str(ns) + "?nfsport=")
    assert "es1: ready" in r.err  # one progress line per service

    read = nfs_read(svc["url"], "hello.txt")
    assert read.returncode == 0, read.stderr
    assert read.stdout == "hello through NFS\n"

    status = iosea("status", "SESSION=s1", "--json").json()
    assert {"session", "workflow", "state", "services"} <= set(status)
    assert status["state"] == "ACTIVE"
    assert {"name", "type", "state", "datanode", "url", "mountpoint", "flavor"} <= set(status["services"][0])
    assert _allocations(state_dir)

    listed = iosea("list", "--json").json()["sessions"]
    assert [s["session"] for s in listed] == ["s1"]

    r = iosea("stop", "SESSION=s1")
    assert r.code == 0, r.err
    assert nfs_read(svc["url"], "hello.txt").returncode != 0
    assert not _allocations(state_dir)
    assert (ns / "hello.txt").read_text() == "hello through NFS\n"  # stop never touches the data
    assert iosea("list", "--json").json()["sessions"] == []
    assert iosea("list", "--all", "--json").json()["sessions"][0]["state"] == "STOPPED"
    r = iosea("stop", "SESSION=s1")
    assert r.code == 5 and "already STOPPED" in r.err


def test_same_name_twice_is_refused_and_namespace_is_not_shared(iosea, tmp_path):
    ns = tmp_path / "ns"
    wdf = write_wdf(tmp_path / "wf.yaml", [ns])
    assert iosea("start", f"WORKFLOW={wdf}", "SESSION=dup").code == 0
    try:
        r = iosea("start", f"WORKFLOW={wdf}", "SESSION=dup")
        assert r.code == 5 and "already exists" in r.err
        r = iosea("start", f"WORKFLOW={wdf}", "SESSION=other")
        assert r.code == 5 and "already served by session 'dup'" in r.err
    finally:
        assert iosea("stop", "SESSION=dup").code == 0


def test_sixteen_concurrent_starts_all_succeed(iosea_proc, tmp_path, state_dir):
    wdfs = []
    for i in range(16):
        wdfs.append(write_wdf(tmp_path / f"wf{i}.yaml", [tmp_path / f"ns{i}"], tag=str(i)))
    with ThreadPoolExecutor(16) as pool:
        results = list(
            pool.map(lambda i: iosea_proc("start", f"WORKFLOW={wdfs[i]}", f"SESSION=c{i}"), range(16))
        )
    try:
        assert [r.returncode for r in results] == [0] * 16, [r.stderr for r in results if r.returncode]
        listed = json.loads(iosea_proc("list", "--json").stdout)["sessions"]
        assert sorted(s["session"] for s in listed) == sorted(f"c{i}" for i in range(16))
        assert all(s["state"] == "ACTIVE" for s in listed)
        assert len(_allocations(state_dir)) == 16
        urls = [s["services"][0]["url"] for s in listed]
        assert all(nfs_list(u).returncode == 0 for u in urls[:4])
    finally:
        with ThreadPoolExecutor(8) as pool:
            stops = list(pool.map(lambda i: iosea_proc("stop", f"SESSION=c{i}"), range(16)))
    assert [r.returncode for r in stops] == [0] * 16, [r.stderr for r in stops if r.returncode]
    assert not _allocations(state_dir)


def test_eight_concurrent_starts_of_one_name_exactly_one_wins(iosea_proc, tmp_path, state_dir):
    wdfs = [write_wdf(tmp_path / f"wf{i}.yaml", [tmp_path / f"ns{i}"], tag=str(i)) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda w: iosea_proc("start", f"WORKFLOW={w}", "SESSION=same"), wdfs))
    codes = sorted(r.returncode for r in results)
    try:
        assert codes == [0] + [5] * 7, [r.stderr for r in results]
        assert all("already exists" in r.stderr for r in results if r.returncode == 5)
        assert len(_allocations(state_dir)) == 1
    finally:
        assert iosea_proc("stop", "SESSION=same").returncode == 0
    assert not _allocations(state_dir)


def test_start_larger_than_datanodes_fails_cleanly(iosea, tmp_path, state_dir):
    # Five `max` services (28 cores each) cannot fit on two 32-core datanodes.
    wdf = write_wdf(tmp_path / "wf.yaml", [tmp_path / f"ns{i}" for i in range(5)], flavor="max")
    r = iosea("start", f"WORKFLOW={wdf}", "SESSION=big")
    assert r.code == 6
    assert "fits on no datanode" in r.err and "cores more" in r.err
    assert not _allocations(state_dir)
    assert iosea("list", "--all", "--json").json()["sessions"] == []


def test_failing_service_rolls_the_session_back(iosea, tmp_path, state_dir, monkeypatch):
    good = tmp_path / "good"
    good.mkdir()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    wdf = write_wdf(tmp_path / "wf.yaml", [good, blocker / "ns"], create=False)
    # Validation would refuse the impossible namespace (exit 2): let it through, so the control
    # script on the datanode is the one that refuses it, as it would a namespace removed meanwhile.
    monkeypatch.setattr("iosea_wf.wdf.checks.namespaces", lambda *args: None)
    r = iosea("start", f"WORKFLOW={wdf}", "SESSION=rb")
    assert r.code == 7, r.err
    assert "service es2" in r.err and "torn down" in r.err
    session = iosea("status", "SESSION=rb", "--json").json()
    assert session["state"] == "FAILED"
    assert not _allocations(state_dir)
    port_url = next(s["url"] for s in session["services"] if s["name"] == "es1")
    assert nfs_list(port_url).returncode != 0
    # the name is free again once the failed session left nothing behind
    wdf_ok = write_wdf(tmp_path / "ok.yaml", [good])
    assert iosea("start", f"WORKFLOW={wdf_ok}", "SESSION=rb").code == 0
    assert iosea("stop", "SESSION=rb").code == 0


def test_kill_during_start_then_stop_leaves_nothing(cli_env, iosea_proc, tmp_path, state_dir):
    wdf = write_wdf(tmp_path / "wf.yaml", [tmp_path / "nsa", tmp_path / "nsb"])
    proc = subprocess.Popen(
        [str(BIN / "iosea-wf"), "start", f"WORKFLOW={wdf}", "SESSION=killed"],
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Kill it once provisioning has begun (the session is recorded STARTING with its allocations).
    deadline = time.time() + 60
    while time.time() < deadline:
        if (state_dir / "runs").exists() and any((state_dir / "runs").iterdir()):
            break
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    listed = json.loads(iosea_proc("list", "--json").stdout)["sessions"]
    # Its start is dead: shown INTERRUPTED, never STARTING forever (issue 14).
    assert listed and listed[0]["state"] in ("INTERRUPTED", "ACTIVE")
    r = iosea_proc("stop", "SESSION=killed")
    assert r.returncode == 0, r.stderr
    assert not _allocations(state_dir)
    for svc in json.loads(iosea_proc("status", "SESSION=killed", "--json").stdout)["services"]:
        assert nfs_list(svc["url"]).returncode != 0
