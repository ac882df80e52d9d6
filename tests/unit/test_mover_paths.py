"""The mover never loses data through paths or other processes (issue 15, findings 1-3 and 5-9).

Real files, real bind mounts (made in tmp_path, always unmounted), the real engine and console script.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time

import pytest

from iosea_wf.mover import engine
from iosea_wf.mover.errors import MoverUsageError
from tests.unit.mover_helpers import MOVER, digests, leftovers, make_tree, run_mover, write


@pytest.fixture
def bind(tmp_path):
    """bind(what, where): bind-mount ``what`` at ``where`` (made if missing); unmounted at the end."""
    made: list[str] = []

    def mount(what: str, where: str) -> None:
        if os.path.isdir(what):
            os.makedirs(where, exist_ok=True)
        elif not os.path.exists(where):
            write(where, b"")
        r = subprocess.run(["mount", "--bind", what, where], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot bind-mount here: {r.stderr.strip()}")
        made.append(where)

    yield mount
    for where in reversed(made):
        subprocess.run(["umount", "-l", where], check=False)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- finding 1: the target contains the source, or the source the target ------------------------
@pytest.mark.parametrize("operation", ["copy", "move"])
@pytest.mark.parametrize("how", ["plain path", "through a bind mount"])
def test_a_target_above_the_source_is_refused_before_anything(tmp_path, bind, operation, how):
    top = str(tmp_path / "T")
    write(os.path.join(top, "sub/x"), b"the source's own x")
    write(os.path.join(top, "sub/sub/x"), b"a deeper x, one level down")
    write(os.path.join(top, "sub/a"), b"a")
    before = digests(top)
    source = os.path.join(top, "sub")
    if how != "plain path":
        alias = str(tmp_path / "alias")
        bind(source, alias)  # the same source directory, mounted elsewhere: no path says it is in T
        source = alias
    r = run_mover(operation, "--source", source, "--target", top, "**")
    assert r.returncode == 2, r.stderr
    assert "--source is inside --target" in r.stderr and "nothing was done" in r.stderr
    assert digests(top) == before


def test_a_target_inside_the_source_is_refused(tmp_path, bind):
    src = str(tmp_path / "src")
    write(os.path.join(src, "a"), b"a")
    with pytest.raises(MoverUsageError, match="--target is inside --source"):
        engine.transfer("move", src, os.path.join(src, "out/deeper"), ["*"])
    alias = str(tmp_path / "alias")
    bind(src, alias)
    with pytest.raises(MoverUsageError, match="--target is inside --source"):
        engine.transfer("move", src, os.path.join(alias, "out"), ["*"])
    assert os.listdir(src) == ["a"]


# -- finding 2: the same directory (or file) through another path --------------------------------
def test_the_source_through_another_mount_is_refused_and_nothing_deleted(tmp_path, bind):
    src = str(tmp_path / "src")
    make_tree(src, n_small=20)
    before = digests(src)
    alias = str(tmp_path / "alias")
    bind(src, alias)
    r = run_mover("move", "--source", src, "--target", alias, "*")
    assert r.returncode == 2, r.stderr
    assert "same directory" in r.stderr
    assert digests(src) == before


def test_a_target_directory_or_file_that_is_the_source_by_another_path_is_never_deleted(tmp_path, bind):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    write(os.path.join(src, "d/f"), b"in d")
    write(os.path.join(src, "g"), b"top file g")
    write(os.path.join(src, "h"), b"top file h")
    before = digests(src)
    # One source file mounted over its own target: hashing it against itself finds a match.
    bind(os.path.join(src, "g"), os.path.join(dst, "g"))
    res = engine.transfer("move", src, dst, ["g", "h"])
    assert res.exit_code == 1
    assert any("g: its target is the source file itself" in e for e in res.errors), res.errors
    assert digests(src) == {k: v for k, v in before.items() if k != "h"}  # h moved, g kept
    # A source directory mounted at its target directory: refused before anything.
    bind(os.path.join(src, "d"), os.path.join(dst, "d"))
    with pytest.raises(MoverUsageError, match="is a directory of the source"):
        engine.transfer("move", src, dst, ["d"])
    assert digests(os.path.join(src, "d")) == {"f": before["d/f"]}


# -- finding 3: a target directory that is a symlink back into the source ------------------------
def test_a_target_directory_that_is_a_symlink_into_the_source_is_not_followed(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    make_tree(src, n_small=30)
    before = digests(src)
    os.makedirs(dst)
    os.symlink(os.path.join(src, "data"), os.path.join(dst, "data"))
    res = engine.transfer("move", src, dst, ["*"])
    assert res.exit_code == 1
    assert any("data" in e and "symlink" in e for e in res.errors), res.errors
    assert {k: v for k, v in digests(src).items() if k.startswith("data/")} == {
        k: v for k, v in before.items() if k.startswith("data/")
    }
    assert os.path.islink(os.path.join(dst, "data"))


# -- finding 5: a source directory swapped for a symlink after planning -------------------------
def test_a_source_directory_swapped_for_a_symlink_after_planning_is_never_followed(tmp_path):
    src, dst, outside = str(tmp_path / "src"), str(tmp_path / "dst"), str(tmp_path / "outside")
    write(os.path.join(src, "d/secret.txt"), b"planned", mtime=1_600_000_000)
    write(os.path.join(src, "keep.txt"), b"k")
    write(os.path.join(outside, "secret.txt"), b"ROOTONL", mtime=1_600_000_000)  # same size, mtime
    swapped = []

    def swap(_snap, _reporter):  # the first progress tick: planned and scanned, no copy yet
        if not swapped:
            os.rename(os.path.join(src, "d"), os.path.join(src, "d.orig"))
            os.symlink(outside, os.path.join(src, "d"))
            swapped.append(True)

    res = engine.transfer("move", src, dst, ["d", "keep.txt"], workers=1, on_progress=swap)
    assert swapped and res.exit_code == 1
    assert any("d/secret.txt" in e and "symlink" in e for e in res.errors), res.errors
    assert _read(os.path.join(outside, "secret.txt")) == b"ROOTONL"
    assert not os.path.exists(os.path.join(dst, "d/secret.txt"))
    assert _read(os.path.join(dst, "keep.txt")) == b"k"


# -- finding 6: a source changed between its copy and its deletion ------------------------------
def _changing_before_delete(monkeypatch, change) -> None:
    """Have every worker apply ``change(d, name)`` to each source just before it deletes them."""
    real = engine._Worker.delete_now

    def delete_now(self, todo):
        for item in todo:
            change(item[0], item[1])
        real(self, todo)

    monkeypatch.setattr(engine._Worker, "delete_now", delete_now)


def test_directory_metadata_never_goes_through_a_target_directory_swapped_for_a_symlink(
    tmp_path, monkeypatch
):
    """A target directory swapped for a symlink before the directories get their metadata: the
    directory it points to keeps its own mode and mtime (mover15meta chmod-ed it by path)."""
    src, dst, outside = str(tmp_path / "src"), str(tmp_path / "dst"), str(tmp_path / "outside")
    write(os.path.join(src, "d", "f"), b"data")
    os.chmod(os.path.join(src, "d"), 0o700)
    os.utime(os.path.join(src, "d"), ns=(1_500_000_000 * 10**9,) * 2)
    os.makedirs(outside)
    os.chmod(outside, 0o755)
    before = os.stat(outside)
    real_finish_dirs = engine._Transfer.finish_dirs

    def swap_then_finish(self):
        os.rename(os.path.join(dst, "d"), os.path.join(dst, "d.moved"))
        os.symlink(outside, os.path.join(dst, "d"))
        real_finish_dirs(self)

    monkeypatch.setattr(engine._Transfer, "finish_dirs", swap_then_finish)
    res = engine.transfer("copy", src, dst, ["*"], workers=1)
    assert res.state == "completed", res.errors
    after = os.stat(outside)
    assert (stat.S_IMODE(after.st_mode), after.st_mtime_ns) == (0o755, before.st_mtime_ns)
    assert os.listdir(outside) == []


def test_a_source_rewritten_in_place_with_its_mtime_restored_after_its_copy_is_kept(tmp_path, monkeypatch):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    write(os.path.join(src, "big.dat"), os.urandom(3 << 20), mtime=1_600_000_000)
    write(os.path.join(src, "small.txt"), b"old text", mtime=1_600_000_000)

    def rewrite(d, name):
        path = os.path.join(src, d, name)
        st = os.stat(path)
        with open(path, "r+b") as f:
            f.write(b"NEW!")  # same size
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    _changing_before_delete(monkeypatch, rewrite)
    res = engine.transfer("move", src, dst, ["*"], workers=1)
    assert res.exit_code == 1
    assert sorted(e.split(":")[0] for e in res.errors) == ["big.dat", "small.txt"], res.errors
    assert all("changed after being copied" in e for e in res.errors)
    assert _read(os.path.join(src, "small.txt")) == b"NEW!text"  # the rewrite is kept
    assert _read(os.path.join(src, "big.dat"))[:4] == b"NEW!"
    assert (res.files_done, res.files_failed) == (0, 2)


def test_a_symlink_re_pointed_after_its_copy_is_kept(tmp_path, monkeypatch):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    write(os.path.join(src, "a"), b"a")
    write(os.path.join(src, "b"), b"b")
    os.symlink("a", os.path.join(src, "link"))
    os.utime(os.path.join(src, "link"), ns=(1, 1_600_000_000 * 10**9), follow_symlinks=False)

    def re_point(d, name):
        if name == "link":
            path = os.path.join(src, d, name)
            os.symlink("b", path + ".new")
            os.utime(path + ".new", ns=(1, 1_600_000_000 * 10**9), follow_symlinks=False)
            os.rename(path + ".new", path)

    _changing_before_delete(monkeypatch, re_point)
    res = engine.transfer("move", src, dst, ["link"], workers=1)
    assert res.exit_code == 1 and "changed after being copied" in res.errors[0]
    assert os.readlink(os.path.join(src, "link")) == "b"  # the new link is kept


# -- finding 7: empty directories -----------------------------------------------------------------
@pytest.mark.parametrize("operation", ["copy", "move"])
def test_empty_directories_arrive_and_a_move_does_not_lose_them(tmp_path, operation):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    write(os.path.join(src, "full/f"), b"f")
    os.makedirs(os.path.join(src, "full/empty/deeper"))
    os.makedirs(os.path.join(src, "alone"))
    os.chmod(os.path.join(src, "alone"), 0o750)
    res = engine.transfer(operation, src, dst, ["*"])
    assert res.exit_code == 0, res.errors
    assert os.path.isdir(os.path.join(dst, "full/empty/deeper"))
    assert os.stat(os.path.join(dst, "alone")).st_mode & 0o777 == 0o750
    assert sorted(os.listdir(src)) == ([] if operation == "move" else ["alone", "full"])


# -- findings 8 and 9: only this mover's temporaries ----------------------------------------------
def test_a_users_file_named_like_a_temporary_is_never_deleted(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    write(os.path.join(src, "X"), b"x")
    mine = [os.path.join(dst, n) for n in (".X.iosea-tmp-1a2b", ".X.iosea-tmp-0123456789abcdef-01")]
    for path in mine:
        write(path, b"the user's own file")
    res = engine.transfer("copy", src, dst, ["*"])
    assert res.exit_code == 0, res.errors
    assert all(_read(p) == b"the user's own file" for p in mine)


def test_a_mover_into_a_directory_below_another_movers_target_leaves_its_temporary(tmp_path):
    src_a, src_b, top = str(tmp_path / "src_a"), str(tmp_path / "src_b"), str(tmp_path / "T")
    block = os.urandom(1 << 20)
    write(os.path.join(src_a, "sub/big.dat"), block * 64)
    make_tree(src_b, n_small=20)
    os.makedirs(os.path.join(top, "sub"))
    first = subprocess.Popen(
        [MOVER, "copy", "--workers", "1", "--source", src_a, "--target", top, "*"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not [n for n in os.listdir(os.path.join(top, "sub")) if ".iosea-tmp-" in n]:
            assert time.monotonic() < deadline and first.poll() is None, first.communicate()
            time.sleep(0.001)
        os.killpg(first.pid, signal.SIGSTOP)  # the first mover, in flight, holds its temporary
        r = run_mover("copy", "--source", src_b, "--target", os.path.join(top, "sub"), "*")
        assert r.returncode == 0, r.stderr
        assert [n for n in os.listdir(os.path.join(top, "sub")) if ".iosea-tmp-" in n]
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err  # before: its temporary was removed under it
    assert digests(os.path.join(top, "sub")) == {**digests(src_b), "big.dat": digests(src_a)["sub/big.dat"]}
    assert leftovers(top) == []


# -- hard links stay links --------------------------------------------------------------------------
@pytest.mark.parametrize("operation", ["copy", "move"])
def test_hard_links_arrive_as_links(tmp_path, operation):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    write(os.path.join(src, "a"), b"one inode, three names")
    write(os.path.join(src, "big"), os.urandom(3 << 20))
    os.makedirs(os.path.join(src, "d"))
    os.link(os.path.join(src, "a"), os.path.join(src, "d/b"))
    os.link(os.path.join(src, "a"), os.path.join(src, "c"))
    os.link(os.path.join(src, "big"), os.path.join(src, "d/big2"))
    write(os.path.join(src, "alone"), b"one name")
    before = digests(src)
    res = engine.transfer(operation, src, dst, ["*"])
    assert res.exit_code == 0, res.errors
    assert (res.files_done, res.files_total, res.bytes_done) == (6, 6, res.bytes_total)
    assert digests(dst) == before
    a, b, c = (os.stat(os.path.join(dst, n)) for n in ("a", "d/b", "c"))
    assert a.st_ino == b.st_ino == c.st_ino and a.st_nlink == 3
    assert os.stat(os.path.join(dst, "big")).st_ino == os.stat(os.path.join(dst, "d/big2")).st_ino
    assert os.stat(os.path.join(dst, "alone")).st_nlink == 1
    assert sorted(os.listdir(src)) == ([] if operation == "move" else ["a", "alone", "big", "c", "d"])
