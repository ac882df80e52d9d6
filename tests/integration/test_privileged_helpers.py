"""The Workflow Manager's account and its privileged helpers, as installed by `make site`.

Everything runs as the account (runuser -u iosea-wf), through the sudoers rule, exactly as the
service calls the helpers: `sudo -n /usr/local/libexec/iosea-wf/<helper> ARGS`. What a
compromised account could try is refused by the helpers themselves (exit 2, one line): a
namespace outside the site's roots, another user's 0700 directory, a name that is not in the safe
form, root or a system account as owner, any program the rule does not name. What the account is
there for works: a user's tier directory made 0700 and theirs, a namespace exported and removed
(read back with a real NFS client as its owner).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.unix_users import owned_dir, unix_user

ACCOUNT = "iosea-wf"
HELPERS = "/usr/local/libexec/iosea-wf"
FACTS = "/etc/iosea-wf/helpers.json"
SUDOERS = "/etc/sudoers.d/iosea-wf"


def as_account(*argv: str) -> subprocess.CompletedProcess:
    """Run ``argv`` as the service account, with a clean environment."""
    return subprocess.run(
        ["runuser", "-u", ACCOUNT, "--", "env", "-i", "PATH=/usr/bin:/bin", *argv],
        capture_output=True, text=True, timeout=120, cwd="/",
    )  # fmt: skip


def helper(name: str, *args: str) -> subprocess.CompletedProcess:
    """One helper, as the service calls it."""
    return as_account("sudo", "-n", f"{HELPERS}/{name}", *args)


@pytest.fixture(scope="module", autouse=True)
def installed():
    """The site has the account and the helpers (`make site`, role privileged_helpers)."""
    try:
        entry = pwd.getpwnam(ACCOUNT)
    except KeyError:
        pytest.fail(f"no account {ACCOUNT}: run `make site` (role privileged_helpers)")
    assert entry.pw_uid != 0 and entry.pw_name != "slurm"
    assert shutil.which("sudo"), "sudo is not installed"


@pytest.fixture
def alice():
    """A fresh user with a namespace in her 0700 home (and a tier directory removed afterwards)."""
    with unix_user() as user:
        os.chmod(user.pw_dir, 0o700)
        owned_dir(os.path.join(user.pw_dir, "ns"), user, 0o700)
        yield user
        facts = json.loads(Path(FACTS).read_text())
        for tier in facts["tiers"].values():
            shutil.rmtree(os.path.join(tier, user.pw_name), ignore_errors=True)


def _refused(done: subprocess.CompletedProcess, why: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "refused" in done.stderr and why in done.stderr, done.stderr


def test_the_account_is_unprivileged_and_the_rule_names_each_helper():
    done = as_account("id", "-u")
    assert done.stdout.strip() != "0"
    rule = Path(SUDOERS).read_text()
    assert (
        "ALL=(root) NOPASSWD: "
        + ", ".join(f"{HELPERS}/{n}" for n in ("export-add", "export-remove", "tier-dir", "cancel-job"))
        in rule
    )
    assert "*" not in rule.split("NOPASSWD:", 1)[1]
    assert subprocess.run(["visudo", "-cf", SUDOERS], capture_output=True).returncode == 0
    for path in [HELPERS, FACTS, *(f"{HELPERS}/{n}" for n in os.listdir(HELPERS))]:
        st = os.stat(path)
        assert st.st_uid == 0 and not st.st_mode & 0o022, path


def test_nothing_but_the_helpers_runs_as_root():
    for argv in (["/bin/sh", "-c", "id"], ["id"], [f"{HELPERS}/ganesha-export", "list", "--instance", "/"]):
        done = as_account("sudo", "-n", *argv)
        assert done.returncode != 0 and "password is required" in done.stderr, (argv, done.stderr)


def test_an_export_outside_the_namespace_roots_is_refused(alice):
    for path in ("/etc", "/var/lib/iosea-wf", "/"):
        try:
            done = helper("export-add", "--datanode", "datanode1", "--key", "k.0123", "--path", path,
                          "--owner", alice.pw_name, "--access", "RO", "--preferred-id", "4000")  # fmt: skip
        finally:
            # Never left behind, even when a broken helper exported it.
            helper("export-remove", "--datanode", "datanode1", "--key", "k.0123")
        _refused(done, "not below one of the site's namespace roots")


def test_someone_elses_0700_directory_is_refused(alice):
    with unix_user() as bob:
        try:
            done = helper("export-add", "--datanode", "datanode1", "--key", "k.0123",
                          "--path", os.path.join(alice.pw_dir, "ns"), "--owner", bob.pw_name,
                          "--access", "RO", "--preferred-id", "4000")  # fmt: skip
        finally:
            helper("export-remove", "--datanode", "datanode1", "--key", "k.0123")
        _refused(done, f"not readable by {bob.pw_name}")
        asked = [
            json.loads(helper("may-use", "--user", who.pw_name, "--mode", "r", "--path", done_path).stdout)
            for who, done_path in ((alice, os.path.join(alice.pw_dir, "ns")), (bob, alice.pw_dir))
        ]
        assert [a["may"] for a in asked] == [True, False]
        assert asked[0]["realpath"] == os.path.join(alice.pw_dir, "ns") and asked[0]["is_dir"]
        _refused(helper("tier-dir", "--tier", "flash", "--user", "root"), "not a user iosea-wf acts for")


def test_bad_names_are_refused(alice):
    ns = os.path.join(alice.pw_dir, "ns")
    common = ["--path", ns, "--owner", alice.pw_name, "--access", "RO", "--preferred-id", "4000"]
    bad_key = helper("export-add", "--datanode", "datanode1", "--key", "../../etc/x", *common)
    _refused(bad_key, "an export key")
    _refused(helper("export-add", "--datanode", "/etc", "--key", "k", *common), "a datanode name")
    _refused(helper("export-add", "--datanode", "nodatanode", "--key", "k", *common), "not a datanode")
    _refused(helper("export-remove", "--datanode", "datanode1", "--key", "a/../../b"), "an export key")
    _refused(helper("tier-dir", "--tier", "../../etc", "--user", alice.pw_name), "a tier name")
    _refused(helper("tier-dir", "--tier", "flash", "--user", "../root"), "a user name")
    _refused(helper("cancel-job", "--job", "1 2"), "a job id")


def test_a_tier_directory_is_made_0700_and_the_users(alice):
    done = helper("tier-dir", "--tier", "flash", "--user", alice.pw_name)
    assert done.returncode == 0, done.stderr
    path = json.loads(done.stdout)["path"]
    st = os.lstat(path)
    assert (st.st_uid, st.st_mode & 0o7777) == (alice.pw_uid, 0o700)
    os.chmod(path, 0o755)  # a wrong mode of the user's own directory is fixed
    assert helper("tier-dir", "--tier", "flash", "--user", alice.pw_name).returncode == 0
    assert os.lstat(path).st_mode & 0o7777 == 0o700


def test_a_symlink_in_place_of_a_tier_directory_is_refused(alice):
    facts = json.loads(Path(FACTS).read_text())
    path = os.path.join(facts["tiers"]["disk"], alice.pw_name)
    os.symlink("/etc", path)
    try:
        _refused(helper("tier-dir", "--tier", "disk", "--user", alice.pw_name), "is a symlink")
        assert os.stat("/etc").st_uid == 0
    finally:
        os.unlink(path)


def test_the_users_own_0700_namespace_is_exported_and_removed(alice):
    key = f"{alice.pw_name}.helpers.0123456789ab"
    ns = os.path.join(alice.pw_dir, "ns")
    done = helper("export-add", "--datanode", "datanode1", "--key", key, "--path", ns,
                  "--owner", alice.pw_name, "--access", "RO", "--preferred-id", "4242")  # fmt: skip
    try:
        assert done.returncode == 0, done.stderr
        export = json.loads(done.stdout)
        assert export["squash"] == "Root_Squash" and export["pseudo"] == f"/iosea/{alice.pw_name}/{key}"
        url = f"{export['url']}&uid={alice.pw_uid}&gid={alice.pw_gid}"
        assert subprocess.run(["nfs-ls", url], capture_output=True, timeout=10).returncode == 0
    finally:
        gone = helper("export-remove", "--datanode", "datanode1", "--key", key)
    assert gone.returncode == 0, gone.stderr
    assert json.loads(gone.stdout)["removed"] is True
