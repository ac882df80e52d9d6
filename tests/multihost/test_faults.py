"""Faults of separate hosts: a datanode's nfs-ganesha killed, a datanode's link cut and plugged back."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.multihost.conftest import HARNESS, on, own, status, wait_for

WDF = """\
workflow:
  name: faults
services:
- name: es1
  type: NFS
  attributes:
    namespace: "{{ NS1 }}"
    mountpoint: "/mnt/iosea-test/{{ USER }}/faults/{{ SESSION }}/es1"
    flavor: small
steps:
- name: s
  command: "sbatch job.sh"
  services:
    - name: es1 RW
"""
INSTANCE = "/var/lib/iosea-wf/multihost/ganesha/{host}"
CONTROL = "/usr/local/libexec/iosea-wf/ganesha-export"


def _start(alice, cli, session: str) -> dict:
    ns = own(alice, Path(alice.pw_dir, f"{session}-ns"))
    own(alice, Path(alice.pw_dir, "wdf.yaml"), WDF, 0o600)
    started = cli("start", "WORKFLOW=wdf.yaml", f"SESSION={session}", f"NS1={ns}", "--json")
    assert started.returncode == 0, started.stderr
    (svc,) = json.loads(started.stdout)["services"]
    return svc


def _exports(host: str) -> list[dict]:
    listed = on(host, CONTROL, "list", "--instance", INSTANCE.format(host=host), timeout=30)
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)["exports"]


def test_a_killed_ganesha_shows_its_services_lost_and_stop_cleans(alice, cli):
    svc = _start(alice, cli, "kill1")
    host = svc["datanode"]
    pid = on(host, "cat", INSTANCE.format(host=host) + "/ganesha.pid").stdout.strip()
    assert pid.isdigit()
    assert on(host, "kill", "-9", pid).returncode == 0
    lost = wait_for(
        "es1 LOST", lambda: [s for s in status(cli, "kill1")["services"] if s["state"] == "LOST"], timeout=30
    )
    assert "does not answer" in lost[0]["error"] or "did not answer" in lost[0]["error"], lost
    stopped = cli("stop", "SESSION=kill1", "--json")
    assert stopped.returncode == 0, stopped.stderr
    assert status(cli, "kill1")["state"] == "STOPPED"
    assert [e for e in _exports(host) if e["pseudo"].startswith(f"/iosea/{alice.pw_name}/")] == []


def _link(host: str, state: str) -> None:
    subprocess.run([sys.executable, str(HARNESS), "link", host, state], check=True, timeout=20)


@pytest.fixture
def plugged():
    """Whatever link a test cuts is plugged back, and its node idle again, afterwards."""
    cut: list[str] = []
    yield cut
    for host in cut:
        _link(host, "up")


def test_a_datanode_cut_off_is_lost_within_30_s_and_stop_finishes_once_it_is_back(alice, cli, plugged):
    svc = _start(alice, cli, "cut1")
    host = svc["datanode"]
    plugged.append(host)
    _link(host, "down")
    since = time.monotonic()
    lost = wait_for(
        "es1 LOST", lambda: [s for s in status(cli, "cut1")["services"] if s["state"] == "LOST"], timeout=30
    )
    assert time.monotonic() - since < 30
    assert host in lost[0]["error"], lost

    # stop releases what it can and says what it could not clean: the export on the cut-off host.
    first = cli("stop", "SESSION=cut1", timeout=120)
    assert first.returncode != 0
    said = first.stdout + first.stderr
    assert "could not be torn down" in said and "es1" in said, said
    assert status(cli, "cut1")["state"] == "FAILED"

    _link(host, "up")
    wait_for("ssh to the datanode again", lambda: on("wm", "true").returncode == 0, timeout=20)
    again = wait_for(
        "a second stop that finishes",
        lambda: (d := cli("stop", "SESSION=cut1", "--json", timeout=120)).returncode == 0 and d,
        timeout=90,
        every=3,
    )
    assert json.loads(again.stdout)["state"] == "STOPPED"
    assert [e for e in _exports(host) if e["pseudo"].startswith(f"/iosea/{alice.pw_name}/")] == []
    wait_for(
        f"{host} idle again",
        lambda: f"{host} idle" in on("login", "sinfo", "-h", "-N", "-o", "%N %t").stdout,
        timeout=90,
        every=2,
    )
