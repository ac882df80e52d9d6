"""The design note's workflow, and the datanodes' capacity, for real users through the Workflow Manager.

alice (a fresh Unix user, removed afterwards) drives the CLI with runuser, through `iosea-wf serve`
(root, private socket and store): start, both steps of the design note's sample WDF with their
data movers, status, list, access, cancel, stop. What is asserted is what happened on the site:
Slurm's jobs and their user, the files on disk and their owner, the exports ganesha holds.
Then alice and bob together ask for more `max` flavors than the datanodes hold; and a service run
from a Python alice cannot run refuses her steps instead of submitting jobs that cannot start.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.api_service import BIN, running_service
from tests.integration import service_users

TIERS = service_users.TIERS
GANESHA = "/var/lib/iosea-wf/local/ganesha"
CONTROL = "/usr/local/libexec/iosea-wf/ganesha-export"
# The local site (inventories/local): two datanodes of 32 cores; flavor max takes 28 of them.
DATANODE_CORES, MAX_CORES = 32, 28

# /work/shared/spec/sample-wdf.yaml on the local site: its mountpoints under /mnt/iosea-test/USER
# (the user cannot write /mnt: the attach helper covers the nearest ancestor in the job only).
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
    - "gauges/*.hdf5"
    - "input/*"
- name: datamover2
  trigger: step_stop
  target: tape
  operation: move
  elements:
    "gauges/*.hdf5"

steps:
- name: step_A
  location:
    - gpu_module
  command: "sbatch My_Step_A"
  services:
    - name: ephemeral_service_1 RO
- name: step_B
  location:
    - gpu_module
  command: "sbatch My_Step_B"
  services:
    - name: ephemeral_service_2 RW
      datamovers:
        - datamover1
        - datamover2
"""
# Each step writes what it saw inside its job into the work directory it was run from.
STEP_A = """\
#!/bin/bash
if [ -f hold.flag ]; then exec sleep 300; fi
ES1="$IOSEA_SERVICE_EPHEMERAL_SERVICE_1_MOUNTPOINT"
id -u > a.uid
cat "$ES1/input/params.txt" > a.read
if touch "$ES1/written-by-A" 2> a.err; then echo writable > a.write; else echo refused > a.write; fi
"""
STEP_B = """\
#!/bin/bash
ES2="$IOSEA_SERVICE_EPHEMERAL_SERVICE_2_MOUNTPOINT"
id -u > b.uid
ls "$ES2/gauges" > b.gauges
echo "gauge written by step B" > "$ES2/gauges/new.hdf5"
mkdir "$ES2/results" && echo "result of $SLURM_JOB_ID" > "$ES2/results/out.txt"
"""
BIG = """\
workflow:
  name: big
services:
{services}
steps:
  - name: s
    command: "sbatch job.sh"
    services:
{refs}
"""


@pytest.fixture(autouse=True)
def nothing_left(users, as_user):
    """After each test, stop (--force) whatever alice and bob still have: a failed test leaves no export."""
    yield
    for user in users:
        listed = as_user(user, "list", "--json")
        for s in json.loads(listed.stdout)["sessions"] if listed.returncode == 0 else []:
            as_user(user, "stop", f"SESSION={s['session']}", "--force")


def _own(user: pwd.struct_passwd, path: Path, text: str | None = None, mode: int = 0o700) -> Path:
    """A directory (or, with ``text``, a file) owned by ``user``."""
    if text is None:
        path.mkdir(parents=True, exist_ok=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    os.chown(path, user.pw_uid, user.pw_gid)
    path.chmod(mode)
    return path


def _wait_for(what: str, probe, timeout: float = 60):
    """Poll ``probe()`` until it returns something true; return it."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout} s")
        time.sleep(0.3)


def _job_user(job_id: str) -> str:
    """The user Slurm ran a job as (squeue while it remembers the job, else the completion log)."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%u"], capture_output=True,
                         text=True, timeout=30).stdout.strip()  # fmt: skip
    if not out:
        out = subprocess.run(["sacct", "-c", "-n", "-P", "-j", job_id, "-o", "User"], capture_output=True,
                             text=True, timeout=30).stdout.strip()  # fmt: skip
    return out.splitlines()[0] if out else ""


def _exports_of(user: str) -> list[dict]:
    """Every export ganesha holds for ``user`` on the datanodes of the local site (control script list)."""
    found = []
    for instance in sorted(glob.glob(f"{GANESHA}/*/")):
        listed = subprocess.run([CONTROL, "list", "--instance", instance], capture_output=True, text=True,
                                timeout=30, check=True)  # fmt: skip
        found += [
            e
            for e in json.loads(listed.stdout)["exports"]
            if e["key"].startswith(f"{user}.") or e["pseudo"].startswith(f"/iosea/{user}/")
        ]
    return found


def _not_owned_by(user: pwd.struct_passwd, *tops: Path) -> list[str]:
    """Paths under ``tops`` (themselves included) that are not ``user``'s."""
    wrong = []
    for top in tops:
        for folder, dirs, files in os.walk(top):
            for p in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
                if os.lstat(p).st_uid != user.pw_uid:
                    wrong.append(p)
    return sorted(set(wrong))


def _status(as_user, user, session: str) -> dict:
    done = as_user(user, "status", f"SESSION={session}", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_alice_runs_the_design_notes_workflow_through_the_service(users, as_user):
    alice, _ = users
    home = Path(alice.pw_dir)
    Path("/mnt/iosea-test").mkdir(parents=True, exist_ok=True)
    ns1, ns2, work = (_own(alice, home / d) for d in ("ns1", "ns2", "work"))
    dataset = {
        ns1 / "input" / "params.txt": "params of alice\n",
        ns2 / "input" / "params.txt": "params of step B\n",
        ns2 / "gauges" / "g1.hdf5": "gauge one\n",
        ns2 / "gauges" / "g2.hdf5": "gauge two\n",
    }
    for path, text in dataset.items():
        _own(alice, path.parent)
        _own(alice, path, text, 0o600)
    _own(alice, work / "wdf.yaml", WDF, 0o600)
    _own(alice, work / "My_Step_A", STEP_A)
    _own(alice, work / "My_Step_B", STEP_B)
    session = "wf1"

    def wf(*argv: str) -> subprocess.CompletedProcess:
        return as_user(alice, *argv, cwd=str(work))

    started = wf("start", "WORKFLOW=wdf.yaml", f"SESSION={session}", f"NS1={ns1}", f"NS2={ns2}", "--json")
    assert started.returncode == 0, started.stderr
    record = json.loads(started.stdout)
    assert record["owner"] == alice.pw_name and record["state"] == "ACTIVE"
    urls = {s["name"]: s["url"] for s in record["services"]}
    exported = {e["path"]: e["access"] for e in _exports_of(alice.pw_name)}
    assert exported == {str(ns1): "RO", str(ns2): "RW"}  # RO where every step uses it RO

    # step_A: ephemeral_service_1 is seen read-only inside alice's job.
    ran_a = wf("run", f"SESSION={session}", "STEP=step_A", "--wait", "--json")
    assert ran_a.returncode == 0, ran_a.stderr
    step_a = json.loads(ran_a.stdout)
    assert (work / "a.uid").read_text().strip() == str(alice.pw_uid)
    assert (work / "a.read").read_text() == "params of alice\n"
    assert (work / "a.write").read_text().strip() == "refused"
    assert "Read-only file system" in (work / "a.err").read_text()
    assert not (ns1 / "written-by-A").exists()

    # step_B: the flash copy before it, its writes through the RW service, the tape move after it.
    ran_b = wf("run", f"SESSION={session}", "STEP=step_B", "--wait", "--json")
    assert ran_b.returncode == 0, ran_b.stderr
    step_b = json.loads(ran_b.stdout)
    assert [(m["name"], m["state"]) for m in step_b["datamovers"]] == [
        ("datamover1", "COMPLETED"),
        ("datamover2", "COMPLETED"),
    ]
    assert (work / "b.uid").read_text().strip() == str(alice.pw_uid)
    assert (work / "b.gauges").read_text().split() == ["g1.hdf5", "g2.hdf5"]
    assert (ns2 / "results" / "out.txt").read_text() == f"result of {step_b['job_id']}\n"
    flash, tape = (Path(m["target_path"]) for m in step_b["datamovers"])
    tag = f"{session}.{json.loads(wf('status', f'SESSION={session}', '--json').stdout)['id'][:12]}"
    assert flash == Path(TIERS, "flash", alice.pw_name, tag, "ephemeral_service_2")
    assert tape == Path(TIERS, "tape", alice.pw_name, tag, "ephemeral_service_2")
    # copy: both sides hold the dataset as it was before the step (the step's new gauge is not there).
    assert (flash / "input" / "params.txt").read_text() == (ns2 / "input" / "params.txt").read_text()
    assert sorted(p.name for p in (flash / "gauges").iterdir()) == ["g1.hdf5", "g2.hdf5"]
    # move: every gauge, the step's own too, is on tape with the same bytes, and gone from the namespace.
    gauges = {**{n: dataset[ns2 / "gauges" / n] for n in ("g1.hdf5", "g2.hdf5")},
              "new.hdf5": "gauge written by step B\n"}  # fmt: skip
    assert {p.name: p.read_text() for p in (tape / "gauges").iterdir()} == gauges
    assert {p.name: p.read_text() for p in (flash / "gauges").iterdir()} == {
        n: gauges[n] for n in ("g1.hdf5", "g2.hdf5")
    }
    assert list((ns2 / "gauges").iterdir()) == []
    for tier in ("flash", "tape"):
        st = os.lstat(Path(TIERS, tier, alice.pw_name))
        assert (st.st_uid, st.st_mode & 0o777) == (alice.pw_uid, 0o700)

    listed = json.loads(wf("list", "--json").stdout)["sessions"]
    assert [(s["session"], s["owner"], s["state"]) for s in listed] == [(session, alice.pw_name, "ACTIVE")]

    # access -- COMMAND: salloc as alice, here; recorded through the service while it runs.
    inner = (
        'id -u; cat "$IOSEA_SERVICE_EPHEMERAL_SERVICE_1_MOUNTPOINT/input/params.txt"; echo "$SLURM_JOB_ID"; '
        f"iosea-wf status SESSION={session} --json > access-status.json"
    )
    for _ in range(10):  # the site is shared: other tests may hold the nodes for a moment
        access = wf("access", f"SESSION={session}", "--immediate", "--", "sh", "-c", inner)
        if not (access.returncode == 8 and "busy" in access.stderr):
            break
        time.sleep(2)
    assert access.returncode == 0, access.stderr
    uid, params, access_job = access.stdout.splitlines()
    assert (uid, params) == (str(alice.pw_uid), "params of alice")
    seen = json.loads((work / "access-status.json").read_text())["accesses"]
    assert len(seen) == 1 and seen[0]["state"] != "ENDED", seen

    # cancel of a running step.
    _own(alice, work / "hold.flag", "")
    held = json.loads(wf("run", f"SESSION={session}", "STEP=step_A", "--json").stdout)
    _wait_for(
        "step_A#2 running",
        lambda: any(
            s["instance"] == 2 and s["state"] == "RUNNING"
            for s in _status(as_user, alice, session)["steps"]
            if s["name"] == "step_A"
        ),
    )
    cancelled = wf("cancel", f"SESSION={session}", "STEP=step_A", "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)["cancelled"] == [held["job_id"]]
    _wait_for(
        "step_A#2 cancelled",
        lambda: [
            s["state"] for s in _status(as_user, alice, session)["steps"] if s["instance"] == 2
        ] == ["CANCELLED"],
    )  # fmt: skip

    # Every job was alice's: the steps, the movers, the access.
    status = _status(as_user, alice, session)
    assert [(s["name"], s["instance"], s["state"]) for s in status["steps"]] == [
        ("step_A", 1, "COMPLETED"),
        ("step_B", 1, "COMPLETED"),
        ("step_A", 2, "CANCELLED"),
    ]
    ids = [step_a["job_id"], step_b["job_id"], held["job_id"], access_job]
    ids += [m["job_id"] for m in step_b["datamovers"]]
    assert {j: _job_user(j) for j in ids} == dict.fromkeys(ids, alice.pw_name)
    # Every file a step, a mover or the service wrote for her is hers.
    tier_dirs = [Path(TIERS, t, alice.pw_name) for t in ("flash", "tape")]
    assert _not_owned_by(alice, work, ns1, ns2, *tier_dirs) == []

    stopped = wf("stop", f"SESSION={session}", "--json")
    assert stopped.returncode == 0, stopped.stderr
    assert _status(as_user, alice, session)["state"] == "STOPPED"
    assert _exports_of(alice.pw_name) == []
    for url in urls.values():
        assert subprocess.run(["nfs-ls", url], capture_output=True, timeout=30).returncode != 0


def _big_wdf(user: pwd.struct_passwd, name: str, count: int = 1) -> str:
    """A WDF in the user's home with ``count`` services of flavor max, each on a namespace of its own."""
    services, refs = [], []
    for i in range(count):
        ns = _own(user, Path(user.pw_dir, f"{name}-ns{i}"))
        services.append(
            f"  - name: es{i}\n    type: NFS\n    attributes:\n      namespace: {ns}\n"
            f"      mountpoint: /mnt/iosea-test/{{{{ USER }}}}/{name}/es{i}\n      flavor: max"
        )
        refs.append(f"      - name: es{i} RW")
    text = BIG.format(services="\n".join(services), refs="\n".join(refs))
    return str(_own(user, Path(user.pw_dir, f"{name}.yaml"), text, 0o600))


def test_more_max_flavors_than_the_datanodes_hold_are_refused_whoever_asks(users, as_user):
    alice, bob = users
    asked = [(u, f"big{k}") for u in (alice, bob) for k in (1, 2)]
    wdfs = {(u.pw_name, s): _big_wdf(u, s) for u, s in asked}
    # All four at once: accounting must hold across users and concurrent requests.
    starts = {
        (u.pw_name, s): subprocess.Popen(
            as_user.command(u, "start", f"WORKFLOW={wdfs[u.pw_name, s]}", f"SESSION={s}", "--json"),
            cwd=u.pw_dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for u, s in asked
    }
    done = {}
    for key, proc in starts.items():
        out, err = proc.communicate(timeout=120)
        done[key] = (proc.returncode, out, err)
    accepted = {k: json.loads(out) for k, (rc, out, _) in done.items() if rc == 0}
    refused = {k: err for k, (rc, _, err) in done.items() if rc != 0}
    # Two datanodes, one max each: two starts win, the others are refused with exit 6.
    assert len(accepted) == 2, done
    assert {done[k][0] for k in refused} == {6}, done
    for err in refused.values():
        assert "fits on no datanode" in err and "Traceback" not in err
    assert sorted(r["services"][0]["datanode"] for r in accepted.values()) == ["datanode1", "datanode2"]
    assert MAX_CORES <= DATANODE_CORES < 2 * MAX_CORES  # why one max per datanode, no more

    by_name = {u.pw_name: u for u in (alice, bob)}
    for owner, session in accepted:
        status = _status(as_user, by_name[owner], session)
        assert (status["state"], [s["state"] for s in status["services"]]) == ("ACTIVE", ["ACTIVE"])
    for owner, session in refused:
        # No record holds anything for a refused start, and ganesha exports nothing for it.
        gone = as_user(by_name[owner], "status", f"SESSION={session}")
        assert gone.returncode == 4, gone.stderr
        assert not [e for e in _exports_of(owner) if e["key"].startswith(f"{owner}.{session}.")]
    for user in (alice, bob):
        mine = sorted(s for o, s in accepted if o == user.pw_name)
        assert (
            sorted(s["session"] for s in json.loads(as_user(user, "list", "--json").stdout)["sessions"])
            == mine
        )
        assert len(_exports_of(user.pw_name)) == len(mine)

    for owner, session in accepted:
        stopped = as_user(by_name[owner], "stop", f"SESSION={session}")
        assert stopped.returncode == 0, stopped.stderr
    assert _exports_of(alice.pw_name) == _exports_of(bob.pw_name) == []
    # Everything is free again: one session now takes a whole max on each datanode.
    again = as_user(alice, "start", f"WORKFLOW={_big_wdf(alice, 'again', 2)}", "SESSION=again", "--json")
    assert again.returncode == 0, again.stderr
    placed = sorted(s["datanode"] for s in json.loads(again.stdout)["services"])
    assert placed == ["datanode1", "datanode2"]
    assert as_user(alice, "stop", "SESSION=again").returncode == 0


def test_a_service_whose_python_alice_cannot_run_refuses_her_steps_with_services(users, as_user):
    alice, _ = users
    root_python = BIN / "python3"
    if subprocess.run(["runuser", "-u", alice.pw_name, "--", str(root_python), "-c", ""],
                      capture_output=True, timeout=30).returncode == 0:  # fmt: skip
        pytest.skip(f"{root_python} can be run by every user here")
    home = Path(alice.pw_dir)
    ns = _own(alice, home / "pyns")
    wdf = (
        "workflow:\n  name: py\nservices:\n  - name: es\n    type: NFS\n    attributes:\n"
        f"      namespace: {ns}\n      mountpoint: /mnt/iosea-test/{{{{ USER }}}}/py/es\n"
        'steps:\n  - name: s\n    command: "sbatch My_Step_A"\n    services:\n      - name: es RO\n'
    )
    _own(alice, home / "py.yaml", wdf, 0o600)
    _own(alice, home / "My_Step_A", STEP_A)
    folder = Path(tempfile.mkdtemp(prefix="iosea-wf-wm-", dir="/tmp"))
    folder.chmod(0o755)
    url = f"unix://{folder / 'wm.sock'}"

    def wf(*argv: str) -> subprocess.CompletedProcess:
        # The module's CLI, pointed at this service (run from root's own venv).
        command = [f"IOSEA_WF_URL={url}" if a.startswith("IOSEA_WF_URL=") else a
                   for a in as_user.command(alice, *argv)]  # fmt: skip
        return subprocess.run(command, cwd=home, capture_output=True, text=True, timeout=120)

    try:
        with running_service(folder / "wm.sock", folder / "state"):
            assert wf("start", "WORKFLOW=py.yaml", "SESSION=py").returncode == 0
            try:
                refused = wf("run", "SESSION=py", "STEP=s")
                assert refused.returncode == 3, refused.stderr
                assert f"runs from {BIN}/python3, which user {alice.pw_name} cannot run" in refused.stderr
                assert "Traceback" not in refused.stderr
                assert json.loads(wf("status", "SESSION=py", "--json").stdout)["steps"] == []
            finally:
                assert wf("stop", "SESSION=py").returncode == 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)
