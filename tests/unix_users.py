"""Real Unix users for tests that check what a user (not root) may do: created, then removed."""

from __future__ import annotations

import os
import pwd
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


def fresh_uid() -> str:
    """A uid no account holds, drawn at random from 40000-59999 (``useradd -u``).

    useradd's next free uid is the uid of the user a test removed a moment ago, and slurmctld
    keeps a uid's groups cached for minutes (GroupUpdateTime): a new user with a group added
    (usermod -aG) would get the old user's groups in a job. A random one is almost never reused.
    """
    while True:
        uid = 40000 + secrets.randbelow(20000)
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return str(uid)


@contextmanager
def unix_user() -> Iterator[pwd.struct_passwd]:
    """A fresh user ``iwft-<random>`` with a home directory, removed with it afterwards."""
    if os.geteuid() != 0:
        pytest.skip("creating a Unix user needs root")
    name = f"iwft-{secrets.token_hex(4)}"
    subprocess.run(
        ["useradd", "-m", "-u", fresh_uid(), "-s", "/usr/sbin/nologin", name], check=True, capture_output=True
    )
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", "-r", name], check=False, capture_output=True)


def owned_dir(path, user: pwd.struct_passwd, mode: int):
    """Create directory ``path`` owned by ``user`` with ``mode`` (no umask); return it."""
    os.makedirs(path, exist_ok=True)
    os.chown(path, user.pw_uid, user.pw_gid)
    os.chmod(path, mode)
    return path


def owned_file(path, user: pwd.struct_passwd, mode: int, text: str):
    """Write ``text`` to ``path``, owned by ``user`` with ``mode``; return it."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chown(path, user.pw_uid, user.pw_gid)
    os.chmod(path, mode)
    return path
