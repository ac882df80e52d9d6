"""The `nfs` attach method on the real site: a real user's step reads and writes through ganesha.

A fresh user (useradd, removed afterwards) owns a 0700 namespace; root starts her session with her
Slurm token (the export is root squashed, so only her own AUTH_SYS identity reaches her files), and
she runs her steps in-process from a venv of Debian's python3. The steps choose ``attach: nfs``
(the local site offers it beside its ``bind`` default). Inside each job the mountpoint is a
``fuse.iosea-nfs`` mount: her own iosea-wf-nfsfuse, mounted with fusermount3 outside the job's
namespaces and bound there. What the job writes appears in the namespace with her ownership; a
RO step cannot write; with her export stopped on its datanode the step fails before its script,
saying why; and after every job no FUSE mount, client process or mount directory is left.

The first tests drive iosea-wf-nfsfuse directly (the FUSE layer against the real export).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from iosea_wf import manager
from tests.unix_users import fresh_uid

CONTROL = ["/usr/bin/python3", "/usr/local/libexec/iosea-wf/ganesha-export"]
MNT_PARENT = Path("/mnt/iosea-test")

WDF = """\
workflow:
  name: nfsattach
services:
  - name: data
    type: NFS
    attributes:
      namespace: {ns}
      mountpoint: {mnt}/{{{{ SESSION }}}}/data
steps:
  - name: write
    attach: nfs
    command: "sbatch write.sh"
    services:
      - name: data RW
  - name: read
    attach: nfs
    command: "sbatch read.sh"
    services:
      - name: data RO
  - name: hold
    attach: nfs
    command: "sbatch hold.sh"
    services:
      - name: data RW
"""

WRITE = """\
#!/bin/bash
set -e
M="$IOSEA_SERVICE_DATA_MOUNTPOINT"
id -u > uid.txt
fstype() { awk -v m="$1" '$5 == m {sub(/.* - /, ""); print $1}' /proc/self/mountinfo; }
fstype "$M" > fstype.txt
echo "written by job $SLURM_JOB_ID" > "$M/out.txt"
mkdir "$M/sub"
head -c 3000000 /dev/urandom > "$M/sub/big.bin"
sha1sum < "$M/sub/big.bin" | cut -d' ' -f1 > big.sha1
echo gone > "$M/gone.txt"; rm "$M/gone.txt"
echo before > "$M/old.txt"; mv "$M/old.txt" "$M/new.txt"
printf 0123456789 > "$M/cut.txt"; truncate -s 4 "$M/cut.txt"
ls "$M" > listing.txt
stat -c '%U %s' "$M/cut.txt" > cut.stat
"""

READ = """\
#!/bin/bash
M="$IOSEA_SERVICE_DATA_MOUNTPOINT"
fstype() { awk -v m="$1" '$5 == m {sub(/.* - /, ""); print $1}' /proc/self/mountinfo; }
fstype "$M" > ro-fstype.txt
cat "$M/input.txt" > ro-read.txt
if echo x 2> ro-write.err > "$M/refused.txt"
then echo writable > ro-write.txt
else echo refused > ro-write.txt
fi
mkdir "$M/refused.d" 2>> ro-write.err || true
"""

HOLD = """\
#!/bin/bash
echo started > "$IOSEA_SERVICE_DATA_MOUNTPOINT/hold.txt"
touch hold.started
sleep 120
"""


def _sh(*argv: str, user: str | None = None, check: bool = True, **kw) -> subprocess.CompletedProcess:
    full = ["runuser", "-u", user, "--", *argv] if user else list(argv)
    proc = subprocess.run(full, capture_output=True, text=True, timeout=kw.pop("timeout", 180), **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{full} exited {proc.returncode}: {proc.stderr}{proc.stdout}")
    return proc


def _token(user: str) -> str:
    out = _sh("scontrol", "token", "lifespan=600", user=user, cwd="/").stdout.strip()
    assert out.startswith("SLURM_JWT="), "scontrol token printed no token"
    return out.split("=", 1)[1]


def _fuse_mounts_of(uid: int) -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        return [ln for ln in fh if " fuse.iosea-nfs " in ln and f"user_id={uid}," in ln]


def assert_nothing_left(user: pwd.struct_passwd) -> None:
    """No FUSE mount of the user's, no client process, no private mount directory (within 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        mounts = _fuse_mounts_of(user.pw_uid)
        procs = _sh("pgrep", "-u", str(user.pw_uid), "-f", "iosea_wf.nfsfuse|fusermount3", check=False).stdout
        dirs = [p for p in Path("/tmp").glob("iosea-wf-nfs.*") if p.stat().st_uid == user.pw_uid]
        if not (mounts or procs.strip() or dirs) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert mounts == [] and procs.strip() == "" and dirs == [], (mounts, procs, dirs)


@pytest.fixture(scope="module")
def fuse_ready():
    if not os.access("/usr/bin/fusermount3", os.X_OK) or os.stat("/dev/fuse").st_mode & 0o006 != 0o006:
        pytest.fail("fuse3 is missing or /dev/fuse is not open to users: run `make site` from this checkout")


@pytest.fixture(scope="module")
def alice(fuse_ready):
    """A fresh user with a login shell (her jobs get her environment), removed afterwards."""
    name = f"iwf-nfs-{uuid.uuid4().hex[:6]}"
    _sh("useradd", "-m", "-u", fresh_uid(), "-s", "/bin/bash", name)
    try:
        yield pwd.getpwnam(name)
    finally:
        _sh("pkill", "-u", name, check=False)
        time.sleep(0.5)
        gone = _sh("userdel", "-r", name, check=False)
        assert gone.returncode in (0, 12), f"userdel {name}: {gone.stderr}"


@pytest.fixture(scope="module")
def session(alice, user_venv, inprocess_site):
    """Alice's ACTIVE session on her 0700 namespace, started by root with her token."""
    home = Path(alice.pw_dir)
    ns, work, state = home / "ns", home / "work", home / "state"
    for d in (ns, work, state):
        d.mkdir(mode=0o700)
    (ns / "input.txt").write_text("dataset of alice\n")
    MNT_PARENT.mkdir(parents=True, exist_ok=True)
    (work / "wf.yaml").write_text(WDF.format(ns=ns, mnt=MNT_PARENT))
    for name, text in (("write.sh", WRITE), ("read.sh", READ), ("hold.sh", HOLD)):
        (work / name).write_text(text)
    _sh("chown", "-R", f"{alice.pw_name}:", str(home))
    name = f"nfsatt{os.getpid()}"
    ctx = manager.Context(state_dir=str(state), user=alice.pw_name, slurm_jwt=_token(alice.pw_name))
    old = os.environ.get("IOSEA_WF_SITE")
    os.environ["IOSEA_WF_SITE"] = str(inprocess_site)
    try:
        # The shared site may be busy: wait for room rather than fail.
        record = manager.start(ctx, str(work / "wf.yaml"), name, {}, wait_resources=600)
    finally:
        if old is None:
            os.environ.pop("IOSEA_WF_SITE")
        else:
            os.environ["IOSEA_WF_SITE"] = old
    _sh("chown", "-R", f"{alice.pw_name}:", str(state))

    def as_alice(*argv: str, check: bool = True, timeout: float = 180):
        env = ["env", f"PATH={user_venv}:/usr/bin:/bin", f"HOME={home}", f"IOSEA_WF_HOME={state}",
               "LANG=C.UTF-8", "IOSEA_WF_WARM_ANSIBLE=0", f"IOSEA_WF_SITE={inprocess_site}"]  # fmt: skip
        return _sh(*env, *argv, user=alice.pw_name, check=check, cwd=work, timeout=timeout)

    (svc,) = record["services"]
    try:
        yield {"name": name, "ns": ns, "work": work, "svc": svc, "alice": as_alice, "venv": user_venv}
    finally:
        _sh("chown", "-R", "root:", str(state))
        os.environ["IOSEA_WF_SITE"] = str(inprocess_site)
        try:
            manager.stop(ctx, name, force=True)
        finally:
            if old is None:
                os.environ.pop("IOSEA_WF_SITE", None)
            else:
                os.environ["IOSEA_WF_SITE"] = old


def _run(session, step: str) -> dict:
    r = session["alice"]("iosea-wf", "run", f"SESSION={session['name']}", f"STEP={step}", "--wait", "--json",
                         check=False)  # fmt: skip
    assert r.stdout, r.stderr
    return json.loads(r.stdout)


# ---- the FUSE layer itself, against the real export ------------------------------------------------


@pytest.fixture
def mounted(session, alice, tmp_path):
    """Alice's iosea-wf-nfsfuse of her export on a directory she owns (outside any job)."""
    point = Path(alice.pw_dir) / f"mnt-{uuid.uuid4().hex[:6]}"
    point.mkdir()
    shutil.chown(point, alice.pw_name, alice.pw_name)
    client = subprocess.Popen(
        ["runuser", "-u", alice.pw_name, "--", str(session["venv"] / "iosea-wf-nfsfuse"),
         session["svc"]["url"], str(point)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while not any(f" {point} " in ln for ln in _fuse_mounts_of(alice.pw_uid)):
        assert client.poll() is None, client.stderr.read()
        assert time.monotonic() < deadline, "the export was not mounted within 20 s"
        time.sleep(0.05)
    try:
        yield point
    finally:
        _sh("fusermount3", "-u", str(point), user=alice.pw_name, check=False)
        client.wait(timeout=20)
        point.rmdir()


def test_fuse_layer_operations_reach_the_namespace_as_the_user(session, alice, mounted):
    ns, m, me = session["ns"], mounted, alice.pw_name
    script = f"""
set -e
cd {m}
cat input.txt > /dev/null
echo hello > a.txt
mkdir d
echo inner > d/b.txt
mv a.txt d/a.txt
printf 0123456789 > c.txt
truncate -s 3 c.txt
echo more >> c.txt
head -c 5000000 /dev/zero > big.bin
rm big.bin
touch -d '2001-02-03 04:05:06' d/b.txt
chmod 640 d/b.txt
ls -la . d > /dev/null
"""
    _sh("bash", "-c", script, user=me)
    assert (ns / "d" / "a.txt").read_text() == "hello\n"
    assert (ns / "d" / "b.txt").read_text() == "inner\n"
    assert (ns / "c.txt").read_text() == "012more\n"
    assert not (ns / "a.txt").exists() and not (ns / "big.bin").exists()
    b = os.stat(ns / "d" / "b.txt")
    assert (b.st_uid, b.st_gid, b.st_mode & 0o777) == (alice.pw_uid, alice.pw_gid, 0o640)
    assert time.gmtime(b.st_mtime)[:3] == (2001, 2, 3)
    for path in (ns / "d", ns / "c.txt"):
        assert os.stat(path).st_uid == alice.pw_uid
    # What the namespace holds is what the mount shows (getattr, readdir, read).
    assert sorted(_sh("ls", str(m), user=me).stdout.split()) == sorted(os.listdir(ns))
    assert _sh("stat", "-c", "%s %U", f"{m}/c.txt", user=me).stdout.split() == ["8", me]
    assert _sh("cat", f"{m}/input.txt", user=me).stdout == "dataset of alice\n"
    (ns / "d" / "a.txt").unlink()
    (ns / "d" / "b.txt").unlink()
    (ns / "d").rmdir()
    (ns / "c.txt").unlink()


def test_fuse_layer_large_file_round_trip(session, alice, mounted):
    me = alice.pw_name
    _sh("bash", "-c", f"head -c 40000000 /dev/urandom > {mounted}/rand.bin", user=me)
    try:
        there = _sh("sha1sum", str(session["ns"] / "rand.bin")).stdout.split()[0]
        through = _sh("sha1sum", f"{mounted}/rand.bin", user=me).stdout.split()[0]
        assert there == through
        assert os.stat(session["ns"] / "rand.bin").st_size == 40000000
    finally:
        (session["ns"] / "rand.bin").unlink()


def test_fuse_layer_root_is_squashed(session, tmp_path):
    # Root's client speaks as uid 0, which the export squashes: alice's 0700 namespace stays closed.
    point = tmp_path / "mnt"
    point.mkdir()
    client = subprocess.Popen(
        [str(session["venv"] / "iosea-wf-nfsfuse"), session["svc"]["url"], str(point), "--timeout", "10"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not any(f" {point} " in ln for ln in _fuse_mounts_of(0)):
            assert client.poll() is None, client.stderr.read()
            assert time.monotonic() < deadline, "the export was not mounted within 20 s"
            time.sleep(0.05)
        listing = _sh("ls", str(point), check=False)
        assert listing.returncode != 0 and "Permission denied" in listing.stderr, listing
        reading = _sh("cat", f"{point}/input.txt", check=False)
        assert reading.returncode != 0 and "Permission denied" in reading.stderr, reading
    finally:
        _sh("fusermount3", "-u", str(point), check=False)
        client.wait(timeout=20)


# ---- steps with attach: nfs --------------------------------------------------------------------------


def test_a_step_writes_through_the_nfs_server_as_its_user(session, alice):
    view = _run(session, "write")
    work, ns = session["work"], session["ns"]
    assert view["state"] == "COMPLETED", view
    assert (work / "fstype.txt").read_text().strip() == "fuse.iosea-nfs"
    assert (work / "uid.txt").read_text().strip() == str(alice.pw_uid)
    assert (ns / "out.txt").read_text() == f"written by job {view['job_id']}\n"
    big = _sh("sha1sum", str(ns / "sub" / "big.bin")).stdout.split()[0]
    assert big == (work / "big.sha1").read_text().strip()
    assert not (ns / "gone.txt").exists() and not (ns / "old.txt").exists()
    assert (ns / "new.txt").read_text() == "before\n"
    assert (ns / "cut.txt").read_text() == "0123"
    assert (work / "cut.stat").read_text().split() == [alice.pw_name, "4"]
    listed = set((work / "listing.txt").read_text().split())
    assert listed == {"input.txt", "out.txt", "sub", "new.txt", "cut.txt"}
    for path in (ns / "out.txt", ns / "sub", ns / "sub" / "big.bin", ns / "new.txt"):
        st = os.stat(path)
        assert (st.st_uid, st.st_gid) == (alice.pw_uid, alice.pw_gid), path
    assert not list(MNT_PARENT.glob(f"{session['name']}*"))  # the mountpoint lived in the job only
    assert_nothing_left(alice)


def test_a_ro_step_reads_and_cannot_write(session, alice):
    view = _run(session, "read")
    work, ns = session["work"], session["ns"]
    assert view["state"] == "COMPLETED", view
    assert (work / "ro-fstype.txt").read_text().strip() == "fuse.iosea-nfs"
    assert (work / "ro-read.txt").read_text() == "dataset of alice\n"
    assert (work / "ro-write.txt").read_text().strip() == "refused"
    errors = (work / "ro-write.err").read_text()
    assert "Read-only file system" in errors or "Permission denied" in errors, errors
    assert not (ns / "refused.txt").exists() and not (ns / "refused.d").exists()
    assert_nothing_left(alice)


def test_a_cancelled_step_leaves_no_mount_nor_client(session, alice):
    work = session["work"]
    r = session["alice"]("iosea-wf", "run", f"SESSION={session['name']}", "STEP=hold", "--json")
    view = json.loads(r.stdout)
    deadline = time.monotonic() + 60
    while not (work / "hold.started").exists():
        assert time.monotonic() < deadline, "the hold step never started"
        time.sleep(0.2)
    assert _fuse_mounts_of(alice.pw_uid), "no FUSE mount while the job runs"
    assert (session["ns"] / "hold.txt").read_text() == "started\n"
    session["alice"]("iosea-wf", "cancel", f"SESSION={session['name']}", "STEP=hold")
    deadline = time.monotonic() + 60
    while _sh("squeue", "-h", "-j", view["job_id"], "-o", "%i", check=False).stdout.strip():
        assert time.monotonic() < deadline, "the cancelled job is still queued"
        time.sleep(0.5)
    assert_nothing_left(alice)


def test_with_its_export_stopped_the_step_fails_clearly(session, alice):
    """Last: the export is removed on its datanode (its ganesha may stop with it); `stop` still cleans."""
    svc = session["svc"]
    instance = f"/var/lib/iosea-wf/local/ganesha/{svc['datanode']}"
    _sh(*CONTROL, "remove", "--instance", instance, "--key", svc["export_key"], "--timeout", "20")
    t0 = time.monotonic()
    view = _run(session, "write")
    assert time.monotonic() - t0 < 120
    assert view["error"]["details"] == ["step write: FAILED (exit code 1)"], view
    status = json.loads(session["alice"]("iosea-wf", "status", f"SESSION={session['name']}", "--json").stdout)
    job_id = status["steps"][-1]["job_id"]
    # The reason is in the job's output: the step's script never ran.
    out = (session["work"] / f"slurm-{job_id}.out").read_text()
    print(out)
    host = svc["url"].split("//")[1].split("/")[0]
    assert f"iosea_wf.attach: cannot attach the NFS export {host}:{svc['namespace']}" in out, out
    assert "cannot mount the NFS export" in out or "refuses uid" in out, out
    assert_nothing_left(alice)
