"""Jobs for a user through slurmrestd, as the Workflow Manager's unprivileged account submits them.

The account (iosea-wf, roles/privileged_helpers) holds no power over users' jobs: through
slurmrestd (roles/slurmrestd, its own account, a socket only iosea-wf's group reaches) it submits
and cancels with the user's own Slurm token only. Without a token of hers, or with bob's, nothing
is submitted as alice; with hers, the allocation and the step chain iosea_wf.slurm builds are
alice's jobs, named and chained as root's sbatch makes them.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from tests.unix_users import unix_user

ACCOUNT = "iosea-wf"
SOCKET = "/run/slurmrestd/slurmrestd.socket"

# Runs as the account: a function of iosea_wf.slurm with the arguments given as JSON on stdin.
DRIVER = textwrap.dedent(
    """
    import json, sys
    from iosea_wf import slurm
    req = json.load(sys.stdin)
    try:
        who = slurm.acting_for(req["user"], req["token"])
        if req["what"] == "allocation":
            out = slurm.submit_allocation(req["name"], "datanodes", "datanode1", 1, 200, who)
        elif req["what"] == "chain":
            out = slurm.submit_chain(req["pipeline"], who)
        else:
            out = slurm.cancel(req["ids"], who)
        print(json.dumps({"ok": out}))
    except Exception as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
    """
)


def as_account(user_venv, request: dict) -> dict:
    """Run DRIVER as the service account with the checkout's code; its JSON answer."""
    done = subprocess.run(
        ["runuser", "-u", ACCOUNT, "--", "env", "-i", "PATH=/usr/bin:/bin",
         f"IOSEA_WF_SLURMRESTD=unix://{SOCKET}", str(user_venv / "python"), "-c", DRIVER],
        input=json.dumps(request), capture_output=True, text=True, timeout=120, cwd="/",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def token_of(user: pwd.struct_passwd) -> str:
    """A short-lived Slurm token of ``user``, asked by the user."""
    done = subprocess.run(
        ["runuser", "-u", user.pw_name, "--", "scontrol", "token", "lifespan=300"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return done.stdout.strip().split("=", 1)[1]


def jobs_of(user: pwd.struct_passwd) -> list[list[str]]:
    """(id, name, state, dependency) of the user's jobs slurmctld holds."""
    done = subprocess.run(
        ["squeue", "-h", "--states=all", "-u", user.pw_name, "-O", "JobID:|,Name:|,State:|,Dependency:|"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return [[p.strip() for p in line.split("|")[:4]] for line in done.stdout.splitlines()]


@pytest.fixture(scope="module", autouse=True)
def slurmrestd_runs():
    """`make site` started slurmrestd on its socket, in a directory of the account's group only."""
    if not os.path.exists(SOCKET):
        pytest.fail(f"no slurmrestd socket {SOCKET}: run `make site` (role slurmrestd)")
    folder = os.stat(os.path.dirname(SOCKET))
    assert stat.S_IMODE(folder.st_mode) == 0o750
    assert folder.st_uid == pwd.getpwnam("slurmrestd").pw_uid


@pytest.fixture
def alice():
    with unix_user() as user:
        yield user
        subprocess.run(["scancel", "-u", user.pw_name], capture_output=True, timeout=30)


def test_other_users_cannot_reach_slurmrestd(alice):
    done = subprocess.run(
        ["runuser", "-u", alice.pw_name, "--", "python3", "-c",
         f"import socket; socket.socket(socket.AF_UNIX).connect({SOCKET!r})"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode != 0 and "Permission denied" in done.stderr


def test_without_a_token_of_hers_nothing_is_submitted_as_alice(user_venv, alice):
    with unix_user() as bob:
        for token in ("", token_of(bob), "not-a-token"):
            answer = as_account(user_venv, {"what": "allocation", "user": alice.pw_name, "token": token,
                                            "name": "iosea.refused.svc.x"})  # fmt: skip
            assert answer.get("error") == "SlurmError", answer
        assert jobs_of(alice) == []


def test_with_her_token_the_allocation_is_alices_and_she_alone_cancels_it(user_venv, alice):
    token = token_of(alice)
    name = f"iosea.rest{os.getpid()}.svc.es1"
    answer = as_account(
        user_venv, {"what": "allocation", "user": alice.pw_name, "token": token, "name": name}
    )
    job = answer["ok"]
    assert [j[:2] for j in jobs_of(alice)] == [[job, name]]
    with unix_user() as bob:
        refused = as_account(user_venv, {"what": "cancel", "user": alice.pw_name, "token": token_of(bob),
                                         "ids": [job]})  # fmt: skip
        assert refused.get("error") == "SlurmError", refused
    assert as_account(user_venv, {"what": "cancel", "user": alice.pw_name, "token": token, "ids": [job]}) == {
        "ok": None
    }
    deadline = time.monotonic() + 10
    while jobs_of(alice)[0][2] not in ("CANCELLED", "COMPLETED") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert jobs_of(alice)[0][2] == "CANCELLED"


def test_a_step_chain_is_alices_with_its_names_dependencies_and_directives(user_venv, alice, request):
    # The service's own directory of the instance's scripts (the account reads them to send them).
    work = Path(tempfile.mkdtemp(prefix="iosea-wf-rest-", dir="/tmp"))
    os.chown(work, pwd.getpwnam(ACCOUNT).pw_uid, -1)
    request.addfinalizer(lambda: shutil.rmtree(work, ignore_errors=True))
    out = os.path.join(alice.pw_dir, "out")
    subprocess.run(["runuser", "-u", alice.pw_name, "--", "mkdir", out], check=True)
    (work / "mover.sh").write_text("#!/bin/bash\necho moved\n")
    (work / "step.sh").write_text(
        "#!/bin/bash\n#SBATCH --time=7\n#SBATCH -n 1\nunset SLURM_JWT\nexport IOSEA_STEP=s\n"
        'echo "$(id -un) $IOSEA_STEP $HOME"\n'
    )
    base = f"iosea.rest{os.getpid()}.s.1"
    pipeline = {
        "cwd": out,
        "start_movers": [{"name": "dm", "argv": ["sbatch", "--parsable", "--export=NONE",
                          "--partition=datanodes", f"--job-name={base}.dm.dm", "--ntasks=1",
                          f"--output={out}/dm.out", f"--chdir={out}", str(work / "mover.sh")]}],
        "step": {"name": "s", "argv": ["sbatch", "--parsable", "--export=NONE", "--partition=cpu",
                 f"--job-name={base}", f"--chdir={out}", "--ignore-pbs", str(work / "step.sh")]},
        "stop_movers": [],
    }  # fmt: skip
    answer = as_account(user_venv, {"what": "chain", "user": alice.pw_name, "token": token_of(alice),
                                    "pipeline": pipeline})  # fmt: skip
    assert "ok" in answer, answer
    ids = answer["ok"]
    mover, step = ids["start_movers"][0], ids["step"]
    shown = subprocess.run(["scontrol", "show", "job", step], capture_output=True, text=True).stdout
    assert f"JobName={base}" in shown and f"UserId={alice.pw_name}(" in shown
    assert f"afterok:{mover}" in shown and "TimeLimit=00:07:00" in shown
    deadline = time.monotonic() + 30
    result = os.path.join(out, f"slurm-{step}.out")
    while not (os.path.exists(result) and os.path.getsize(result)) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert Path(result).read_text().split() == [alice.pw_name, "s", alice.pw_dir]
    assert os.stat(result).st_uid == alice.pw_uid
