"""Session sharing between real users through a private Workflow Manager service.

alice (the owner) and bob (useradd'd, removed afterwards: tests/integration/service_users.py)
run the CLI as themselves (runuser) through `iosea-wf serve`, which decides who they are from
MUNGE and the socket's peer. Sharing grants the session, not the files: the namespace belongs
to a group of both users (setgid directory, mode 2770), as a real project's dataset would.
"""

from __future__ import annotations

import grp
import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.service_users import TIERS

WDF = """\
workflow:
  name: shared_wf
services:
  - name: es1
    type: NFS
    attributes:
      namespace: {ns}
      mountpoint: /mnt/iosea-test/{{{{ SESSION }}}}/es1
datamovers:
  - name: keep
    trigger: step_stop
    target: flash
    operation: copy
    elements: "in.txt"
steps:
  - name: write
    location: cpu_module
    command: "sbatch -o /dev/null job.sh 0"
    services:
      - name: es1 RW
        datamovers: [keep]
  - name: slow
    location: cpu_module
    command: "sbatch -o /dev/null job.sh 4"
    services:
      - name: es1 RW
  - name: long
    location: cpu_module
    command: "sbatch -o /dev/null job.sh 60"
    services:
      - name: es1 RW
"""
# For what needs no service (tokens, an access): starts without Ansible, in a fraction of a second.
PLAIN_WDF = """\
workflow:
  name: shared_plain
steps:
  - name: write
    location: cpu_module
    command: "sbatch -o /dev/null job.sh 0"
"""
# Waits $1 seconds, then says who wrote through the service (the job's own user).
JOB = '#!/bin/sh\nsleep "$1"\nid -un > "$IOSEA_SERVICE_ES1_MOUNTPOINT/by-$(id -un).$1.txt"\n'


@pytest.fixture(scope="module")
def project(users):
    """A group of alice and bob and a namespace of it (2770) holding in.txt: its path."""
    alice, bob = users
    group = f"iwf-proj-{secrets.token_hex(3)}"
    base = Path(f"/tmp/{group}")
    subprocess.run(["groupadd", group], check=True, capture_output=True)
    try:
        for u in (alice, bob):
            subprocess.run(["usermod", "-aG", group, u.pw_name], check=True, capture_output=True)
        gid = grp.getgrnam(group).gr_gid
        ns = base / "ns"
        ns.mkdir(parents=True)
        base.chmod(0o755)
        (ns / "in.txt").write_text("the project's data\n")
        for path, mode in ((ns, 0o2770), (ns / "in.txt", 0o640)):
            os.chown(path, alice.pw_uid, gid)
            path.chmod(mode)
        for u in (alice, bob):
            for name, text, mode in (
                ("wdf.yaml", WDF.format(ns=ns), 0o600),
                ("plain.yaml", PLAIN_WDF, 0o600),
                ("job.sh", JOB, 0o700),
            ):
                path = Path(u.pw_dir, name)
                path.write_text(text)
                os.chown(path, u.pw_uid, u.pw_gid)
                path.chmod(mode)
        yield ns
    finally:
        # A test that failed half-way may leave a job of theirs (an access, a step): userdel
        # refuses a user with a running process, so their jobs go first.
        for u in (alice, bob):
            subprocess.run(["scancel", "-u", u.pw_name], check=False, capture_output=True, timeout=60)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_squeue_of(u) for u in (alice, bob)):
            time.sleep(0.5)
        shutil.rmtree(base, ignore_errors=True)
        subprocess.run(["groupdel", group], check=False, capture_output=True)


# As bob, the answer of the service's access check (what his CLI attaches services from).
ACCESS_KEYS = """\
import json, sys
from iosea_wf.api import client
ctx = client.ServiceContext(sys.argv[1])
path, owner = client._session(sys.argv[2])
print(json.dumps(ctx.call("POST", path + "/access", params=owner)))
"""


def _ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, (done.args[-4:], done.stdout, done.stderr)
    return done


def _refused(done: subprocess.CompletedProcess, code: int, said: str) -> None:
    """One clear line on stderr, the documented exit code, no traceback."""
    assert done.returncode == code, (done.args[-4:], done.returncode, done.stderr)
    assert said in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr


def _start(run, alice, name: str, wdf: str = "wdf.yaml") -> None:
    _ok(run(alice, "start", f"WORKFLOW={alice.pw_dir}/{wdf}", f"SESSION={name}"))


def _background(run, user, *argv: str) -> subprocess.Popen:
    return subprocess.Popen(
        run.command(user, *argv), cwd=user.pw_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _running_access(run, owner, session: str, user) -> list[dict]:
    """The session's accesses, as its owner's `status` shows them once ``user``'s runs (within 60 s)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        seen = json.loads(_ok(run(owner, "status", f"SESSION={session}", "--json")).stdout)["accesses"]
        if any(a["job_id"] and a["state"] == "RUNNING" for a in seen):
            break
        time.sleep(0.3)
    assert [(a["user"], a["state"]) for a in seen] == [(user.pw_name, "RUNNING")], seen
    return seen


def _squeue_of(user) -> str:
    done = subprocess.run(["squeue", "-h", "-u", user.pw_name], capture_output=True, text=True, timeout=60)
    return done.stdout.strip()


def _squeue_user(job_id: str) -> str:
    done = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%u"], capture_output=True, text=True)
    return done.stdout.strip()


def test_a_read_only_share_shows_the_session_mounts_it_read_only_and_refuses_run_stop_share(
    users, as_user, project, service, client_bin
):
    alice, bob = users
    ref = f"{alice.pw_name}/ro1"
    _start(as_user, alice, "ro1")
    access = None
    try:
        # Not shared yet: for bob it does not exist.
        _refused(
            as_user(bob, "status", f"SESSION={ref}"), 4, f"no session {ref} is shared with user {bob.pw_name}"
        )
        shared = _ok(as_user(alice, "share", "SESSION=ro1", f"USER={bob.pw_name}"))
        assert f"shared with {bob.pw_name} (ro)" in shared.stdout

        rows = json.loads(_ok(as_user(bob, "list", "--json")).stdout)["sessions"]
        assert [(r["session"], r["owner"], r["shared_mode"]) for r in rows] == [("ro1", alice.pw_name, "ro")]
        assert ref in _ok(as_user(bob, "list")).stdout
        status = json.loads(_ok(as_user(bob, "status", f"SESSION={ref}", "--json")).stdout)
        assert (status["owner"], status["state"], status["shared_mode"]) == (alice.pw_name, "ACTIVE", "ro")

        _refused(as_user(bob, "run", f"SESSION={ref}", "STEP=write"), 12, "read-only")
        _refused(as_user(bob, "stop", f"SESSION={ref}"), 12, f"only {alice.pw_name}, its owner, may stop")
        _refused(as_user(bob, "stop", f"SESSION={ref}", "--force"), 12, "its owner, may stop")
        _refused(as_user(bob, "share", f"SESSION={ref}", f"USER={bob.pw_name}"), 12, "its owner, may share")
        _refused(as_user(bob, "unshare", f"SESSION={ref}", f"USER={bob.pw_name}"), 12, "may unshare")

        # access: bob reads the project's data; the WDF's RW service is mounted read-only for him.
        look = 'cat "$IOSEA_SERVICE_ES1_MOUNTPOINT/in.txt" && touch "$IOSEA_SERVICE_ES1_MOUNTPOINT/x"'
        for _ in range(10):  # the site is shared: other tests may hold the nodes for a moment
            acc = as_user(bob, "access", f"SESSION={ref}", "--immediate", "--", "sh", "-c", look)
            if not (acc.returncode == 8 and "busy" in acc.stderr):
                break
            time.sleep(2)
        assert "the project's data" in acc.stdout, acc.stderr
        assert acc.returncode != 0 and "Read-only file system" in acc.stderr, acc.stderr
        assert not (project / "x").exists()

        # What the service hands bob's CLI to attach the services says nothing of others' shares.
        keys = subprocess.run(
            ["runuser", "-u", bob.pw_name, "--", str(client_bin / "python"), "-c", ACCESS_KEYS, service, ref],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert keys.returncode == 0, keys.stderr
        sent = json.loads(keys.stdout)
        assert sent["shared_mode"] == "ro" and not {"shares", "share_tokens"} & set(sent), sorted(sent)

        # Unshared while his access runs: his new requests are refused, the access runs to its end.
        access = _background(as_user, bob, "access", f"SESSION={ref}", "--", "sleep", "3")
        seen = _running_access(as_user, alice, "ro1", bob)
        _ok(as_user(alice, "unshare", "SESSION=ro1", f"USER={bob.pw_name}"))
        _refused(as_user(bob, "status", f"SESSION={ref}"), 4, "is shared with user")
        assert json.loads(_ok(as_user(bob, "list", "--json")).stdout)["sessions"] == []
        _, err = access.communicate(timeout=60)
        assert access.returncode == 0, err
        ended = json.loads(_ok(as_user(alice, "status", "SESSION=ro1", "--json")).stdout)["accesses"]
        assert seen[0]["job_id"] not in [a["job_id"] for a in ended], ended
    finally:
        if access is not None and access.poll() is None:
            access.kill()
            access.wait(10)
        _ok(as_user(alice, "stop", "SESSION=ro1", "--force"))


def test_a_read_write_share_runs_bobs_own_jobs_and_alices_stop_waits_for_them(
    users,
    as_user,
    project,
):
    alice, bob = users
    ref = f"{alice.pw_name}/rw1"
    _start(as_user, alice, "rw1")
    try:
        _ok(as_user(alice, "share", "SESSION=rw1", f"USER={bob.pw_name}", "--mode", "rw"))
        ran = json.loads(_ok(as_user(bob, "run", f"SESSION={ref}", "STEP=write", "--wait", "--json")).stdout)
        assert (ran["state"], ran["user"]) == ("COMPLETED", bob.pw_name)
        # Through the service, into the group's namespace, as bob himself.
        out = project / f"by-{bob.pw_name}.0.txt"
        assert out.read_text().strip() == bob.pw_name and out.stat().st_uid == bob.pw_uid
        # His data mover, his job too, copied into his own tier directory, not alice's.
        (mover,) = ran["datamovers"]
        assert mover["state"] == "COMPLETED" and mover["target_path"].startswith(
            f"{TIERS}/flash/{bob.pw_name}/"
        )
        kept = Path(mover["target_path"], "in.txt")
        assert kept.read_text() == "the project's data\n" and kept.stat().st_uid == bob.pw_uid

        # bob cancels his own runs only.
        mine = json.loads(_ok(as_user(alice, "run", "SESSION=rw1", "STEP=long", "--json")).stdout)
        _refused(as_user(bob, "cancel", f"SESSION={ref}", "STEP=long"), 12, f"is {alice.pw_name}'s run")
        assert "nothing to cancel" in _ok(as_user(bob, "cancel", f"SESSION={ref}")).stdout
        assert _squeue_user(mine["job_id"]) == alice.pw_name
        _ok(as_user(alice, "cancel", "SESSION=rw1", "STEP=long"))
        # ... and alice, the owner, cancels his: a job that is bob's in Slurm, not hers.
        his = json.loads(_ok(as_user(bob, "run", f"SESSION={ref}", "STEP=long", "--json")).stdout)
        assert _squeue_user(his["job_id"]) == bob.pw_name
        cancelled = _ok(as_user(alice, "cancel", "SESSION=rw1", "STEP=long"))
        assert f"cancelled job(s) {his['job_id']}" in cancelled.stdout

        # bob's slow step: his job in Slurm; unshared, his new requests are refused, his job runs on.
        slow = json.loads(_ok(as_user(bob, "run", f"SESSION={ref}", "STEP=slow", "--json")).stdout)
        assert _squeue_user(slow["job_id"]) == bob.pw_name
        _ok(as_user(alice, "unshare", "SESSION=rw1", f"USER={bob.pw_name}"))
        _refused(as_user(bob, "run", f"SESSION={ref}", "STEP=write"), 4, "is shared with user")
        _refused(as_user(bob, "cancel", f"SESSION={ref}"), 4, "is shared with user")
        steps = json.loads(_ok(as_user(alice, "status", "SESSION=rw1", "--json")).stdout)["steps"]
        assert [(s["name"], s["user"]) for s in steps if s["job_id"] == slow["job_id"]] == [
            ("slow", bob.pw_name)
        ]

        # alice's stop waits for bob's job to end as Slurm ends it (COMPLETED: it wrote its file).
        began = time.monotonic()
        stopped = _ok(as_user(alice, "stop", "SESSION=rw1"))
        assert f"waiting for job(s) {slow['job_id']}" in stopped.stderr, stopped.stderr
        assert (project / f"by-{bob.pw_name}.4.txt").read_text().strip() == bob.pw_name
        assert time.monotonic() - began < 30
    finally:
        as_user(alice, "stop", "SESSION=rw1", "--force")


def test_a_token_joins_once_expires_and_stop_force_ends_a_shared_users_access(
    users,
    as_user,
    project,
):
    alice, bob = users
    ref = f"{alice.pw_name}/tk1"
    _start(as_user, alice, "tk1", "plain.yaml")
    access = None
    try:
        made = _ok(as_user(alice, "share", "SESSION=tk1", "--token"))
        lasting = made.stdout.split()[-1]
        short = json.loads(
            _ok(as_user(alice, "share", "SESSION=tk1", "--token", "--expires", "3s", "--json")).stdout
        )
        made_at = time.monotonic()
        unused = _ok(as_user(alice, "share", "SESSION=tk1", "--token", "--expires", "1s")).stdout.split()[-1]
        _refused(as_user(alice, "share", "SESSION=tk1", "--token", "--expires", "3y"), 2, "is not a duration")

        _refused(as_user(alice, "join", short["token"]), 2, "your own session")
        joined = _ok(as_user(bob, "join", short["token"]))
        assert f"SESSION={ref}" in joined.stdout
        _ok(as_user(bob, "status", f"SESSION={ref}"))
        _refused(as_user(bob, "join", short["token"]), 12, "already used")

        time.sleep(max(0.0, 3.2 - (time.monotonic() - made_at)))
        # The share a token gave ends with the token; a token redeemed too late gives nothing.
        _refused(as_user(bob, "status", f"SESSION={ref}"), 4, "is shared with user")
        _refused(as_user(bob, "join", unused), 12, "expired at")

        _ok(as_user(bob, "join", lasting))
        access = _background(as_user, bob, "access", f"SESSION={ref}", "--", "sleep", "60")
        seen = _running_access(as_user, alice, "tk1", bob)
        assert _squeue_user(seen[0]["job_id"]) == bob.pw_name

        began = time.monotonic()
        stopped = _ok(as_user(alice, "stop", "SESSION=tk1", "--force"))
        assert f"cancelling 1 job(s): {seen[0]['job_id']}" in stopped.stderr, stopped.stderr
        access.wait(30)
        assert access.returncode != 0
        assert time.monotonic() - began < 30
    finally:
        if access is not None and access.poll() is None:
            access.kill()
            access.wait(10)
        as_user(alice, "stop", "SESSION=tk1", "--force")
