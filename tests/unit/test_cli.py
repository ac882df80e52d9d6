"""The CLI's shape: both argument forms, common options anywhere, exit codes, no tracebacks."""

from __future__ import annotations

import pytest

from iosea_wf import cli
from iosea_wf.errors import EXIT_CODES, UsageError


def test_keyword_form_and_options_form_are_equivalent():
    a = cli.parse(["start", "WORKFLOW=w.yaml", "SESSION=s1", "NS1=/data/x"])
    b = cli.parse(["start", "-w", "w.yaml", "-s", "s1", "-d", "NS1=/data/x"])
    assert (a.workflow, a.session, a.variables) == (b.workflow, b.session, b.variables)
    assert a.variables == {"NS1": "/data/x"}


def test_common_options_before_or_after_the_subcommand():
    a = cli.parse(["--json", "--state-dir", "/tmp/x", "list"])
    b = cli.parse(["list", "--json", "--state-dir", "/tmp/x"])
    assert a.json and b.json
    assert a.state_dir == b.state_dir == "/tmp/x"


def test_value_may_contain_equals_sign():
    args = cli.parse(["validate", "WORKFLOW=w.yaml", "OPTS=a=b"])
    assert args.variables == {"OPTS": "a=b"}


@pytest.mark.parametrize(
    "argv, fragment",
    [
        ([], "a command is needed"),
        (["frobnicate"], "invalid choice"),
        (["stop", "NOTKEYVALUE"], "expected KEY=VALUE"),
        (["stop", "SESSION=s", "X=1"], "takes no WDF variables"),
        (["list", "STEP=x"], "unrecognized arguments"),
        (["show", "tiers", "SESSION=x"], "unrecognized arguments"),
        (["validate", "-d", "novalue"], "-d expects NAME=value"),
        (["show", "nothing"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2_without_traceback(iosea, argv, fragment):
    r = iosea(*argv)
    assert r.code == 2
    assert fragment in r.err
    assert "Traceback" not in r.err


def test_start_requires_workflow_and_session(iosea):
    r = iosea("start", "SESSION=s1")
    assert r.code == 2 and "WORKFLOW= is mandatory" in r.err
    r = iosea("start", "WORKFLOW=x.yaml")
    assert r.code == 2 and "SESSION= is mandatory" in r.err


# OWNER/NAME names a session another user shares (sharing.split_ref): "a/b" is a name.
@pytest.mark.parametrize("name", ["a/b/c", "/b", "a/", "../b", "-x", "with space", "x" * 65, ""])
def test_bad_session_names_are_refused(iosea, name):
    r = iosea("stop", f"SESSION={name}")
    assert r.code == 2
    assert "session" in r.err.lower()


def test_builtin_variables_cannot_be_overridden(iosea, tmp_path):
    r = iosea("validate", f"WORKFLOW={tmp_path / 'w.yaml'}", "USER=root")
    assert r.code == 2 and "built in" in r.err


def test_help_teaches_both_forms_and_exit_codes(iosea):
    r = iosea("--help")
    assert r.code == 0
    assert "WORKFLOW=wdf.yaml SESSION=s1" in r.out
    for code in EXIT_CODES:
        assert f"  {code} " in r.out or f"  {code:<4}" in r.out
    r = iosea("start", "--help")
    assert r.code == 0 and "--workflow" in r.out and "WORKFLOW=" in r.out


def test_unknown_session_is_exit_4(iosea):
    r = iosea("status", "SESSION=nope")
    assert r.code == 4 and "no session named 'nope'" in r.err
    r = iosea("stop", "SESSION=nope")
    assert r.code == 4


def test_list_empty_store(iosea):
    r = iosea("list", "--json")
    assert r.code == 0 and r.json() == {"sessions": []}


def test_show_json_shape_on_both_sites(iosea):
    for site in ("inventories/local", "inventories/example"):
        for what in ("locations", "flavors", "tiers"):
            r = iosea("show", what, "--json", "--site", site)
            assert r.code == 0, r.err
            rows = r.json()[what]
            assert rows and all("name" in row for row in rows)
    r = iosea("show", "tiers", "--json")
    assert {t["name"] for t in r.json()["tiers"]} == {"flash", "disk", "tape"}
    assert all(t["path"].startswith("/") for t in r.json()["tiers"])


def test_missing_site_is_exit_3(iosea, tmp_path):
    r = iosea("show", "flavors", "--site", str(tmp_path / "nowhere"))
    assert r.code == 3 and "no site inventory" in r.err


def test_parser_error_is_usage_error():
    with pytest.raises(UsageError):
        cli.parse(["start", "--no-such-option"])
