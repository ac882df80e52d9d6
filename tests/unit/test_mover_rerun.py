"""A rerun of a completed copy is cheap, and still safe (issue 15, finding 13)."""

from __future__ import annotations

import json
import os

from iosea_wf.mover import engine
from tests.unit.mover_helpers import digests, leftovers, make_tree, run_mover, write

RECORD = os.path.join(".iosea-mover", "record.jsonl")


def _tree(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    make_tree(src, n_small=400, big_sizes=(3 << 20,))
    write(os.path.join(src, "notes.txt"), b"n" * 1000, mtime=1_600_000_000)
    return src, dst


def test_a_rerun_of_a_completed_copy_hashes_nothing_and_verify_hashes_everything(tmp_path):
    src, dst = _tree(tmp_path)
    first = engine.transfer("copy", src, dst, ["*"])
    assert first.state == "completed" and first.bytes_copied == first.bytes_total
    assert os.path.exists(os.path.join(dst, RECORD)) and leftovers(dst) == []
    again = engine.transfer("copy", src, dst, ["*"])
    assert again.state == "completed" and again.files_done == again.files_total == first.files_total
    assert (again.bytes_copied, again.bytes_verified) == (0, 0)  # main hashed both sides of every file
    checked = engine.transfer("copy", src, dst, ["*"], verify=True)
    assert checked.state == "completed" and checked.bytes_verified == checked.bytes_total
    assert digests(dst) == digests(src)


def _rewrite_keeping_mtime(path: str) -> None:
    st = os.stat(path)
    with open(path, "r+b") as f:
        data = f.read()
        f.seek(0)
        f.write(bytes(b ^ 0xFF for b in data[:16]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_the_quick_check_sees_either_side_changed_in_place_with_its_mtime_put_back(tmp_path):
    """Size and mtime kept (rsync -a would skip both): the ctimes differ, so both are hashed."""
    src, dst = _tree(tmp_path)
    assert engine.transfer("copy", src, dst, ["*"]).state == "completed"
    _rewrite_keeping_mtime(os.path.join(src, "notes.txt"))
    _rewrite_keeping_mtime(os.path.join(dst, "data/big0.dat"))
    again = engine.transfer("copy", src, dst, ["*"])
    assert again.state == "failed"
    assert sorted(e.split(":")[0] for e in again.errors) == ["data/big0.dat", "notes.txt"]
    assert all("a different file is already at the target" in e for e in again.errors)
    fixed = engine.transfer("copy", src, dst, ["*"], replace=True)
    assert fixed.state == "completed" and digests(dst) == digests(src)


def test_a_record_of_another_boot_is_not_trusted_without_fsync(tmp_path):
    """A crash may have lost what the page cache held: a record made before it is hashed again."""
    src, dst = _tree(tmp_path)
    assert engine.transfer("copy", src, dst, ["*"]).state == "completed"
    path = os.path.join(dst, RECORD)
    with open(path, encoding="utf-8") as f:
        header, rest = f.readline(), f.read()
    old_boot = {**json.loads(header), "boot_id": "00000000-0000-0000-0000-000000000000"}
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(old_boot) + "\n" + rest)
    again = engine.transfer("copy", src, dst, ["*"])
    assert again.state == "completed" and again.bytes_verified == again.bytes_total
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({**old_boot, "fsync": True}) + "\n" + rest)
    assert engine.transfer("copy", src, dst, ["*"]).bytes_verified == 0


def test_the_cli_documents_and_takes_verify(tmp_path):
    src, dst = _tree(tmp_path)
    assert run_mover("copy", "--source", src, "--target", dst, "*").returncode == 0
    r = run_mover("copy", "--verify", "--source", src, "--target", dst, "*")
    assert r.returncode == 0, r.stderr
    assert "--verify" in run_mover("--help").stdout


def test_a_file_found_identical_at_the_target_gets_the_sources_metadata_then_reruns_are_quick(tmp_path):
    """Same bytes put there by another tool, with another mode, mtime, attribute and an ACL: the
    copy is not rewritten, its metadata becomes the source's (main left it as it was)."""
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    write(os.path.join(src, "f.dat"), b"d" * 200_000, mode=0o640, mtime=1_600_000_000)
    os.setxattr(os.path.join(src, "f.dat"), "user.project", b"iosea")
    write(os.path.join(dst, "f.dat"), b"d" * 200_000, mode=0o666, mtime=1_700_000_000)
    os.setxattr(os.path.join(dst, "f.dat"), "user.project", b"other")
    acl = bytes.fromhex(
        "0200000001000600000000000200060039300000040004000000000010000600000000002000040000000000"
    )
    os.setxattr(os.path.join(dst, "f.dat"), "system.posix_acl_access", acl)
    first = engine.transfer("copy", src, dst, ["*"])
    assert first.state == "completed", first.errors
    s, d = os.stat(os.path.join(src, "f.dat")), os.stat(os.path.join(dst, "f.dat"))
    assert (oct(d.st_mode), d.st_mtime_ns) == (oct(s.st_mode), s.st_mtime_ns)
    assert os.listxattr(os.path.join(dst, "f.dat")) == ["user.project"]
    assert os.getxattr(os.path.join(dst, "f.dat"), "user.project") == b"iosea"
    assert first.bytes_verified == 200_000  # hashed, not rewritten
    assert engine.transfer("copy", src, dst, ["*"]).bytes_verified == 0


def test_a_rerun_of_a_copy_with_hard_links_hashes_nothing(tmp_path):
    """The record's lines of a hard-linked file are taken once all its names are linked (each
    link sets the copy's ctime): the rerun's quick check then holds for every name."""
    src, dst = _tree(tmp_path)
    os.link(os.path.join(src, "notes.txt"), os.path.join(src, "data", "notes-link"))
    first = engine.transfer("copy", src, dst, ["*"])
    assert first.state == "completed"
    assert (
        os.stat(os.path.join(dst, "notes.txt")).st_ino
        == os.stat(os.path.join(dst, "data", "notes-link")).st_ino
    )
    again = engine.transfer("copy", src, dst, ["*"])
    assert again.state == "completed" and again.files_done == again.files_total == first.files_total
    assert (again.bytes_copied, again.bytes_verified) == (0, 0)
