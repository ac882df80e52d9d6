"""The multi-host site works as separate hosts: Slurm across hosts, NFS from a datanode to another host,
the design note's workflow for a real user through the Workflow Manager on its own host."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

from tests.multihost.conftest import ADDRESSES, NODES, on, own, status, wait_for

WDF = """\
workflow:
  name: My_Workflow
services:
- name: ephemeral_service_1
  type: NFS
  attributes:
    namespace: "{{ NS1 }}"
    mountpoint: "/mnt/iosea-test/{{ USER }}/My_Workflow/{{ SESSION }}/ES1"
    flavor: medium
- name: ephemeral_service_2
  type: NFS
  attributes:
    namespace: "{{ NS2 }}"
    mountpoint: "/mnt/iosea-test/{{ USER }}/My_Workflow/{{ SESSION }}/ES2"
    flavor: medium
datamovers:
- name: datamover1
  trigger: step_start
  target: flash
  operation: copy
  elements:
    - "input/*"
steps:
- name: step_B
  location:
    - gpu_module
  command: "sbatch My_Step_B"
  services:
    - name: ephemeral_service_2 RW
      datamovers:
        - datamover1
"""
STEP_B = """\
#!/bin/bash
ES2="$IOSEA_SERVICE_EPHEMERAL_SERVICE_2_MOUNTPOINT"
hostname > b.host
id -u > b.uid
cat "$ES2/input/params.txt" > b.read
echo "result of $SLURM_JOB_ID" > "$ES2/out.txt"
stat --file-system --format=%T "$ES2" > b.fstype
"""


def test_sinfo_on_the_login_host_shows_every_node_idle():
    done = on("login", "sinfo", "--noheader", "--Node", "--format=%N %t")
    assert done.returncode == 0, done.stderr
    states = dict(line.split() for line in done.stdout.splitlines())
    assert states == dict.fromkeys(NODES, "idle")


def test_each_host_is_a_host_of_its_own():
    names = {h: on(h, "hostname").stdout.strip() for h in ADDRESSES}
    assert names == {h: h for h in ADDRESSES}
    # Per-host paths are private: each host has its own munge key file and slurm.conf, delivered.
    keys = {h: on(h, "sha256sum", "/etc/munge/munge.key").stdout.split()[:1] for h in ADDRESSES}
    assert len({tuple(k) for k in keys.values()}) == 1 and all(keys.values())
    munged = {h: on(h, "cat", "/run/munge/munged.pid").stdout.strip() for h in ADDRESSES}
    assert len(set(munged.values())) == len(ADDRESSES), munged  # every host its own munged


def test_a_users_job_runs_on_a_compute_host(alice):
    out = Path(alice.pw_dir, "job.out")
    done = on(
        "login", "sbatch", "--wait", "--partition=cpu", "--time=1", f"--output={out}",
        "--wrap", "hostname; id -un; ip -o -4 addr show dev eth0", user=alice.pw_name, cwd=alice.pw_dir,
        timeout=90,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    host, user, addr = out.read_text().splitlines()
    assert (host, user) == ("compute1", alice.pw_name)
    assert ADDRESSES["compute1"] + "/24" in addr


def test_the_design_notes_workflow_across_hosts(alice, cli):
    home = Path(alice.pw_dir)
    Path("/mnt/iosea-test").mkdir(parents=True, exist_ok=True)
    ns1, ns2, work = (own(alice, home / d) for d in ("ns1", "ns2", "work"))
    own(alice, ns1 / "input")
    own(alice, ns1 / "input" / "params.txt", "params of ES1\n", 0o600)
    own(alice, ns2 / "input")
    own(alice, ns2 / "input" / "params.txt", "params of step B\n", 0o600)
    own(alice, work / "wdf.yaml", WDF, 0o600)
    own(alice, work / "My_Step_B", STEP_B)

    started = cli(
        "start", "WORKFLOW=wdf.yaml", "SESSION=mh1", f"NS1={ns1}", f"NS2={ns2}", "--json", cwd=str(work)
    )
    assert started.returncode == 0, started.stderr
    record = json.loads(started.stdout)
    assert record["state"] == "ACTIVE" and record["owner"] == alice.pw_name
    services = {s["name"]: s for s in record["services"]}
    # Each service is served by its datanode's own ganesha, at that host's address.
    for svc in services.values():
        assert urllib.parse.urlsplit(svc["url"]).hostname == ADDRESSES[svc["datanode"]], svc

    # A real NFS client on a compute host reads the export as alice; the login host is not admitted.
    url = services["ephemeral_service_1"]["url"]
    file_url = _as_user(url, alice, "input/params.txt")
    read = on("compute1", "nfs-cat", file_url, timeout=30)
    assert read.returncode == 0 and read.stdout == "params of ES1\n", read.stderr
    refused = on("login", "nfs-cat", file_url, timeout=30)
    assert refused.returncode != 0

    ran = cli("run", "SESSION=mh1", "STEP=step_B", "--wait", "--json", cwd=str(work), timeout=240)
    assert ran.returncode == 0, ran.stderr
    step = json.loads(ran.stdout)
    assert step["state"] == "COMPLETED" and [m["state"] for m in step["datamovers"]] == ["COMPLETED"]
    assert (work / "b.host").read_text().strip() == "compute2"  # gpu_module's node
    assert (work / "b.uid").read_text().strip() == str(alice.pw_uid)
    assert (work / "b.read").read_text() == "params of step B\n"
    assert (ns2 / "out.txt").read_text() == f"result of {step['job_id']}\n"
    # The site attaches by `nfs`: the step saw its service through the FUSE NFS client, and what it
    # wrote through the datanode's ganesha landed in the namespace as alice's.
    assert (work / "b.fstype").read_text().strip().startswith("fuse"), (work / "b.fstype").read_text()
    assert (ns2 / "out.txt").stat().st_uid == alice.pw_uid
    flash = Path(step["datamovers"][0]["target_path"])
    assert (flash / "input" / "params.txt").read_text() == "params of step B\n"

    assert status(cli, "mh1")["state"] == "ACTIVE"
    stopped = cli("stop", "SESSION=mh1", "--json")
    assert stopped.returncode == 0, stopped.stderr
    assert status(cli, "mh1")["state"] == "STOPPED"
    gone = on("compute1", "nfs-ls", _as_user(url, alice), timeout=30)
    assert gone.returncode != 0
    wait_for("the datanodes idle again", lambda: _nodes_idle(["datanode1", "datanode2"]), timeout=30)


def _nodes_idle(nodes: list[str]) -> bool:
    done = on("login", "sinfo", "--noheader", "--Node", "--format=%N %t")
    states = dict(line.split() for line in done.stdout.splitlines()) if done.returncode == 0 else {}
    return all(states.get(n) == "idle" for n in nodes)


def _as_user(url: str, user, below: str = "") -> str:
    """The libnfs URL of ``below`` in an export, speaking as ``user`` (AUTH_SYS uid and gid)."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path.rstrip("/") + ("/" + below if below else "")
    query = "&".join(q for q in (parts.query, f"uid={user.pw_uid}&gid={user.pw_gid}") if q)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, query, ""))
