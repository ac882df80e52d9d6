"""The local site's own Workflow Manager service, as `make site` leaves it (role workflow_manager).

Every user reaches it with the site's installed CLI and no settings at all (the packaged local
inventory names it); it runs as its own account (iosea-wf), never root, and this checkout's code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from tests.api_service import need_munge
from tests.sites import LOCAL_SITE, ROOT
from tests.unix_users import unix_user

PID_FILE = Path("/run/iosea-wf/wm.pid")
PREFIX = Path("/opt/iosea-wf")
SITE_CLI = Path("/usr/local/bin/iosea-wf")


@pytest.fixture(scope="module")
def site_service() -> int:
    """The pid of the site's service; fails when `make site` did not start it."""
    need_munge()
    try:
        pid = int(PID_FILE.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        pytest.fail(f"the site's Workflow Manager does not run ({PID_FILE}): run `make site`")
    assert [a.decode() for a in cmdline[1:3]] == [f"{PREFIX}/bin/iosea-wf", "serve"], cmdline
    return pid


def test_the_site_names_its_service_literally():
    text = (LOCAL_SITE / "group_vars" / "all" / "workflow_manager.yml").read_text()
    assert "iosea_wm_url: unix:///run/iosea-wf/wm.sock" in text


def test_a_new_user_reaches_it_with_the_installed_cli_and_no_settings(site_service):
    with unix_user() as user:
        r = subprocess.run(
            ["runuser", "-u", user.pw_name, "--", "env", "-i", f"HOME={user.pw_dir}",
             "PATH=/usr/local/bin:/usr/bin:/bin", "iosea-wf", "list", "--all", "--json"],
            capture_output=True, text=True, timeout=60, cwd="/",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"sessions": []}
        assert r.stderr == ""


def test_root_goes_through_it_too_and_its_own_store_is_ignored(site_service, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("IOSEA_WF_URL", "IOSEA_WF_SITE")}
    env["IOSEA_WF_HOME"] = str(tmp_path / "ignored")
    r = subprocess.run(
        [str(Path(sys.executable).parent / "iosea-wf"), "list", "--all", "--json"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "IOSEA_WF_HOME ignored" in r.stderr and "unix:///run/iosea-wf/wm.sock" in r.stderr
    assert all(s["owner"] == "root" for s in json.loads(r.stdout)["sessions"])
    assert not (tmp_path / "ignored").exists()


def test_it_runs_this_checkouts_code(site_service):
    site_packages = next(PREFIX.glob("lib/python3*/site-packages"))
    (record,) = site_packages.glob("iosea_wf-*.dist-info/RECORD")
    hashes = dict(line.rsplit(",", 2)[:2] for line in record.read_text().splitlines())
    for module in ("iosea_wf/cli.py", "iosea_wf/manager.py", "iosea_wf/api/app.py"):
        digest = base64.urlsafe_b64encode(hashlib.sha256((ROOT / module).read_bytes()).digest())
        assert hashes[module] == "sha256=" + digest.decode().rstrip("="), (
            f"the site's service runs another {module} than this checkout's: run `make site`"
        )
    assert SITE_CLI.resolve() == PREFIX / "bin" / "iosea-wf"


def test_it_runs_as_its_own_account_never_root(site_service):
    status = Path(f"/proc/{site_service}/status").read_text()
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    account = pwd.getpwnam("iosea-wf")
    assert uids == [str(account.pw_uid)] * 4, f"the site's service runs as uid(s) {uids}"
