"""Real Unix users and the Workflow Manager service, shared by the tests that drive one through the other.

Import the fixtures into a test module (``from tests.integration.service_users import as_user,
client_bin, service, users  # noqa: F401``); each module then gets its own service and users
(module scope); the client venv is built once per test session. Where they point (a private
`iosea-wf serve`, or later the site's own service) is decided here only.

- ``user_venv``: a venv of Debian's python3 with this checkout installed (editable), runnable by
  every user, kept in /var/tmp across runs. The service runs from it: the job scripts it writes
  run its Python (the attach helper, the data mover) as the job's user, who cannot run root's.
- ``client_bin``: a venv of Debian's python3 with the project's wheel and only what the client
  side needs (no Ansible, no FastAPI: a login node's CLI talks to the service, it runs nothing).
- ``service``: ``iosea-wf serve`` on a private socket with a private store: its unix:// URL.
- ``users``: two fresh users (alice, bob: useradd, removed afterwards with their tier dirs).
- ``as_user``: runs the CLI as a user, in their home, through the service (runuser).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.api_service import need_munge, running_service
from tests.packaging import SYSTEM_PYTHON, build_wheel, editable_user_venv, system_venv
from tests.unix_users import fresh_uid

# What the CLI imports on the client side (cli, manager, store, site, wdf, api.client).
CLIENT_REQUIREMENTS = ["httpx", "pyyaml", "jinja2", "voluptuous", "tinydb", "rich"]
TIERS = "/var/lib/iosea-wf/local/tiers"


@pytest.fixture(scope="session")
def user_venv():
    """bin/ of a venv of Debian's python3 with this checkout installed (editable), runnable by all."""
    try:
        return editable_user_venv()
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def client_bin():
    """bin/ of a venv every user can run: Debian's python3, the project's wheel, the client's needs.

    One for the whole test session (the wheel of this checkout does not change during it).
    """
    if os.geteuid() != 0:
        pytest.skip("real users need root")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.fail(f"{SYSTEM_PYTHON} is missing")
    base = Path(tempfile.mkdtemp(prefix="iosea-wf-users-", dir="/var/tmp"))
    base.chmod(0o755)
    try:
        wheel = build_wheel(base)
        bin_dir = system_venv(base / "venv")
        pip = [str(bin_dir / "pip"), "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, *CLIENT_REQUIREMENTS], check=True, timeout=600, capture_output=True)
        subprocess.run([*pip, "--no-deps", str(wheel)], check=True, timeout=300, capture_output=True)
        yield bin_dir
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def service(user_venv):
    """The service, its socket in a folder every user can reach: unix:// URL."""
    need_munge()
    folder = Path(tempfile.mkdtemp(prefix="iosea-wf-wm-", dir="/tmp"))
    folder.chmod(0o755)
    try:
        with running_service(folder / "wm.sock", folder / "state", bin_dir=user_venv):
            yield f"unix://{folder / 'wm.sock'}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def users():
    """Two fresh users, alice and bob: their pwd entries; removed with their homes afterwards."""
    if os.geteuid() != 0:
        pytest.skip("creating a Unix user needs root")
    tag = secrets.token_hex(3)
    made = []
    try:
        for who in ("alice", "bob"):
            name = f"iwf-{who}-{tag}"
            subprocess.run(
                ["useradd", "-m", "-u", fresh_uid(), "-s", "/bin/sh", name], check=True, capture_output=True
            )
            made.append(name)
        yield [pwd.getpwnam(n) for n in made]
    finally:
        for name in made:
            # The service made them a directory on each tier their movers used.
            for tier in glob.glob(f"{TIERS}/*"):
                shutil.rmtree(os.path.join(tier, name), ignore_errors=True)
            subprocess.run(["userdel", "-r", name], check=False, capture_output=True)


@pytest.fixture
def as_user(client_bin, service):
    """as_user(user, *argv) runs `iosea-wf ARGV` as that user, in their home, through the service."""

    def command(user: pwd.struct_passwd, *argv: str) -> list[str]:
        env = {
            "PATH": f"{client_bin}:/usr/bin:/bin",
            "HOME": user.pw_dir,
            "IOSEA_WF_URL": service,
            "LANG": "C.UTF-8",
        }
        return ["runuser", "-u", user.pw_name, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()),
                str(client_bin / "iosea-wf"), *argv]  # fmt: skip

    def run(user: pwd.struct_passwd, *argv: str, cwd: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            command(user, *argv), cwd=cwd or user.pw_dir, capture_output=True, text=True, timeout=120
        )

    run.command = command
    return run
