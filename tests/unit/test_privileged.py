"""The privileged helpers' own checks (roles/privileged_helpers/files) and iosea_wf/privileged.py.

The helpers run as root through sudo; here their checks are called directly, with a facts file of
the test's own (the module's CONFIG path pointed at it), as root and as the account would see them.
The real helpers, through sudo as the service account, are in tests/integration/test_privileged_helpers.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import sys

import pytest

from iosea_wf import privileged
from tests.sites import ROOT

HELPERS = ROOT / "roles" / "privileged_helpers" / "files"


@pytest.fixture
def helper(tmp_path, monkeypatch):
    """The helpers' library, its facts file a test's own (namespace roots: tmp_path/roots)."""
    spec = importlib.util.spec_from_file_location("iosea_helper", HELPERS / "iosea_helper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    roots = tmp_path / "roots"
    roots.mkdir()
    conf = {"namespace_roots": [str(roots)], "min_uid": 1000, "service_account": "iosea-wf"}
    path = tmp_path / "helpers.json"
    path.write_text(json.dumps(conf))
    monkeypatch.setattr(module, "CONFIG", str(path))
    module.test_conf = conf
    module.test_roots = roots
    return module


@pytest.mark.parametrize("key", ["../etc", ".hidden", "a/b", "a b", "", "a\nb", "x" * 201, "a..b"])
def test_unsafe_keys_are_refused(helper, key):
    with pytest.raises(helper.Refused):
        helper.safe(key, helper.KEY_RE, "an export key")


def test_a_key_as_iosea_wf_makes_it_passes(helper):
    assert helper.safe("alice.s1.es_1.0123456789ab", helper.KEY_RE, "an export key")


@pytest.mark.parametrize("user", ["root", "daemon", "nobody", "nobody-here-xyz", "../x", "a b"])
def test_root_system_and_unknown_users_are_refused(helper, user):
    with pytest.raises(helper.Refused):
        helper.site_user(user, helper.test_conf)


@pytest.mark.parametrize(
    "path", ["/etc", "/", "relative", "/tmp/a'b", "/tmp/a:b", "/tmp/a/../b", "/tmp/x\ny"]
)
def test_namespaces_outside_the_roots_or_in_unsafe_form_are_refused(helper, path):
    with pytest.raises(helper.Refused):
        helper.namespace(path, pwd.getpwnam("root"), "RO", helper.test_conf)


def test_a_root_itself_and_a_symlink_below_it_are_refused(helper, tmp_path):
    root = helper.test_roots
    (root / "link").symlink_to("/etc")
    for path in (str(root), str(root / "link"), str(root / "missing")):
        with pytest.raises(helper.Refused):
            helper.namespace(path, pwd.getpwnam("root"), "RO", helper.test_conf)


def test_a_namespace_below_a_root_passes_for_a_user_who_may_use_it(helper):
    ns = helper.test_roots / "ns"
    ns.mkdir()
    assert helper.namespace(str(ns), pwd.getpwnam("root"), "RW", helper.test_conf) == str(ns)


def test_a_facts_file_others_may_write_is_refused(helper):
    os.chmod(helper.CONFIG, 0o666)
    with pytest.raises(helper.Refused):
        helper.config()


def test_a_refusal_is_one_line_and_exit_2(helper, capsys):
    def act():
        raise helper.Refused("no")

    assert helper.refuse_on_error("export-add", act) == helper.REFUSED == privileged.REFUSED
    assert capsys.readouterr().err == "iosea-wf helper export-add: refused: no\n"


def test_helpers_are_called_through_sudo_as_commands_never_a_shell():
    assert privileged.argv("tier-dir", "--tier", "flash", "--user", "a;b") == [
        "sudo", "-n", "/usr/local/libexec/iosea-wf/tier-dir", "--tier", "flash", "--user", "a;b",
    ]  # fmt: skip
    with pytest.raises(ValueError):
        privileged.argv("../../bin/sh")


def test_helpers_are_used_only_by_the_service_account(monkeypatch):
    site = {"iosea_privileged_helpers": True, "iosea_wm_account": "iosea-wf"}
    assert not privileged.in_use({})
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert not privileged.in_use(site)  # root does it itself
    monkeypatch.setattr(os, "geteuid", lambda: 999)
    monkeypatch.setattr(privileged, "current_user", lambda: "alice")
    assert not privileged.in_use(site)  # a user's in-process CLI: its own rights, as before
    monkeypatch.setattr(privileged, "current_user", lambda: "iosea-wf")
    assert privileged.in_use(site)


def test_every_helper_the_sudoers_rule_names_is_shipped():
    defaults = (ROOT / "roles" / "privileged_helpers" / "defaults" / "main.yml").read_text()
    names = defaults.split("privileged_helpers_names: [", 1)[1].split("]", 1)[0].split(", ")
    for name in names:
        path = HELPERS / name
        assert path.read_text().startswith("#!/usr/bin/python3 -I\n"), name
        assert os.access(path, os.X_OK), name
    assert sys.version_info >= (3, 11)


def test_the_account_asks_the_helper_as_the_user_and_root_asks_itself(monkeypatch, tmp_path):
    from iosea_wf import permissions

    asked = []

    def fake_call(action, args, **_):
        asked.append((action, args))
        return {"may": False, "realpath": "/home/x/real", "is_dir": True}

    monkeypatch.setattr(privileged, "call", fake_call)
    assert permissions.resolve("root", str(tmp_path)) == (str(tmp_path), True)  # root: no helper
    assert asked == []
    monkeypatch.setattr(os, "geteuid", lambda: 999)
    assert permissions.resolve("nobody", "/home/x/link") == ("/home/x/real", True)
    assert permissions.user_may("nobody", "/home/x/link", "r") is False
    assert asked == [("may-use", ["--user", "nobody", "--mode", "r", "--path", "/home/x/link"])] * 2
