"""Exit codes a user meets without a site: an unusable store (9) and ``--version``."""

from __future__ import annotations

import re
from importlib.metadata import version

import pytest

from iosea_wf.errors import EXIT_CODES, EXIT_STORE, StoreError


def test_store_error_has_its_own_exit_code():
    assert EXIT_STORE == 9 and StoreError("x").exit_code == 9
    assert 9 in EXIT_CODES


@pytest.mark.parametrize("command", [["list"], ["status", "SESSION=s1"], ["stop", "SESSION=s1"]])
def test_state_dir_that_is_a_file_exits_9(iosea, tmp_path, command):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("I am a file\n")
    r = iosea(*command, "--state-dir", str(blocker))
    assert r.code == 9, r.err
    assert f"cannot use the state directory {blocker}" in r.err
    assert "Traceback" not in r.err


def test_corrupt_store_exits_9(iosea, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "iosea-wf.json").write_text('{"sessions": {"1": {"name": ')
    r = iosea("list", "--state-dir", str(state))
    assert r.code == 9, r.err
    assert "iosea-wf.json is corrupt" in r.err and "Traceback" not in r.err


def test_version_is_the_installed_distribution(iosea):
    r = iosea("--version")
    assert r.code == 0
    assert r.out.strip() == f"iosea-wf {version('iosea-wf')}"
    assert re.fullmatch(r"iosea-wf \d+\.\d+\.\d+\S*", r.out.strip())


def test_help_lists_exit_code_9(iosea):
    r = iosea("--help")
    assert "  9    the state directory or its session store cannot be used" in r.out


def test_store_file_that_is_a_directory_exits_9(iosea, tmp_path):
    state = tmp_path / "state"
    (state / "iosea-wf.json").mkdir(parents=True)
    r = iosea("list", "--state-dir", str(state))
    assert r.code == 9, r.err
    assert "cannot read the session store" in r.err and "Is a directory" in r.err
