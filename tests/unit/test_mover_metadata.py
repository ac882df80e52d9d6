"""The mover's copies keep their sources' metadata as ``cp -a`` does (issue 15, finding 10).

Run as root (owners, ``trusted.*``); setfacl is not installed here, so ACLs are written as the
``system.posix_acl_*`` attributes they are stored as (:func:`acl`).
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import struct
import subprocess
import time

import pytest
import xxhash

from tests.unit.mover_helpers import MOVER, read_progress, run_mover, write

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="owners and trusted.* attributes need root")

ACCESS, DEFAULT = "system.posix_acl_access", "system.posix_acl_default"
_TAGS = {"user::": 1, "user:": 2, "group::": 4, "group:": 8, "mask::": 0x10, "other::": 0x20}


def acl(*entries: str) -> bytes:
    """Encode an ACL ('user::rwx', 'user:1234:rw-', 'group::r--', 'mask::rw-', 'other::r--')."""
    out = []
    for text in entries:
        kind, qual, perms = text.split(":")
        tag, ident = (_TAGS[kind + ":"], int(qual)) if qual else (_TAGS[kind + "::"], 0xFFFFFFFF)
        perm = sum(bit for bit, ch in zip((4, 2, 1), perms, strict=True) if ch != "-")
        out.append((tag, ident, perm))
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, i, p in sorted(out))


def data_ranges(path: str) -> list[tuple[int, int]]:
    """Return the data (non-hole) ranges of file ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size, off, out = os.fstat(fd).st_size, 0, []
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            off = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, off))
        return out
    finally:
        os.close(fd)


def meta(root: str) -> dict[str, dict]:
    """Return {rel: metadata cp -a keeps} for everything under ``root`` (root itself excluded)."""
    out = {}
    for d, dirs, files in os.walk(root):
        if ".iosea-mover" in dirs:
            dirs.remove(".iosea-mover")  # the record a copy leaves (test_mover_rerun.py)
        for name in dirs + files:
            p = os.path.join(d, name)
            st = os.lstat(p)
            m = {
                "mode": stat.S_IMODE(st.st_mode),
                "type": stat.S_IFMT(st.st_mode),
                "owner": (st.st_uid, st.st_gid),
                "mtime": st.st_mtime_ns,
                "xattrs": {
                    n: os.getxattr(p, n, follow_symlinks=False)
                    for n in os.listxattr(p, follow_symlinks=False)
                },
            }
            if stat.S_ISLNK(st.st_mode):
                m["link"] = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    m["xxh3"] = xxhash.xxh3_128_hexdigest(f.read())
            out[os.path.relpath(p, root)] = m
    return out


def build_source(src: str) -> None:
    """A tree with what finding 10 saw lost: special modes, owners, attributes, ACLs, times, links."""
    write(os.path.join(src, "top.txt"), b"top", mode=0o640, mtime=1_500_000_000)
    write(os.path.join(src, "sub/suid-bin"), b"#!/bin/sh\n", mode=0o755)
    os.chown(os.path.join(src, "sub/suid-bin"), 1234, 2345)
    os.chmod(os.path.join(src, "sub/suid-bin"), 0o6755)  # setuid+setgid, not owned by root
    write(os.path.join(src, "sub/attrs"), b"x" * 100_000)  # a large one: the kernel-copy path
    os.setxattr(os.path.join(src, "sub/attrs"), "user.project", b"iosea")
    os.setxattr(os.path.join(src, "sub/attrs"), "trusted.tier", b"flash")
    os.setxattr(os.path.join(src, "sub/attrs"), "security.iosea", b"label")
    write(os.path.join(src, "sub/shared"), b"acl")
    os.setxattr(
        os.path.join(src, "sub/shared"),
        ACCESS,
        acl("user::rw-", "user:1234:rw-", "group::r--", "mask::rw-", "other::r--"),
    )
    os.makedirs(os.path.join(src, "sub/team"))
    os.setxattr(
        os.path.join(src, "sub/team"),
        DEFAULT,
        acl("user::rwx", "user:1234:rwx", "group::r-x", "mask::rwx", "other::r-x"),
    )
    write(os.path.join(src, "sub/team/plan"), b"plan", mode=0o600)
    os.chown(os.path.join(src, "sub/team"), 1234, 2345)
    os.chmod(os.path.join(src, "sub/team"), 0o2770)
    os.symlink(os.path.join(src, "top.txt"), os.path.join(src, "sub/abs-link"))  # inside, absolute
    os.symlink("../top.txt", os.path.join(src, "sub/rel-link"))
    os.chown(os.path.join(src, "sub/rel-link"), 1234, 2345, follow_symlinks=False)
    os.utime(os.path.join(src, "sub/rel-link"), ns=(1, 1_400_000_000 * 10**9), follow_symlinks=False)
    for d, t in (("sub/team", 1_300_000_000), ("sub", 1_200_000_000)):
        os.utime(os.path.join(src, d), (t, t))


def setgid_acl_target(dst: str) -> None:
    """A target directory that gives new files its group (setgid 3456) and a default ACL."""
    os.makedirs(dst)
    os.chown(dst, 0, 3456)
    os.chmod(dst, 0o2775)
    os.setxattr(dst, DEFAULT, acl("user::rwx", "user:4321:rwx", "group::rwx", "mask::rwx", "other::rwx"))


@pytest.mark.parametrize("operation", ["copy", "move"])
def test_the_tree_and_its_metadata_arrive_as_cp_a_makes_them(tmp_path, operation):
    """Modes (setuid/setgid of a non-root file, under a default ACL and a setgid directory),
    owners of files, directories and symlinks, times (directory mtimes on move too), symlink
    texts, xattrs and ACLs: the mover's copy has the source's, as ``cp -a``'s has."""
    src, dst, ref = str(tmp_path / "src"), str(tmp_path / "dst"), str(tmp_path / "ref")
    build_source(src)
    expected = meta(src)
    setgid_acl_target(ref)
    subprocess.run(["cp", "-a", f"{src}/.", ref], check=True)
    # What cp -a makes of the same tree in the same kind of target: the same, except that GNU cp
    # leaves a directory the setgid bit it inherited from a setgid parent; the mover gives the
    # exact mode of the source, as asked.
    by_cp = meta(ref)
    by_cp["sub"]["mode"] &= ~stat.S_ISGID
    assert by_cp == expected
    setgid_acl_target(dst)
    r = run_mover(operation, "--source", src, "--target", dst, "*")
    assert r.returncode == 0, r.stderr
    got = meta(dst)
    for rel in expected:
        assert got.get(rel) == expected[rel], rel
    assert got == expected
    assert "warning" not in r.stderr, r.stderr


def test_a_sparse_file_stays_sparse_and_copies_in_about_cp_a_time(tmp_path):
    """4 GiB apparent, 4 KiB allocated: copied as such, not inflated (main wrote 4 GiB in 26 s)."""
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    os.makedirs(src)
    path = os.path.join(src, "sparse.img")
    with open(path, "wb") as f:
        f.truncate(4 << 30)
        f.seek(1 << 30)
        f.write(os.urandom(4096))
    t0 = time.monotonic()
    r = run_mover("copy", "--source", src, "--target", dst, "*", timeout=20)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    out = os.path.join(dst, "sparse.img")
    assert os.stat(out).st_size == 4 << 30 and os.stat(out).st_blocks * 512 <= 64 << 10
    assert data_ranges(out) == data_ranges(path)
    with open(path, "rb") as a, open(out, "rb") as b:
        a.seek(1 << 30)
        b.seek(1 << 30)
        assert a.read(8192) == b.read(8192)
    assert took < 3, took  # cp -a: ~0.01 s; the mover's own start-up is most of this


def test_metadata_the_target_cannot_keep_is_reported_and_the_group_gains_nothing(tmp_path):
    """A target without extended attributes (ramfs): each attribute and ACL not kept is said on
    stderr and in the progress file, and a file whose ACL is lost does not give its owning group
    the ACL mask's rights (group::r-- masked rw- stays group r)."""
    src, dst, progress = str(tmp_path / "src"), str(tmp_path / "dst"), str(tmp_path / "p.json")
    write(os.path.join(src, "shared"), b"acl")
    os.setxattr(
        os.path.join(src, "shared"),
        ACCESS,
        acl("user::rw-", "user:1234:rw-", "group::r--", "mask::rw-", "other::---"),
    )
    write(os.path.join(src, "tagged"), b"t")
    os.setxattr(os.path.join(src, "tagged"), "user.project", b"iosea")
    os.makedirs(dst)
    mode_file = str(tmp_path / "mode")
    script = (
        'mount -t ramfs none "$1" || exit 99;'
        ' "$2" copy --source "$3" --target "$1" --progress "$4" "*"; rc=$?;'
        ' stat -c %a "$1/shared" > "$5"; exit $rc'
    )
    r = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script, "sh", dst, MOVER, src, progress, mode_file],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "shared: POSIX ACL system.posix_acl_access not kept: Operation not supported" in r.stderr
    assert "tagged: xattr user.project not kept: Operation not supported" in r.stderr
    doc = read_progress(progress)
    assert any("user.project not kept" in w for w in doc["warnings"]), doc
    assert any("posix_acl_access not kept" in w for w in doc["warnings"]), doc
    assert doc["state"] == "completed"
    with open(mode_file, encoding="ascii") as f:
        assert f.read().strip() == "640"  # the owning group's rights under the ACL, not the mask's


def test_moves_of_sparse_and_acl_files_to_tmpfs_killed_at_random_moments_lose_nothing(tmp_path, request):
    """The kill -9 trials of test_mover.py, on a target on tmpfs, with a sparse file, a hard link
    and files with ACLs and attributes in the tree: nothing lost, and the rerun's copies keep all
    of it, the hard link as one inode unless the kill split the pair."""
    pristine, src, mnt = str(tmp_path / "pristine"), str(tmp_path / "src"), str(tmp_path / "tmpfs")
    os.makedirs(mnt)
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", mnt], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here")
    request.addfinalizer(lambda: subprocess.run(["umount", mnt], check=False))
    make_sources(pristine)
    expected = meta(pristine)
    rng = random.Random(15)
    dst = os.path.join(mnt, "dst")
    subprocess.run(["cp", "-a", pristine, src], check=True)
    t0 = time.monotonic()
    assert run_mover("move", "--source", src, "--target", dst, "*").returncode == 0
    duration = time.monotonic() - t0
    killed_mid_run = kept_links = 0
    for trial in range(8):
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)
        subprocess.run(["cp", "-a", pristine, src], check=True)  # keeps the hard link a link
        proc = subprocess.Popen(
            [MOVER, "move", "--source", src, "--target", dst, "*"], stderr=subprocess.DEVNULL
        )
        time.sleep(rng.uniform(0.0, duration))
        proc.kill()
        killed_mid_run += proc.wait() == -9
        at_src, at_dst = meta(src), meta(dst) if os.path.isdir(dst) else {}
        for rel, m in expected.items():
            if m["type"] == stat.S_IFREG:
                here = [x[rel]["xxh3"] for x in (at_src, at_dst) if rel in x and "xxh3" in x[rel]]
                assert m["xxh3"] in here, f"trial {trial}: {rel} lost"
        r = run_mover("move", "--source", src, "--target", dst, "*")
        assert r.returncode == 0, r.stderr
        # Directories left out: the killed run's deletions changed the source's mtimes.
        got = {rel: m for rel, m in meta(dst).items() if m["type"] != stat.S_IFDIR}
        assert got == {rel: m for rel, m in expected.items() if m["type"] != stat.S_IFDIR}, f"trial {trial}"
        assert data_ranges(os.path.join(dst, "sparse.img")) == data_ranges(
            os.path.join(pristine, "sparse.img")
        )
        kept_links += os.stat(os.path.join(dst, "d0", "shared")).st_ino == os.stat(linked_name(dst)).st_ino
    assert killed_mid_run >= 3  # most kills must land while the mover runs
    assert kept_links >= 4  # a kill splits the pair only between the copy and the link


def linked_name(root: str) -> str:
    """The second name of the hard-linked file with an ACL in make_sources' tree."""
    return os.path.join(root, "d2", "shared-link")


def make_sources(root: str) -> None:
    """Small files, a sparse file of 64 MiB apparent, a file with an ACL and one with an xattr."""
    for i in range(60):
        write(os.path.join(root, f"d{i % 3}", f"f{i:03}"), os.urandom(i * 37), mtime=1_600_000_000 + i)
    with open(os.path.join(root, "sparse.img"), "wb") as f:
        f.truncate(64 << 20)
        f.seek(20 << 20)
        f.write(os.urandom(64 << 10))
    write(os.path.join(root, "d0", "shared"), os.urandom(2 << 20))
    os.setxattr(
        os.path.join(root, "d0", "shared"),
        ACCESS,
        acl("user::rw-", "user:1234:rw-", "group::r--", "mask::rw-", "other::r--"),
    )
    os.link(os.path.join(root, "d0", "shared"), linked_name(root))
    write(os.path.join(root, "d1", "tagged"), b"t" * 5000)
    os.setxattr(os.path.join(root, "d1", "tagged"), "user.project", b"iosea")
