"""Real Unix users through the Workflow Manager service: each sees and acts on their own sessions only.

Root runs `iosea-wf serve`; two fresh users (useradd, removed afterwards) run the CLI from a venv
of Debian's /usr/bin/python3 that holds the project's wheel and only what the client side needs
(no Ansible, no FastAPI: a login node's CLI talks to the service, it runs nothing itself).
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import subprocess
import time
from pathlib import Path

from iosea_wf import slurm
from iosea_wf.api.app import SUBMITS_AS_CALLER
from tests.integration.conftest import nfs_list
from tests.integration.test_allocations import job_info
from tests.unix_users import fresh_uid

SERVICE_WDF = """\
workflow:
  name: users_nfs
services:
  - name: es1
    type: NFS
    attributes:
      namespace: {ns}
      mountpoint: /mnt/iosea-test/{{{{ SESSION }}}}/es1
steps:
  - name: step1
    location: cpu_module
    command: "sbatch job.sh"
    services:
      - name: es1 RO
"""
WDF = """\
workflow:
  name: users_wf
steps:
  - name: step1
    location: cpu_module
    command: "sbatch job.sh"
"""


def _wdf_of(user: pwd.struct_passwd, text: str = WDF, name: str = "wdf.yaml") -> str:
    """A WDF in the user's home that only the user can read (the service never reads it)."""
    path = Path(user.pw_dir, name)
    path.write_text(text)
    os.chown(path, user.pw_uid, user.pw_gid)
    path.chmod(0o600)
    return str(path)


def _job_script(user: pwd.struct_passwd) -> None:
    path = Path(user.pw_dir, "job.sh")
    path.write_text("#!/bin/sh\nid -un > whoami.txt\n")
    os.chown(path, user.pw_uid, user.pw_gid)
    path.chmod(0o700)


def test_a_user_acts_on_their_own_sessions_only(users, as_user):
    alice, bob = users
    started = as_user(alice, "start", f"WORKFLOW={_wdf_of(alice)}", "SESSION=mine", "--json")
    assert started.returncode == 0, started.stderr
    assert json.loads(started.stdout)["owner"] == alice.pw_name

    listed = as_user(alice, "list", "--json")
    assert [s["session"] for s in json.loads(listed.stdout)["sessions"]] == ["mine"]
    assert json.loads(as_user(bob, "list", "--json").stdout) == {"sessions": []}

    # For bob, alice's session does not exist, whatever the command.
    for argv in (
        ["status", "SESSION=mine"],
        ["stop", "SESSION=mine"],
        ["stop", "SESSION=mine", "--force"],
        ["cancel", "SESSION=mine"],
        ["run", "SESSION=mine", "STEP=step1"],
        ["access", "SESSION=mine", "--", "true"],
    ):
        done = as_user(bob, *argv)
        assert done.returncode == 4, (argv, done.stdout, done.stderr)
        assert f"user {bob.pw_name} has no session named 'mine'" in done.stderr
        assert "Traceback" not in done.stderr

    # alice's own interactive access runs here, as alice, and is recorded by the service.
    for _ in range(10):  # the site is shared: other tests may hold the nodes for a moment
        access = as_user(alice, "access", "SESSION=mine", "--immediate", "--", "id", "-un")
        if not (access.returncode == 8 and "busy" in access.stderr):
            break
        time.sleep(2)
    assert (access.returncode, access.stdout.strip()) == (0, alice.pw_name), access.stderr
    _job_script(alice)
    ran = as_user(alice, "run", "SESSION=mine", "STEP=step1", "--wait")
    if SUBMITS_AS_CALLER:
        assert ran.returncode == 0, ran.stderr
        out = Path(alice.pw_dir, "whoami.txt")
        assert out.read_text().strip() == alice.pw_name and out.stat().st_uid == alice.pw_uid
    else:
        # Never as the service's user: refused until jobs can be submitted as the caller.
        assert ran.returncode == 8, ran.stderr
        assert f"cannot yet submit jobs as {alice.pw_name}" in ran.stderr

    # The same name is free for bob: names are unique per user.
    assert as_user(bob, "start", f"WORKFLOW={_wdf_of(bob)}", "SESSION=mine").returncode == 0
    status = json.loads(as_user(alice, "status", "SESSION=mine", "--json").stdout)
    assert (status["owner"], status["state"]) == (alice.pw_name, "ACTIVE")

    for user in (alice, bob):
        stopped = as_user(user, "stop", "SESSION=mine")
        assert stopped.returncode == 0, stopped.stderr
        assert "session mine: STOPPED" in stopped.stdout
    assert as_user(alice, "list").stdout.startswith("no live session")


def test_a_wdf_only_its_owner_can_read_is_read_by_the_cli_not_the_service(users, as_user):
    alice, bob = users
    wdf = _wdf_of(alice)
    assert as_user(alice, "validate", f"WORKFLOW={wdf}").returncode == 0
    # bob names alice's file: his CLI cannot read it, and the service does not read it for him.
    denied = as_user(bob, "validate", f"WORKFLOW={wdf}")
    assert denied.returncode == 2
    assert "cannot read the workflow description: Permission denied" in denied.stderr


def test_eight_users_starting_two_sessions_each_at_once_are_all_recorded_and_stoppable(as_user):
    tag = secrets.token_hex(3)
    crowd = []
    try:
        for i in range(8):
            name = f"iwf-u{i}-{tag}"
            subprocess.run(
                ["useradd", "-m", "-u", fresh_uid(), "-s", "/bin/sh", name], check=True, capture_output=True
            )
            crowd.append(pwd.getpwnam(name))
        wdfs = {u.pw_name: _wdf_of(u) for u in crowd}
        starts = [
            subprocess.Popen(
                as_user.command(u, "start", f"WORKFLOW={wdfs[u.pw_name]}", f"SESSION=s{k}"),
                cwd=u.pw_dir,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for u in crowd
            for k in (1, 2)
        ]
        for p in starts:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        for u in crowd:
            listed = json.loads(as_user(u, "list", "--json").stdout)["sessions"]
            assert sorted((s["session"], s["owner"]) for s in listed) == [
                ("s1", u.pw_name),
                ("s2", u.pw_name),
            ]
            for k in (1, 2):
                assert as_user(u, "stop", f"SESSION=s{k}").returncode == 0
    finally:
        for u in crowd:
            subprocess.run(["userdel", "-r", u.pw_name], check=False, capture_output=True)


def test_a_service_on_alices_namespace_is_hers_alone(users, as_user):
    alice, bob = users
    ns = Path(alice.pw_dir, "dataset")
    ns.mkdir()
    (ns / "in.txt").write_text("alice's data\n")
    for p in (ns, ns / "in.txt"):
        os.chown(p, alice.pw_uid, alice.pw_gid)
    wdf = SERVICE_WDF.format(ns=ns)
    started = as_user(alice, "start", f"WORKFLOW={_wdf_of(alice, wdf, 'nfs.yaml')}", "SESSION=nfs", "--json")
    assert started.returncode == 0, started.stderr
    record = json.loads(started.stdout)
    assert (record["owner"], record["services"][0]["state"]) == (alice.pw_name, "ACTIVE")

    # bob may read the dataset, but one namespace serves one live session, whoever asks.
    taken = as_user(bob, "start", f"WORKFLOW={_wdf_of(bob, wdf, 'nfs.yaml')}", "SESSION=nfs")
    assert taken.returncode == 5, taken.stderr
    assert f"is already served by session 'nfs' of {alice.pw_name}" in taken.stderr
    assert as_user(bob, "stop", "SESSION=nfs").returncode == 4

    # A namespace bob may not enter is refused at validation, by his own rights.
    ns.chmod(0o700)
    refused = as_user(bob, "validate", f"WORKFLOW={_wdf_of(bob, wdf, 'nfs.yaml')}")
    assert refused.returncode == 2 and f"user {bob.pw_name} may not" in refused.stderr

    stopped = as_user(alice, "stop", "SESSION=nfs", "--json")
    assert stopped.returncode == 0, stopped.stderr
    assert [s["state"] for s in json.loads(stopped.stdout)["services"]] == ["STOPPED"]


def test_stop_force_cancels_as_the_user_with_their_token_never_as_the_service(users, as_user):
    """Issue 14: through the service, `stop --force` cancelled a user's jobs as root, with no token
    of theirs. Without the user's token it now cancels nothing (exit 8); with it, the jobs end."""
    if not SUBMITS_AS_CALLER:
        return
    alice, _ = users
    Path(alice.pw_dir, "job.sh").write_text("#!/bin/sh\nsleep 600\n")
    os.chown(Path(alice.pw_dir, "job.sh"), alice.pw_uid, alice.pw_gid)
    assert as_user(alice, "start", f"WORKFLOW={_wdf_of(alice)}", "SESSION=forced").returncode == 0
    try:
        ran = as_user(alice, "run", "SESSION=forced", "STEP=step1", "--json")
        assert ran.returncode == 0, ran.stderr
        job = json.loads(ran.stdout)["job_id"]
        # A client whose `scontrol token` fails sends no token: the service must not cancel as root.
        argv = as_user.command(alice, "stop", "SESSION=forced", "--force")
        argv.insert(argv.index("-i") + 1, "SLURM_CONF=/nonexistent/slurm.conf")
        tokenless = subprocess.run(argv, cwd=alice.pw_dir, capture_output=True, text=True, timeout=60)
        assert tokenless.returncode == 8, (tokenless.returncode, tokenless.stderr)
        assert f"no Slurm token of user {alice.pw_name}" in tokenless.stderr, tokenless.stderr
        squeue = subprocess.run(["squeue", "-h", "-j", job, "-o", "%u %T"], capture_output=True, text=True)
        assert squeue.stdout.split() == [alice.pw_name, "RUNNING"] or squeue.stdout.split()[1:] == ["PENDING"]
    finally:
        stopped = as_user(alice, "stop", "SESSION=forced", "--force")
    assert stopped.returncode == 0, stopped.stderr
    left = subprocess.run(["squeue", "-h", "-u", alice.pw_name], capture_output=True, text=True)
    assert left.stdout.strip() == "", left.stdout


# Issue 16, section 3: a service's Slurm allocation is the owner's job, and when an administrator
# cancels it the service's watch tears the export down by itself (no `status` needed).
def test_alices_allocation_is_hers_and_its_end_tears_her_service_down(users, as_user):
    """~10 s (plus the module's venv and service): start as alice; her job holds the flavor's
    resources; scancel by root -> within 10 s her export no longer answers nfs-ls, status says
    LOST with why; stop cleans the rest."""
    alice, _ = users
    ns = Path(alice.pw_dir, "held")
    ns.mkdir()
    (ns / "in.txt").write_text("alice's data\n")
    for p in (ns, ns / "in.txt"):
        os.chown(p, alice.pw_uid, alice.pw_gid)
    wdf = _wdf_of(alice, SERVICE_WDF.format(ns=ns), "held.yaml")
    started = as_user(alice, "start", f"WORKFLOW={wdf}", "SESSION=held", "--json")
    assert started.returncode == 0, started.stderr
    try:
        svc = json.loads(started.stdout)["services"][0]
        info = job_info(svc["allocation"])
        assert info["UserId"] == f"{alice.pw_name}({alice.pw_uid})", info
        assert info["JobName"] == "iosea.held.svc.es1" and info["JobState"] == "RUNNING", info
        assert info["NumCPUs"] == "2" and info["MinMemoryNode"] == "5000M", info  # flavor small
        assert "in.txt" in nfs_list(svc["url"]).stdout

        subprocess.run(["scancel", svc["allocation"]], check=True, timeout=30)
        deadline = time.monotonic() + 10
        while nfs_list(svc["url"]).returncode == 0:
            assert time.monotonic() < deadline, "the export outlived its allocation by 10 s"
            time.sleep(0.5)
        view = json.loads(as_user(alice, "status", "SESSION=held", "--json").stdout)
        (lost,) = view["services"]
        assert lost["state"] == "LOST", view
        assert lost["error"] == f"its Slurm allocation {svc['allocation']} ended: CANCELLED", lost
        shown = as_user(alice, "status", "SESSION=held").stdout
        assert svc["allocation"] in shown and "ended: CANCELLED" in shown, shown
    finally:
        stopped = as_user(alice, "stop", "SESSION=held")
    assert stopped.returncode == 0, stopped.stderr
    assert slurm.job_states([svc["allocation"]])[svc["allocation"]].state == "CANCELLED"
