"""Acting for another user without a site: who Slurm commands run as, the token's way, the user's
tier directories, and the attach helper's covered ancestor."""

from __future__ import annotations

import importlib.util
import os
import pwd
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from iosea_wf import jobs, slurm
from iosea_wf.errors import EXIT_SLURM, SlurmError, UsageError

ROOT = Path(__file__).resolve().parents[2]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def _chain_plugin():
    path = ROOT / "roles" / "slurm_job" / "action_plugins" / "slurm_job_chain.py"
    spec = importlib.util.spec_from_file_location("slurm_job_chain", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_process_own_user_needs_no_token():
    me = pwd.getpwuid(os.geteuid()).pw_name
    assert slurm.acting_for(me, None) is None


def test_an_unknown_user_is_refused():
    with pytest.raises(UsageError, match="unknown on this host"):
        slurm.acting_for("iwf-no-such-user-here", "tok")


@needs_root
def test_root_for_another_user_needs_the_token():
    with pytest.raises(SlurmError, match="no Slurm token of user nobody") as caught:
        slurm.acting_for("nobody", None)
    assert caught.value.exit_code == EXIT_SLURM
    with pytest.raises(SlurmError):
        slurm.acting_for("nobody", "")


@needs_root
def test_root_for_another_user_submits_with_uid_gid_and_the_users_environment():
    nobody = pwd.getpwnam("nobody")
    who = slurm.acting_for("nobody", "secret-token")
    assert (who.uid, who.gid) == (nobody.pw_uid, nobody.pw_gid)
    assert who.sbatch_options() == [f"--uid={nobody.pw_uid}", f"--gid={nobody.pw_gid}", "--export=NONE"]
    assert who.environ()["SLURM_JWT"] == "secret-token"
    assert "secret-token" not in repr(who)


@needs_root
def test_the_token_file_is_private_and_gone_afterwards():
    who = slurm.acting_for("nobody", "secret-token")
    with slurm.token_file(who) as path:
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        assert Path(path).read_text() == "secret-token"
        if os.path.isdir("/dev/shm"):
            assert path.startswith("/dev/shm/")  # memory, not disk
    assert not os.path.exists(path) and not os.path.exists(os.path.dirname(path))
    with slurm.token_file(None) as path:
        assert path == ""


def test_the_chain_action_removes_the_token_file_once_read(tmp_path):
    plugin = _chain_plugin()
    token = tmp_path / "token"
    token.write_text("abc.def\n")
    assert plugin._read_token(str(token)) == "abc.def"
    assert not token.exists()
    assert plugin._read_token("") == ""


def test_generated_scripts_drop_the_token_first(tmp_path):
    jobs.mover_script(tmp_path / "m.sh", ["iosea-wf-mover"], "copy", "/a", "/b", ["*"], None)
    jobs.write_step_script(
        tmp_path / "s.sh", cwd=str(tmp_path), script_and_args=[], wrap="env", env={}, attached=[],
        attach_mode="env",
    )  # fmt: skip
    for script in ("m.sh", "s.sh"):
        lines = (tmp_path / script).read_text().splitlines()
        assert lines[2] == "unset SLURM_JWT", lines
    out = subprocess.run(
        [str(tmp_path / "s.sh")],
        env={"SLURM_JWT": "x", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert "SLURM_JWT" not in out.stdout


def _user_dirs(*words: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sh", "-c", _chain_plugin()._USER_DIRS, "user-dirs", *words], capture_output=True, text=True
    )


@needs_root
def test_a_users_tier_directory_is_made_0700_and_theirs(tmp_path):
    tier = tmp_path / "tier"
    tier.mkdir(mode=0o1777)
    tier.chmod(0o1777)
    mine = tier / "nobody"
    assert _user_dirs(str(mine), "nobody").returncode == 0
    st = os.lstat(mine)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (pwd.getpwnam("nobody").pw_uid, 0o700)
    # A directory of the user with another mode is fixed (with the user's own rights).
    mine.chmod(0o755)
    assert _user_dirs(str(mine), "nobody").returncode == 0
    assert stat.S_IMODE(os.lstat(mine).st_mode) == 0o700
    assert _user_dirs(str(mine), "nobody").returncode == 0  # idempotent


@needs_root
def test_a_planted_tier_entry_is_refused_and_never_followed(tmp_path):
    tier = tmp_path / "tier"
    tier.mkdir()
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o755)
    (tier / "nobody").symlink_to(victim)
    r = _user_dirs(str(tier / "nobody"), "nobody")
    assert r.returncode != 0 and "must be a directory of nobody with mode 0700" in r.stderr
    st = os.stat(victim)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)  # untouched
    (tier / "other").mkdir()  # a directory of someone else (root) under the user's name
    r = _user_dirs(str(tier / "other"), "nobody")
    assert r.returncode != 0 and "found: directory|root|" in r.stderr


@needs_root
def test_a_covered_ancestor_keeps_showing_its_entries(tmp_path):
    ancestor = tmp_path / "mnt"
    (ancestor / "data").mkdir(parents=True)
    (ancestor / "data" / "f").write_text("kept\n")
    (ancestor / "file").write_text("file\n")
    (ancestor / "link").symlink_to("data")
    code = (
        "import os, sys; from iosea_wf import attach; a = sys.argv[1]; attach._enter_namespaces(); "
        "attach._cover_keeping_entries(a); os.makedirs(a + '/new/mp'); "
        "print(sorted(os.listdir(a)), open(a + '/data/f').read().strip(), open(a + '/file').read().strip(), "
        "os.readlink(a + '/link'))"
    )
    r = subprocess.run([sys.executable, "-c", code, str(ancestor)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("] ", 1)[1].split() == ["kept", "file", "data"]
    assert "'new'" in r.stdout and "'data'" in r.stdout
    assert sorted(os.listdir(ancestor)) == ["data", "file", "link"]  # nothing changed outside


def test_progress_is_read_only_from_a_plain_file_of_its_own(tmp_path):
    from iosea_wf.steps import read_progress

    secret = tmp_path / "secret.json"
    secret.write_text('{"sessions": "of every user"}')
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    good = job_dir / "good.json"
    good.write_text('{"files_done": 1}')
    assert read_progress(str(good)) == {"files_done": 1}
    (job_dir / "sym.json").symlink_to(secret)
    os.link(secret, job_dir / "hard.json")
    assert read_progress(str(job_dir / "sym.json")) is None
    assert read_progress(str(job_dir / "hard.json")) is None
    os.mkfifo(job_dir / "fifo.json")
    assert read_progress(str(job_dir / "fifo.json")) is None  # and does not block
    (job_dir / "list.json").write_text("[1]")
    assert read_progress(str(job_dir / "list.json")) is None
    assert read_progress(str(job_dir / "missing.json")) is None
