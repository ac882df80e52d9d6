"""Jobs run as the user, services attached and data moved for real unprivileged users.

Real Unix users (alice, bob: `useradd -m`, removed afterwards) run the CLI from a venv of Debian's
/usr/bin/python3 (the Python under /root cannot be run by them). Starting and stopping a session's
NFS services needs root on this site (nfs-ganesha is root's), so the session is started and
stopped by the manager running as root for alice, as the Workflow Manager service will; every
step, data mover and access is alice's own: run in-process by alice, or submitted by root with
alice's Slurm token.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.unix_users import fresh_uid

DRIVER = Path(__file__).with_name("manager_for_user.py")
TAPE = "/var/lib/iosea-wf/local/tiers/tape"
# An existing, root-owned ancestor of the mountpoints: alice cannot create her mountpoints in it,
# so the attach helper covers it with a tmpfs inside the job and binds its entries back.
MNT_PARENT = Path("/mnt/iosea-test")

WDF = """\
workflow:
  name: asuser
services:
  - name: ro
    type: NFS
    attributes:
      namespace: {home}/ns_ro
      mountpoint: {mnt}/{{{{ SESSION }}}}/ro
  - name: rw
    type: NFS
    attributes:
      namespace: {home}/ns_rw
      mountpoint: {mnt}/{{{{ SESSION }}}}/rw
datamovers:
  - name: totape
    trigger: step_stop
    target: tape
    operation: move
    elements: "*.out"
steps:
  - name: work
    location: cpu_module
    command: "sbatch job.sh"
    services:
      - name: ro RO
      - name: rw RW
        datamovers: [totape]
"""

# What the step checks from inside the job, written next to it (in alice's work dir).
JOB = """\
#!/bin/bash
[ -f sleep.flag ] && sleep 120
id -u > uid.txt
cat "$IOSEA_SERVICE_RO_MOUNTPOINT/input.dat" > ro-read.txt
RO_NEW="$IOSEA_SERVICE_RO_MOUNTPOINT/new"
touch "$RO_NEW" 2>/dev/null && echo writable > ro-write.txt || echo refused > ro-write.txt
echo "result of $SLURM_JOB_ID" > "$IOSEA_SERVICE_RW_MOUNTPOINT/result-$SLURM_JOB_ID.out"
cat "$MARKER" > marker.txt
env > env.txt
"""


def _sh(*argv: str, user: str | None = None, check: bool = True, **kw) -> subprocess.CompletedProcess:
    full = ["runuser", "-u", user, "--", *argv] if user else list(argv)
    proc = subprocess.run(full, capture_output=True, text=True, timeout=kw.pop("timeout", 180), **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{full} exited {proc.returncode}: {proc.stderr}{proc.stdout}")
    return proc


@pytest.fixture(scope="module")
def users():
    """Two fresh Unix users (alice, bob), removed with their home and tier directories afterwards.

    With a login shell (unlike tests/unix_users.py): a job submitted for them with
    ``--export=NONE`` gets its environment from the user's login, as a real user's would.
    """
    tag = uuid.uuid4().hex[:6]
    names = {"alice": f"iwf-alice-{tag}", "bob": f"iwf-bob-{tag}"}
    for name in names.values():
        _sh("useradd", "-m", "-u", fresh_uid(), "-s", "/bin/bash", name)
    try:
        yield {k: pwd.getpwnam(v) for k, v in names.items()}
    finally:
        for name in names.values():
            uid = pwd.getpwnam(name).pw_uid
            for tier in glob.glob("/var/lib/iosea-wf/local/tiers/*"):
                shutil.rmtree(os.path.join(tier, name), ignore_errors=True)
            shutil.rmtree(f"/tmp/iosea-wf-{uid}", ignore_errors=True)
            # userdel refuses a user who still runs a process: then it is said, not left silently.
            gone = _sh("userdel", "-r", name, check=False)
            assert gone.returncode in (0, 12), f"userdel {name}: {gone.stderr}"  # 12: no mail spool


@pytest.fixture(scope="module")
def jwt_site():
    """The local site with auth/jwt on (the slurm role's default)."""
    conf = _sh("scontrol", "show", "config").stdout
    if "auth/jwt" not in conf:
        pytest.fail("slurmctld runs without AuthAltTypes=auth/jwt: run `make site` from this checkout")


@pytest.fixture(scope="module")
def alice_session(users, user_venv, jwt_site, inprocess_site):
    """An ACTIVE session of alice's on her 0700 namespaces, with her own store under her home.

    In-process (the twin of the local inventory that names no Workflow Manager service): these
    tests are of what runs as alice, the service's tests are elsewhere.
    """
    alice = users["alice"]
    home = Path(alice.pw_dir)
    MNT_PARENT.mkdir(parents=True, exist_ok=True)
    marker = MNT_PARENT / f"marker-{alice.pw_name}"
    marker.write_text("seen through the covered ancestor\n")
    work, state = home / "work", home / "state"
    for d in (home / "ns_ro", home / "ns_rw", work, state):
        d.mkdir(mode=0o700)
    (home / "ns_ro" / "input.dat").write_text("dataset of alice\n")
    (work / "wf.yaml").write_text(WDF.format(home=home, mnt=MNT_PARENT))
    (work / "job.sh").write_text(JOB)
    _sh("chown", "-R", f"{alice.pw_name}:", str(home))
    session = f"asuser{os.getpid()}"

    def as_root_for_alice(*argv: str, token: str | None = None, check: bool = True):
        env = {"PATH": f"{user_venv}:/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
               "IOSEA_WF_WARM_ANSIBLE": "0", "IOSEA_WF_SITE": str(inprocess_site)}  # fmt: skip
        if token:
            env["IOSEA_TEST_JWT"] = token
        proc = _sh(str(user_venv / "python"), str(DRIVER), argv[0], alice.pw_name, str(state), *argv[1:],
                   check=False, cwd=work, env=env)  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"{argv} as root for alice: exit {proc.returncode}: {proc.stderr}")
        return proc

    def as_alice(*argv: str, check: bool = True):
        # No warm ansible-playbook server: it would outlive the test as alice (userdel refuses).
        env = ["env", f"PATH={user_venv}:/usr/bin:/bin", f"HOME={home}", f"IOSEA_WF_HOME={state}",
               f"MARKER={marker}", "LANG=C.UTF-8", "IOSEA_WF_WARM_ANSIBLE=0",
               f"IOSEA_WF_SITE={inprocess_site}"]  # fmt: skip
        return _sh(*env, *argv, user=alice.pw_name, check=check, cwd=work)

    def restore_owner():
        # Root's operations on alice's in-process store leave root-owned files in it.
        _sh("chown", "-R", f"{alice.pw_name}:", str(state))

    # With her token: her services' Slurm allocations are her jobs, submitted and cancelled with it.
    as_root_for_alice("start", "wf.yaml", session, token=_token(alice.pw_name))
    restore_owner()
    try:
        yield {
            "session": session,
            "work": work,
            "home": home,
            "state": state,
            "marker": marker,
            "root_for_alice": as_root_for_alice,
            "alice": as_alice,
            "restore_owner": restore_owner,
        }
    finally:
        as_root_for_alice("stop", session, token=_token(alice.pw_name), check=False)
        marker.unlink(missing_ok=True)


def _token(user: str) -> str:
    out = _sh("scontrol", "token", "lifespan=300", user=user, cwd="/").stdout.strip()
    assert out.startswith("SLURM_JWT="), "scontrol token printed no token"
    return out.split("=", 1)[1]


def _job_user(job_id: str) -> str:
    out = _sh("squeue", "-h", "-t", "all", "-j", job_id, "-o", "%u", check=False).stdout.strip()
    if not out:  # already gone from squeue: the job-completion log has it
        out = _sh("sacct", "-c", "-n", "-P", "-j", job_id, "-o", "User").stdout.strip()
    return out.splitlines()[0] if out else ""


def _wait_done(job_ids: list[str], timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = _sh("squeue", "-h", "-j", ",".join(job_ids), "-o", "%i", check=False).stdout.split()
        if not set(out) & set(job_ids):
            return
        time.sleep(0.5)
    raise AssertionError(f"jobs {job_ids} still queued after {timeout}s")


def _tier_dir_checks(alice, bob) -> Path:
    tier = Path(TAPE, alice.pw_name)
    st = os.lstat(tier)
    assert (st.st_uid, st.st_mode & 0o7777) == (alice.pw_uid, 0o700) and tier.is_dir()
    refused = _sh("ls", str(tier), user=bob.pw_name, check=False, cwd="/")
    assert refused.returncode != 0 and "Permission denied" in refused.stderr
    return tier


def test_alice_runs_her_step_in_process_as_herself(alice_session, users):
    alice, bob = users["alice"], users["bob"]
    s, work = alice_session, alice_session["work"]
    r = s["alice"]("iosea-wf", "run", f"SESSION={s['session']}", "STEP=work", "--wait", "--json")
    view = json.loads(r.stdout)
    assert view["state"] == "COMPLETED", r.stderr
    assert [m["state"] for m in view["datamovers"]] == ["COMPLETED"]
    # Inside the job: alice's uid, the RO service readable and not writable, the rest of the
    # covered ancestor still there.
    assert (work / "uid.txt").read_text().strip() == str(alice.pw_uid)
    assert (work / "ro-read.txt").read_text() == "dataset of alice\n"
    assert (work / "ro-write.txt").read_text().strip() == "refused"
    assert not (s["home"] / "ns_ro" / "new").exists()
    assert (work / "marker.txt").read_text() == s["marker"].read_text()
    assert not list(MNT_PARENT.glob(f"{s['session']}*"))  # the mounts lived in the job only
    for name in ("uid.txt", "ro-read.txt"):
        assert os.stat(work / name).st_uid == alice.pw_uid
    assert _job_user(view["job_id"]) == alice.pw_name
    assert _job_user(view["datamovers"][0]["job_id"]) == alice.pw_name
    # The RW service was written, then the step_stop mover (alice's job) moved it to her tier dir.
    moved = glob.glob(f"{TAPE}/{alice.pw_name}/**/result-{view['job_id']}.out", recursive=True)
    assert len(moved) == 1 and os.stat(moved[0]).st_uid == alice.pw_uid
    assert not (s["home"] / "ns_rw" / f"result-{view['job_id']}.out").exists()
    _tier_dir_checks(alice, bob)
    status = json.loads(s["alice"]("iosea-wf", "status", f"SESSION={s['session']}", "--json").stdout)
    assert status["steps"][-1]["state"] == "COMPLETED"


def test_alice_access_sees_her_services_as_herself(alice_session, users):
    alice = users["alice"]
    s = alice_session
    script = (
        'id -u; cat "$IOSEA_SERVICE_RO_MOUNTPOINT/input.dat"; '
        'echo from-access > "$IOSEA_SERVICE_RW_MOUNTPOINT/access.txt"'
    )
    r = s["alice"]("iosea-wf", "access", f"SESSION={s['session']}", "--", "sh", "-c", script)
    assert r.stdout.splitlines()[:2] == [str(alice.pw_uid), "dataset of alice"], r.stderr
    written = s["home"] / "ns_rw" / "access.txt"
    assert written.read_text() == "from-access\n" and os.stat(written).st_uid == alice.pw_uid


def test_root_never_opens_an_access_for_alice(alice_session, users):
    s = alice_session
    r = s["root_for_alice"]("access", s["session"], "true", check=False)
    assert r.returncode == 2, r.stderr
    assert (
        f"runs as the user in their own terminal: this process runs as root, not as {users['alice'].pw_name}"
        in r.stderr
    )


def test_root_submits_for_alice_only_with_her_token(alice_session, users):
    alice, bob = users["alice"], users["bob"]
    s, work = alice_session, alice_session["work"]
    for name in ("uid.txt", "env.txt"):
        (work / name).unlink(missing_ok=True)
    before = len(glob.glob(f"{s['state']}/jobs/*/work.*"))
    refused = s["root_for_alice"]("run", s["session"], "work", check=False)
    assert refused.returncode == 8, refused.stderr
    assert f"no Slurm token of user {alice.pw_name}" in refused.stderr
    assert len(glob.glob(f"{s['state']}/jobs/*/work.*")) == before  # nothing planned, nothing submitted

    token = _token(alice.pw_name)
    view = json.loads(s["root_for_alice"]("run", s["session"], "work", token=token).stdout)
    ids = [view["job_id"], view["datamovers"][0]["job_id"]]
    _wait_done(ids)
    assert [_job_user(j) for j in ids] == [alice.pw_name, alice.pw_name]
    assert (work / "uid.txt").read_text().strip() == str(alice.pw_uid)
    env = dict(line.split("=", 1) for line in (work / "env.txt").read_text().splitlines() if "=" in line)
    # The job has alice's own environment, not root's, and not the token it was submitted with.
    assert env.get("HOME") == str(s["home"]) and env.get("USER") == alice.pw_name
    assert "SLURM_JWT" not in env
    _tier_dir_checks(alice, bob)
    # The token is nowhere on disk: not in the run's artifacts (events, command, env), not in a
    # leftover token file.
    hits = _sh("grep", "-rlF", token, str(s["state"]), "/dev/shm", check=False)
    assert hits.stdout == "" and hits.returncode == 1, hits.stdout
    assert not glob.glob("/dev/shm/iosea-wf-jwt-*") and not glob.glob("/tmp/iosea-wf-jwt-*")
    s["restore_owner"]()


def test_root_starts_services_for_alice_only_with_her_token(alice_session, users):
    """Her services' allocations would be her jobs: without her token, exit 8, nothing recorded (~1 s)."""
    alice, s = users["alice"], alice_session
    refused = s["root_for_alice"]("start", "wf.yaml", "notoken", check=False)
    assert refused.returncode == 8, refused.stderr
    assert f"no Slurm token of user {alice.pw_name}" in refused.stderr
    assert "notoken" not in (s["state"] / "iosea-wf.json").read_text()
    s["restore_owner"]()


def test_root_cancels_for_alice_only_with_her_token(alice_session, users):
    alice = users["alice"]
    s, work = alice_session, alice_session["work"]
    flag = work / "sleep.flag"
    flag.write_text("")
    try:
        view = json.loads(
            s["root_for_alice"]("run", s["session"], "work", token=_token(alice.pw_name)).stdout
        )
        refused = s["root_for_alice"]("cancel", s["session"], "work", check=False)
        assert refused.returncode == 8 and "no Slurm token" in refused.stderr, refused.stderr
        state = _sh("squeue", "-h", "-j", view["job_id"], "-o", "%T").stdout.strip()
        assert state in ("PENDING", "RUNNING")
        done = s["root_for_alice"]("cancel", s["session"], "work", token=_token(alice.pw_name))
        assert view["job_id"] in json.loads(done.stdout)["cancelled"]
        _wait_done([view["job_id"]], timeout=30)
        # slurmctld recorded the kill request as coming from alice (her token), not from root.
        log = Path("/var/log/slurm/slurmctld.log").read_text(errors="replace")
        assert f"REQUEST_KILL_JOB JobId={view['job_id']} uid {alice.pw_uid}" in log
    finally:
        flag.unlink(missing_ok=True)
        s["restore_owner"]()
