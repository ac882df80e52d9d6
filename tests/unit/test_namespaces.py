"""Namespaces: inside the site's roots, existing, and usable by the session's owner (not by root)."""

from __future__ import annotations

import grp
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from iosea_wf.errors import SiteError, WDFError
from iosea_wf.manager import _export_access
from iosea_wf.permissions import user_may
from iosea_wf.site import load_site
from iosea_wf.wdf import load_wdf
from tests.sites import LOCAL_SITE
from tests.unix_users import owned_dir, unix_user

WDF = """\
workflow:
  name: ns_check
services:
  - name: svc
    type: NFS
    attributes:
      namespace: {ns}
      mountpoint: /mnt/iosea-test/svc
datamovers:
  - name: out
    trigger: step_stop
    target: tape
    operation: {operation}
    elements: ["*.dat"]
steps:
  - name: only
    command: "sbatch job.sh"
    services:
      - name: svc {mode}
        datamovers: {movers}
"""


@pytest.fixture(scope="module")
def site():
    return load_site(LOCAL_SITE)


@pytest.fixture(scope="module")
def user():
    with unix_user() as entry:
        yield entry


@pytest.fixture
def scratch():
    """A directory below the /tmp root that every user can traverse (tmp_path is root's 0700)."""
    path = Path(f"/tmp/iwft-ns-{secrets.token_hex(4)}")
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _load(tmp_path, site, ns, owner, *, mode="RW", operation="copy", movers="[]"):
    wdf = tmp_path / "wf.yaml"
    wdf.write_text(WDF.format(ns=ns, mode=mode, operation=operation, movers=movers))
    return load_wdf(wdf, {}, site, owner=owner)


def _problem(tmp_path, site, ns, owner="root", **kw):
    with pytest.raises(WDFError) as caught:
        _load(tmp_path, site, ns, owner, **kw)
    (problem,) = caught.value.problems
    assert problem.path == "services[0].attributes.namespace" and problem.line == 7
    return problem


def test_the_site_declares_resolved_namespace_roots(site):
    assert site.namespace_roots == ("/home", "/scratch", "/tmp", "/var/tmp")
    assert load_site(Path(LOCAL_SITE).parent / "example").namespace_roots == (
        "/home",
        "/scratch",
        "/work",
        "/store",
    )


def test_nfs_clients_are_the_sites_nodes(tmp_path, site):
    assert site.nfs_clients == ("127.0.0.1",)
    example = load_site(Path(LOCAL_SITE).parent / "example")
    # The compute nodes, the datanodes, and the Workflow Manager's host (it lists the exports).
    assert len(example.nfs_clients) == 128 + 16 + 4 + 1
    assert example.nfs_clients[0] == "cpu001.example.org" and example.nfs_clients[-2] == "10.20.0.14"
    assert example.nfs_clients[-1] == "mgmt01.example.org"
    copy = tmp_path / "site"
    shutil.copytree(LOCAL_SITE, copy)
    conf = copy / "group_vars" / "all" / "iosea.yml"
    conf.write_text(conf.read_text() + "\niosea_nfs_clients: [10.20.0.0/16]\n")
    assert load_site(copy).nfs_clients == ("10.20.0.0/16",)
    conf.write_text(conf.read_text() + "\niosea_nfs_clients: ['10.0.0.1; Access_Type = RW']\n")
    with pytest.raises(SiteError) as caught:
        load_site(copy)
    assert "is not an address, host name or CIDR network" in str(caught.value)


def test_a_site_without_namespace_roots_is_refused(tmp_path):
    copy = tmp_path / "site"
    shutil.copytree(LOCAL_SITE, copy)
    conf = copy / "group_vars" / "all" / "iosea.yml"
    conf.write_text("\n".join(x for x in conf.read_text().splitlines() if "iosea_namespace_roots" not in x))
    with pytest.raises(SiteError) as caught:
        load_site(copy)
    assert "iosea_namespace_roots" in str(caught.value)
    conf.write_text(conf.read_text() + "\niosea_namespace_roots: [/, /srv]\n")
    with pytest.raises(SiteError, match="whole file system"):
        load_site(copy)


@pytest.mark.parametrize("ns", ["/etc", "/", "/proc", "/var/lib", "/root", "/tmp", "/tmp/../etc"])
def test_system_directories_and_the_roots_themselves_are_refused(tmp_path, site, ns):
    problem = _problem(tmp_path, site, ns)
    assert "is not inside the site's namespace roots" in problem.message
    assert "/home, /scratch, /tmp, /var/tmp" in problem.expected


def test_a_symlink_to_etc_is_refused_by_what_it_resolves_to(tmp_path, site):
    link = tmp_path / "innocent"
    link.symlink_to("/etc")
    problem = _problem(tmp_path, site, str(link))
    assert problem.message == f"namespace {link} (resolves to /etc) is not inside the site's namespace roots"


def test_a_missing_namespace_is_refused_and_not_created(tmp_path, site):
    problem = _problem(tmp_path, site, str(tmp_path / "missing"))
    assert "is not an existing directory" in problem.message and "never creates" in problem.expected
    assert not (tmp_path / "missing").exists()


def test_a_valid_namespace_validates_and_is_kept_as_written(tmp_path, site):
    (tmp_path / "ns").mkdir()
    workflow = _load(tmp_path, site, str(tmp_path / "ns"), "root")
    assert workflow.services["svc"].namespace == str(tmp_path / "ns")


def test_user_may_asks_the_kernel_as_that_user(user, scratch):
    mine = owned_dir(scratch / "mine", user, 0o700)
    assert user_may(user.pw_name, str(mine), "r") and user_may(user.pw_name, str(mine), "w")
    readonly = owned_dir(scratch / "readonly", user, 0o555)
    assert user_may(user.pw_name, str(readonly), "r") and not user_may(user.pw_name, str(readonly), "w")
    roots = owned_dir(scratch / "roots", _root(), 0o700)
    assert not user_may(user.pw_name, str(roots), "r")
    assert user_may("root", str(roots), "w")
    # Every parent must be traversable: a 0777 directory inside a private one is out of reach.
    inner = owned_dir(roots / "open", _root(), 0o777)
    assert not user_may(user.pw_name, str(inner), "r")
    assert not user_may(user.pw_name, str(scratch / "absent"), "r")


def test_user_may_counts_supplementary_groups(user, scratch):
    group = f"iwft-g-{secrets.token_hex(3)}"
    subprocess.run(["groupadd", group], check=True)
    try:
        shared = scratch / "shared"
        shared.mkdir()
        os.chown(shared, 0, grp.getgrnam(group).gr_gid)
        shared.chmod(0o770)
        assert not user_may(user.pw_name, str(shared), "w")
        subprocess.run(["usermod", "-aG", group, user.pw_name], check=True)
        assert user_may(user.pw_name, str(shared), "w")
    finally:
        subprocess.run(["groupdel", group], check=False)


def test_user_may_refuses_unknown_users_and_modes(scratch):
    with pytest.raises(SiteError, match="not known"):
        user_may("iwft-nobody-at-all", str(scratch), "r")
    with pytest.raises(ValueError):
        user_may("root", str(scratch), "rx")


def test_the_owner_must_be_allowed_what_the_steps_do(tmp_path, site, user, scratch):
    readonly = owned_dir(scratch / "readonly", user, 0o555)
    problem = _problem(tmp_path, site, str(readonly), user.pw_name, mode="RW")
    why = "(a step uses it RW or moves data out of it)"
    assert problem.message == f"user {user.pw_name} may not read and write namespace {readonly} {why}"
    assert _load(tmp_path, site, str(readonly), user.pw_name, mode="RO").services["svc"]
    # A move deletes what it moved from the namespace: an RO step with a move needs write.
    problem = _problem(
        tmp_path, site, str(readonly), user.pw_name, mode="RO", operation="move", movers="[out]"
    )
    assert "may not read and write" in problem.message
    private = owned_dir(scratch / "private", _root(), 0o700)
    problem = _problem(tmp_path, site, str(private), user.pw_name, mode="RO")
    assert problem.message == f"user {user.pw_name} may not read namespace {private}"
    # The same directory is fine for its own (root) owner: the check is for the owner, not for us.
    assert _load(tmp_path, site, str(private), "root", mode="RO")


def test_validate_refuses_etc_with_exit_2_naming_the_key(iosea, tmp_path):
    wdf = tmp_path / "wf.yaml"
    wdf.write_text(WDF.format(ns="/etc", mode="RO", operation="copy", movers="[]"))
    r = iosea("validate", f"WORKFLOW={wdf}")
    assert r.code == 2
    assert f"{wdf}:7:" in r.err and "services[0].attributes.namespace: namespace /etc is not inside" in r.err


def test_export_access_is_ro_unless_a_step_uses_the_service_rw(tmp_path, site):
    for ns in ("a", "b", "c"):
        (tmp_path / ns).mkdir()
    wdf = tmp_path / "wf.yaml"
    wdf.write_text(
        "workflow: {name: acc}\nservices:\n"
        + "".join(
            f"  - {{name: {n}, type: NFS, "
            f"attributes: {{namespace: {tmp_path / n}, mountpoint: /mnt/x/{n}}}}}\n"
            for n in ("a", "b", "c")
        )
        + "steps:\n"
        "  - {name: s1, command: sbatch j.sh, services: [{name: a RO}, {name: b RO}]}\n"
        "  - {name: s2, command: sbatch j.sh, services: [{name: b RW}]}\n"
    )
    workflow = load_wdf(wdf, {}, site, owner="root")
    session = {"wdf": workflow.to_dict(), "services": [{"name": n} for n in ("a", "b", "c")]}
    assert _export_access(session) == {"a": "RO", "b": "RW", "c": "RO"}


def _root():
    import pwd

    return pwd.getpwuid(0)


def test_user_may_run_a_program_only_through_searchable_directories(user, scratch):
    # What the service checks of its own Python before it submits jobs that run it as the user.
    top = owned_dir(scratch / "top", _root(), 0o755)
    (top / "bin").mkdir()
    program = top / "bin" / "python"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    link = scratch / "venv-python"
    link.symlink_to(program)
    assert user_may(user.pw_name, str(link), "x")
    top.chmod(0o700)  # the target's directory is closed, as /root is to a pyenv Python
    assert not user_may(user.pw_name, str(link), "x")
    os.chown(top, 0, user.pw_gid)
    top.chmod(0o710)  # searchable by the user's group only
    assert user_may(user.pw_name, str(link), "x")
    top.chmod(0o755)
    program.chmod(0o744)  # not executable by others
    assert not user_may(user.pw_name, str(link), "x")
    assert not user_may(user.pw_name, str(scratch / "missing"), "x")
