"""A rerun of a completed copy is cheap, and still safe (issue 15, finding 13)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from iosea_wf.mover import engine
from tests.unit.mover_helpers import digests, leftovers, make_tree, run_mover, write

RECORD = os.path.join(".iosea-mover", "record.jsonl")


@pytest.fixture(autouse=True, params=["one process", "split scan"])
def scan(request, monkeypatch):
    """Each test with the target scanned by the mover alone, then shared with a forked child (as
    trees of 2,000 entries and more are)."""
    if request.param == "split scan":
        monkeypatch.setattr(engine, "_SCAN_SPLIT_MIN", 1)
    return request.param


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


# -- a move after a copy or a move never deletes what it did not copy (gap (c) of issue 15) --------
def _rewrite_all_keeping_mtimes(src: str, names) -> None:
    for name in names:
        _rewrite_keeping_mtime(os.path.join(src, name))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_a_move_after_a_copy_keeps_sources_rewritten_in_place_with_their_mtimes_put_back(tmp_path):
    """The copy's record says which bytes the target holds; the sources changed since (size and
    mtime put back, a new ctime): the move must not delete them (main hashed the target against
    the record, found it unchanged, and deleted the rewritten sources)."""
    src, dst = _tree(tmp_path)
    assert engine.transfer("copy", src, dst, ["*"]).state == "completed"
    _rewrite_all_keeping_mtimes(src, ["notes.txt", "data/big0.dat"])
    rewritten = {n: _read(os.path.join(src, n)) for n in ("notes.txt", "data/big0.dat")}
    res = engine.transfer("move", src, dst, ["*"])
    assert res.exit_code == 1
    assert sorted(e.split(":")[0] for e in res.errors) == ["data/big0.dat", "notes.txt"], res.errors
    assert all("a different file is already at the target" in e for e in res.errors)
    assert {n: _read(os.path.join(src, n)) for n in rewritten} == rewritten
    assert res.files_done == res.files_total - 2 and res.bytes_verified == 0  # the rest: the record


def test_a_move_again_after_a_completed_move_keeps_a_new_source_of_the_same_name_size_and_mtime(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    write(os.path.join(src, "f.dat"), b"first version!", mtime=1_600_000_000)
    assert engine.transfer("copy", src, dst, ["*"]).state == "completed"
    assert engine.transfer("move", src, dst, ["*"]).state == "completed"
    assert os.listdir(src) == []
    write(os.path.join(src, "f.dat"), b"second version", mtime=1_600_000_000)  # same size and mtime
    res = engine.transfer("move", src, dst, ["*"])
    assert res.exit_code == 1 and "a different file is already at the target" in res.errors[0]
    assert _read(os.path.join(src, "f.dat")) == b"second version"
    assert _read(os.path.join(dst, "f.dat")) == b"first version!"


# A mover killed (kill -9 of the whole mover) at the moment its first worker would delete
# sources: every copy is in place and journalled, no source deleted yet.
_KILLED_BEFORE_DELETING = [
    sys.executable,
    "-c",
    "import os, signal, sys; from iosea_wf.mover import engine, cli\n"
    "def die(self, todo):\n"
    "    os.kill(os.getppid(), signal.SIGKILL); os._exit(9)\n"
    "engine._Worker.delete_now = die; sys.exit(cli.main())",
]


def test_a_move_killed_before_deleting_then_a_source_rewritten_keeps_the_rewrite(tmp_path):
    src, dst = _tree(tmp_path)
    args = ["move", "--workers", "1", "--source", src, "--target", dst, "*"]
    killed = subprocess.run([*_KILLED_BEFORE_DELETING, *args], capture_output=True, text=True, timeout=60)
    assert killed.returncode == -9, killed.stderr
    expected = digests(src)
    assert os.path.exists(os.path.join(dst, ".iosea-mover", "journal.jsonl"))
    _rewrite_all_keeping_mtimes(src, ["notes.txt", "data/big0.dat"])
    rewritten = {n: _read(os.path.join(src, n)) for n in ("notes.txt", "data/big0.dat")}
    r = run_mover(*args[:1], *args[3:])
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("a different file is already at the target") == 2, r.stderr
    assert {n: _read(os.path.join(src, n)) for n in rewritten} == rewritten
    assert sorted(digests(src)) == sorted(rewritten)  # every other source moved
    assert {k: v for k, v in digests(dst).items() if k not in rewritten} == {
        k: v for k, v in expected.items() if k not in rewritten
    }


def test_the_rerun_of_a_move_killed_before_deleting_hashes_nothing_and_loses_nothing(tmp_path):
    src, dst = _tree(tmp_path)
    expected = digests(src)
    killed = subprocess.run(
        [*_KILLED_BEFORE_DELETING, "move", "--workers", "1", "--source", src, "--target", dst, "*"],
        capture_output=True,
        timeout=60,
    )
    assert killed.returncode == -9
    res = engine.transfer("move", src, dst, ["*"])
    assert res.state == "completed", res.errors
    assert (res.bytes_copied, res.bytes_verified) == (0, 0)  # the journal's lines, both sides unchanged
    assert digests(dst) == expected and os.listdir(src) == [] and leftovers(dst) == []


def test_a_scanning_child_that_fails_has_its_half_scanned_by_the_mover(tmp_path, monkeypatch, scan):
    if scan != "split scan":
        pytest.skip("the split scan only")
    src, dst = _tree(tmp_path)
    assert engine.transfer("copy", src, dst, ["*"]).state == "completed"
    _rewrite_keeping_mtime(os.path.join(src, "notes.txt"))
    monkeypatch.setattr(engine, "_scan_child", lambda *_args: os._exit(70))
    again = engine.transfer("copy", src, dst, ["*"])
    assert again.state == "failed" and again.files_done == again.files_total - 1, again.errors
    assert [e.split(":")[0] for e in again.errors] == ["notes.txt"] and again.bytes_verified == 0
