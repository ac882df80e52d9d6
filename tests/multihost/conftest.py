"""Tests of the multi-host site (`make test-multihost`): hosts built by tools/multihost/harness.py.

Every command runs on one of the site's hosts, entered with nsenter (``on(host, ...)``): the CLI
on the login host as a real user, talking to the Workflow Manager on host wm over TCP with MUNGE;
Slurm and NFS clients on the hosts that would run them. Without the site, every test is skipped
(failed under IOSEA_WF_REQUIRE_SITE=1).
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.unix_users import unix_user

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "tools" / "multihost" / "harness.py"
SITE = REPO / "inventories" / "multihost"
# Where the site's roles installed iosea-wf (workflow_manager_prefix): shared by every host.
CLI = "/opt/iosea-wf-multihost/bin/iosea-wf"
WM_URL = "http://127.0.50.2:8470"
ADDRESSES = {"login": "127.0.50.1", "wm": "127.0.50.2", "controller": "127.0.50.3",
             "datanode1": "127.0.50.11", "datanode2": "127.0.50.12",
             "compute1": "127.0.50.21", "compute2": "127.0.50.22"}  # fmt: skip
NODES = ["compute1", "compute2", "datanode1", "datanode2"]


def site_up() -> bool:
    """True when every host of the harness runs and the CLI is installed."""
    try:
        done = subprocess.run([sys.executable, str(HARNESS), "status"], capture_output=True, timeout=20)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0 and os.path.exists(CLI)


def pytest_collection_modifyitems(config, items):
    """Mark every test here `site`; skip them when the multi-host site is not up (unless required)."""
    up = None
    for item in items:
        if "multihost" not in str(item.fspath):
            continue
        item.add_marker(pytest.mark.site)
        if up is None:
            up = site_up()
        if not up and os.environ.get("IOSEA_WF_REQUIRE_SITE") != "1":
            item.add_marker(
                pytest.mark.skip(reason="the multi-host site is not up (run `make site-multihost`)")
            )


def on(host: str, *argv: str, user: str | None = None, cwd: str | None = None,
       env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:  # fmt: skip
    """Run ``argv`` on ``host`` (as ``user``, in ``cwd``, with ``env`` added), bounded in time."""
    command = [sys.executable, str(HARNESS), "exec", host, "--"]
    if user:
        command += ["runuser", "-u", user, "--"]
    if cwd or env:
        command += ["env", *(["-C", cwd] if cwd else []), *(f"{k}={v}" for k, v in (env or {}).items())]
    return subprocess.run([*command, *argv], capture_output=True, text=True, timeout=timeout)


def wait_for(what: str, probe: Callable[[], object], timeout: float = 60, every: float = 0.5):
    """Poll ``probe()`` until it returns something true; return it (AssertionError after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(every)


@pytest.fixture
def alice() -> Iterator[pwd.struct_passwd]:
    """A fresh real user (shared /etc/passwd and /home, as a centre's directory service and home)."""
    with unix_user() as user:
        yield user


@pytest.fixture
def cli(alice) -> Callable[..., subprocess.CompletedProcess]:
    """``cli("status", ...)``: the site's iosea-wf as alice on the login host, through the service."""
    env = {"IOSEA_WF_SITE": str(SITE), "IOSEA_WF_URL": WM_URL}
    started: list[str] = []

    def run(*argv: str, cwd: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
        if argv and argv[0] == "start":
            started.extend(a.split("=", 1)[1] for a in argv if a.startswith("SESSION="))
        return on("login", CLI, *argv, user=alice.pw_name, cwd=cwd or alice.pw_dir, env=env, timeout=timeout)

    yield run
    for session in started:  # nothing of a failed test stays exported or allocated
        run("stop", f"SESSION={session}", "--force", timeout=120)


def own(user: pwd.struct_passwd, path: Path, text: str | None = None, mode: int = 0o700) -> Path:
    """A directory (or, with ``text``, a file) owned by ``user``."""
    if text is None:
        path.mkdir(parents=True, exist_ok=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    os.chown(path, user.pw_uid, user.pw_gid)
    path.chmod(mode)
    return path


def status(cli, session: str) -> dict:
    """``iosea-wf status --json`` of a session."""
    done = cli("status", f"SESSION={session}", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)
