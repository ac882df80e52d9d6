"""Exports confined to what the user may share: root squashed, RO when every step is RO (real ganesha)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from iosea_wf import manager
from tests.integration.conftest import nfs_list, nfs_read
from tests.unix_users import owned_dir, owned_file, unix_user

WDF = """\
workflow:
  name: exports
services:
  - name: shared
    type: NFS
    attributes:
      namespace: {shared}
      mountpoint: "/mnt/iosea-test/{{{{ SESSION }}}}/shared"
  - name: private
    type: NFS
    attributes:
      namespace: {private}
      mountpoint: "/mnt/iosea-test/{{{{ SESSION }}}}/private"
steps:
  - name: reader
    command: "sbatch job.sh"
    services:
      - name: shared {shared_mode}
      - name: private RO
  - name: writer
    command: "sbatch job.sh"
    services:
      - name: private {private_mode}
"""


def _url(base: str, name: str, **creds) -> str:
    path, _, query = base.partition("?")
    extra = "".join(f"&{k}={v}" for k, v in creds.items())
    return f"{path}/{name}?{query}{extra}"


def nfs_copy(source: Path, url: str) -> subprocess.CompletedProcess:
    """Write a local file into an export with the real NFS client nfs-cp (as uid 0 here)."""
    return subprocess.run(["nfs-cp", str(source), url], capture_output=True, text=True, timeout=30)


@pytest.fixture
def user():
    with unix_user() as entry:
        yield entry


def test_root_is_squashed_and_a_private_namespace_of_its_user_starts(user, tmp_path, state_dir):
    home = Path(user.pw_dir)
    shared = owned_dir(home / "shared", user, 0o755)
    owned_file(shared / "secret.txt", user, 0o600, "the user's secret\n")
    owned_file(shared / "public.txt", user, 0o644, "anyone may read this\n")
    owned_dir(shared / "drop", user, 0o777)
    private = owned_dir(home / "private", user, 0o700)
    owned_file(private / "mine.txt", user, 0o600, "private\n")
    wdf = tmp_path / "wf.yaml"
    wdf.write_text(WDF.format(shared=shared, private=private, shared_mode="RW", private_mode="RW"))

    # The orchestrator runs as root for this user, as the site service does: with the user's Slurm
    # token, which the services' allocations (the user's jobs) are submitted and cancelled with.
    token = subprocess.run(
        ["runuser", "-u", user.pw_name, "--", "scontrol", "token", "lifespan=600"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    ctx = manager.Context(state_dir=str(state_dir), user=user.pw_name, slurm_jwt=token.split("=", 1)[1])
    session = manager.start(ctx, str(wdf), "squash", {})
    try:
        urls = {s["name"]: s["url"] for s in session["services"]}
        assert all(s["state"] == "ACTIVE" for s in manager.status(ctx, "squash")["services"])

        # nfs-cat runs as uid 0: squashed to nobody, it reads what anyone may read and nothing more.
        assert nfs_read(urls["shared"], "public.txt").stdout == "anyone may read this\n"
        denied = nfs_read(urls["shared"], "secret.txt")
        assert denied.returncode != 0 and "ACCES" in denied.stderr
        assert nfs_list(urls["private"]).returncode != 0
        # The private export is up all the same: its owner lists it (AUTH_SYS as the owner's uid).
        as_owner = subprocess.run(
            ["nfs-ls", _url(urls["private"], "", uid=user.pw_uid, gid=user.pw_gid).replace("/?", "?")],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert as_owner.returncode == 0 and "mine.txt" in as_owner.stdout, as_owner.stderr

        # What root writes lands as nobody (65534), never as root.
        source = tmp_path / "from-root.txt"
        source.write_text("written by root over NFS\n")
        assert nfs_copy(source, _url(urls["shared"], "drop/from-root.txt")).returncode == 0
        landed = os.stat(shared / "drop" / "from-root.txt")
        assert (landed.st_uid, landed.st_gid) == (65534, 65534)
        refused = nfs_copy(source, _url(urls["shared"], "at-top.txt"))
        assert refused.returncode != 0 and not (shared / "at-top.txt").exists()
    finally:
        manager.stop(ctx, "squash")


def test_an_export_whose_steps_are_all_ro_refuses_writes(tmp_path, state_dir):
    shared, private = tmp_path / "ro", tmp_path / "rw"
    for ns in (shared, private):
        ns.mkdir()
        (ns / "drop").mkdir()
        (ns / "drop").chmod(0o777)
        (ns / "hello.txt").write_text("hello\n")
    wdf = tmp_path / "wf.yaml"
    wdf.write_text(WDF.format(shared=shared, private=private, shared_mode="RO", private_mode="RW"))
    ctx = manager.Context(state_dir=str(state_dir))
    session = manager.start(ctx, str(wdf), "ro", {})
    try:
        urls = {s["name"]: s["url"] for s in session["services"]}
        source = tmp_path / "new.txt"
        source.write_text("new\n")
        # `shared` is RO in every step: exported read-only.
        assert nfs_read(urls["shared"], "hello.txt").stdout == "hello\n"
        refused = nfs_copy(source, _url(urls["shared"], "drop/new.txt"))
        assert refused.returncode != 0 and "ROFS" in refused.stderr
        assert not (shared / "drop" / "new.txt").exists()
        # `private` is RO in one step and RW in another: exported read-write.
        assert nfs_copy(source, _url(urls["private"], "drop/new.txt")).returncode == 0
        assert (private / "drop" / "new.txt").read_text() == "new\n"
    finally:
        manager.stop(ctx, "ro")


def test_a_namespace_symlink_to_etc_is_refused_before_anything_starts(iosea, tmp_path):
    link = tmp_path / "looks-fine"
    link.symlink_to("/etc")
    (tmp_path / "rw").mkdir()
    wdf = tmp_path / "wf.yaml"
    wdf.write_text(WDF.format(shared=link, private=tmp_path / "rw", shared_mode="RO", private_mode="RW"))
    r = iosea("start", f"WORKFLOW={wdf}", "SESSION=etc")
    assert r.code == 2 and "resolves to /etc) is not inside the site's namespace roots" in r.err
    assert iosea("list", "--all", "--json").json()["sessions"] == []
