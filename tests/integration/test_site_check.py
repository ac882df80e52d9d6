"""`iosea-wf site check` on the real local site: every check passes, then each one fails for real.

Breakages are real and undone at once: a node drained in Slurm (resumed), tiers of a twin
inventory made read-only, closed and removed (the site's own tiers are never touched), the
Workflow Manager URL pointed at a socket nobody listens on, and a ganesha port nothing answers on
(a twin inventory naming another port while a real session's ganesha runs on datanode1).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import write_wdf
from tests.integration.test_drained_datanodes import drained
from tests.sites import LOCAL_SITE

BIN = Path(sys.executable).parent
CHECKS_PER_KIND = {"reachable": 7, "munge": 7, "clock": 7, "slurmctld": 1, "slurmd": 6, "ganesha": 2}


def site_check(*args: str, site: Path | None = None, url: str | None = None) -> tuple[int, dict, str]:
    """Run `iosea-wf site check --json` as a process: (exit code, report, stderr)."""
    env = {k: v for k, v in os.environ.items() if k not in ("IOSEA_WF_SITE", "IOSEA_WF_URL", "IOSEA_WF_HOME")}
    if site is not None:
        env["IOSEA_WF_SITE"] = str(site)
    if url is not None:
        env["IOSEA_WF_URL"] = url
    done = subprocess.run(
        [str(BIN / "iosea-wf"), "site", "check", "--json", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout), done.stderr


def lines(report: dict, check: str) -> dict[str, dict]:
    """{host: line} of one check."""
    return {c["host"]: c for c in report["checks"] if c["check"] == check}


def failed(report: dict) -> set[tuple[str, str]]:
    return {(c["host"], c["check"]) for c in report["checks"] if c["status"] == "FAIL"}


def twin(tmp_path: Path, *, tiers: dict[str, Path] | None = None, hosts: dict | None = None) -> Path:
    """A copy of the local inventory, with its own tier directories and host variables if given."""
    copy = tmp_path / "site"
    shutil.copytree(LOCAL_SITE, copy)
    if tiers is not None:
        path = copy / "group_vars" / "all" / "iosea.yml"
        data = yaml.safe_load(path.read_text())
        data["iosea_tiers"] = {n: {"path": str(p), "tool": "builtin"} for n, p in tiers.items()}
        path.write_text(yaml.safe_dump(data))
    if hosts:
        path = copy / "hosts.yml"
        data = yaml.safe_load(path.read_text())
        for group in ("datanodes", "slurm_controller", "workflow_manager"):
            for name, extra in hosts.items():
                members = data["all"]["children"][group].get("hosts") or {}
                if name in members:
                    members[name] = {**(members[name] or {}), **extra}
        for module in data["all"]["children"]["compute"]["children"].values():
            for name, extra in hosts.items():
                if name in module["hosts"]:
                    module["hosts"][name] = {**(module["hosts"][name] or {}), **extra}
        path.write_text(yaml.safe_dump(data))
    return copy


def test_every_check_of_the_local_site_passes():
    code, report, err = site_check()
    assert code == 0, (failed(report), err)
    assert report["ok"] and report["failed"] == 0
    assert len(report["hosts"]) == 7
    for kind, count in CHECKS_PER_KIND.items():
        assert len(lines(report, kind)) == count, kind
        assert {c["status"] for c in lines(report, kind).values()} == {"ok"}, kind
    tiers = [c for c in report["checks"] if c["check"].startswith("tier ")]
    # flash, disk and tape on the controller and on both datanodes: where tier directories are made
    # and where data movers write.
    assert sorted({c["host"] for c in tiers}) == ["datanode1", "datanode2", "localhost"]
    assert len(tiers) == 9 and {c["status"] for c in tiers} == {"ok"}
    wm = lines(report, "workflow_manager")["localhost"]
    assert wm["status"] == "ok" and "unix:///run/iosea-wf/wm.sock" in wm["detail"]
    assert "local connection" in lines(report, "reachable")["datanode1"]["detail"]
    assert report["clock_tolerance_s"] == 15
    # Text: one line per host and check, then the summary; the munge key never shown.
    done = subprocess.run(
        [str(BIN / "iosea-wf"), "site", "check"], capture_output=True, text=True, timeout=120
    )
    body = done.stdout.splitlines()
    assert done.returncode == 0 and len(body) == 2 + len(report["checks"]) + 1
    assert (
        body[-1].startswith(f"summary: {len(report['checks'])} checks on 7 hosts")
        and "all passed" in body[-1]
    )
    key = Path("/etc/munge/munge.key").read_bytes()
    assert key.hex()[:16] not in done.stdout and key.hex()[:16] not in json.dumps(report)


def test_a_drained_node_fails_its_slurmd_check():
    with drained("gpu-node2"):
        code, report, _ = site_check()
        assert code == 13
        line = lines(report, "slurmd")["gpu-node2"]
        assert line["status"] == "FAIL"
        assert line["detail"] in ("drained in Slurm (iosea-wf test)", "draining in Slurm (iosea-wf test)")
        assert failed(report) == {("gpu-node2", "slurmd")}
        assert "gpu-node2 (slurmd)" in report["summary"]
    code, report, _ = site_check()
    assert code == 0, failed(report)


@pytest.fixture
def tier_dirs(tmp_path):
    """Three tier directories of a twin site (mode 1777 like the site's), read-only mounts undone after."""
    dirs = {name: tmp_path / "tiers" / name for name in ("flash", "disk", "tape")}
    for path in dirs.values():
        path.mkdir(parents=True)
        path.chmod(0o1777)
    yield dirs
    for path in dirs.values():
        while os.path.ismount(path):
            subprocess.run(["umount", str(path)], check=True, timeout=30)


def test_a_tier_made_unwritable_closed_or_removed_fails(tmp_path, tier_dirs):
    site = twin(tmp_path, tiers=tier_dirs)
    code, report, _ = site_check(site=site)
    assert code == 0, failed(report)
    flash = str(tier_dirs["flash"])
    # Read-only for everyone, root included: a bind mount of it over itself, remounted ro.
    subprocess.run(["mount", "--bind", flash, flash], check=True, timeout=30)
    subprocess.run(["mount", "-o", "remount,bind,ro", flash], check=True, timeout=30)
    tier_dirs["disk"].chmod(0o700)
    tier_dirs["tape"].rmdir()
    try:
        code, report, _ = site_check(site=site)
    finally:
        subprocess.run(["umount", flash], check=True, timeout=30)
        tier_dirs["disk"].chmod(0o1777)
        tier_dirs["tape"].mkdir()
        tier_dirs["tape"].chmod(0o1777)
    assert code == 13
    hosts = ("localhost", "datanode1", "datanode2")
    assert failed(report) == {(h, f"tier {t}") for h in hosts for t in ("flash", "disk", "tape")}
    assert (
        lines(report, "tier flash")["datanode1"]["detail"] == f"{flash}: not writable: Read-only file system"
    )
    assert "mode 0700: other users cannot enter it" in lines(report, "tier disk")["localhost"]["detail"]
    assert "missing (No such file or directory)" in lines(report, "tier tape")["datanode2"]["detail"]
    # Restored: passes again, and nothing of the probe is left in the tiers.
    code, report, _ = site_check(site=site)
    assert code == 0, failed(report)
    assert all(not os.listdir(p) for p in tier_dirs.values())


def test_a_workflow_manager_nobody_answers_fails(tmp_path):
    dead = tmp_path / "dead.sock"
    # A socket file nobody listens on: what a killed service leaves behind.
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(dead))
    code, report, _ = site_check(url=f"unix://{dead}")
    assert code == 13
    assert failed(report) == {("localhost", "workflow_manager")}
    detail = lines(report, "workflow_manager")["localhost"]["detail"]
    assert detail.startswith(f"no answer at unix://{dead}") and "Connection refused" in detail
    code, report, _ = site_check(url="http://127.0.0.1:9")
    assert (
        code == 13
        and "no answer at http://127.0.0.1:9" in lines(report, "workflow_manager")["localhost"]["detail"]
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_ganesha_port_nothing_answers_on_fails(tmp_path, iosea_proc):
    # A real session's export makes datanode1's ganesha run (it starts with its first export).
    wdf = write_wdf(tmp_path / "wdf.yaml", [tmp_path / "ns1"], tag="check")
    r = iosea_proc("start", f"WORKFLOW={wdf}", "SESSION=site-check", "--json")
    assert r.returncode == 0, r.stderr
    try:
        datanode = json.loads(r.stdout)["services"][0]["datanode"]
        code, report, _ = site_check()
        assert code == 0, failed(report)
        line = lines(report, "ganesha")[datanode]
        port = {"datanode1": 20491, "datanode2": 20591}[datanode]
        assert line["detail"].startswith(f"answers NFSv4 at 127.0.0.1:{port} and MOUNT v3 at port {port + 1}")
        nowhere = _free_port()
        code, report, _ = site_check(site=twin(tmp_path, hosts={datanode: {"nfs_ganesha_port": nowhere}}))
        assert code == 13
        assert failed(report) == {(datanode, "ganesha")}
        detail = lines(report, "ganesha")[datanode]["detail"]
        assert f"nothing answers NFSv4 at 127.0.0.1:{nowhere}" in detail
        assert f"instance.json has port {port} where the inventory says {nowhere}" in detail
    finally:
        assert iosea_proc("stop", "SESSION=site-check").returncode == 0
