"""Paths cannot be redirected, in any phase (issue 15, finding 5 and "What must hold").

Every directory of the source and of the target is opened beneath its root without following a
symlink: in the planner, the copy, the journal and the delete, with openat2 and with the
O_NOFOLLOW-per-component fallback of kernels that lack it. Real files, real symlinks, the real
engine (its forked workers inherit the mode chosen here).
"""

from __future__ import annotations

import errno
import os

import pytest

from iosea_wf.mover import dirs, engine
from tests.unit.mover_helpers import digests, read_progress, write


@pytest.fixture(params=["openat2", "per-component"])
def resolution(request, monkeypatch):
    """Run the test with openat2, then with the per-component fallback (openat2 never called)."""
    if request.param == "openat2":
        if not dirs._have_openat2:
            pytest.skip("this kernel has no openat2")
    else:

        def no_openat2(*_args):
            raise AssertionError("openat2 used in the per-component mode")

        monkeypatch.setattr(dirs, "_have_openat2", False)
        monkeypatch.setattr(dirs, "_openat2", no_openat2)
    return request.param


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _swap_for_symlink(path: str, to: str) -> None:
    os.rename(path, path + ".orig")
    os.symlink(to, path)


def test_open_dir_follows_no_symlink_on_its_way(tmp_path, resolution):
    os.makedirs(tmp_path / "root/a/b")
    os.makedirs(tmp_path / "elsewhere/b")
    os.symlink(str(tmp_path / "elsewhere"), tmp_path / "root/link")
    os.symlink("a", tmp_path / "root/rel")
    root = os.open(tmp_path / "root", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = dirs.open_dir(root, "a/b")
        assert os.fstat(fd).st_ino == os.stat(tmp_path / "root/a/b").st_ino
        os.close(fd)
        for rel in ("link", "link/b", "rel/b", "rel"):
            with pytest.raises(OSError) as err:
                dirs.open_dir(root, rel)
            assert err.value.errno == errno.ELOOP and dirs.SYMLINK_IN_PATH in str(err.value), rel
        for rel in ("../root/a", "a/../a", "/tmp", "a//b"):
            with pytest.raises(OSError):
                dirs.open_dir(root, rel)
        with pytest.raises(OSError) as err:
            dirs.make_dirs(root, "link/new")
        assert err.value.errno == errno.ELOOP
        assert not os.path.exists(tmp_path / "elsewhere/new")
    finally:
        os.close(root)


class _SwapAfterListing:
    """os.scandir that swaps ``victim`` for a symlink to ``to`` once the source root is listed:
    the planner has seen ``victim`` as a directory and has not descended into it yet."""

    def __init__(self, real, root: str, victim: str, to: str):
        self.real, self.root_ino, self.victim, self.to = real, os.stat(root).st_ino, victim, to
        self.done = False

    def __call__(self, what="."):
        it = self.real(what)
        st = os.fstat(what) if isinstance(what, int) else os.stat(what)
        if self.done or st.st_ino != self.root_ino:
            return it
        outer = self

        class Listing:
            def __enter__(self):
                return it.__enter__()

            def __exit__(self, *exc):
                it.__exit__(*exc)
                if not outer.done:
                    outer.done = True
                    _swap_for_symlink(outer.victim, outer.to)

            def __iter__(self):
                return iter(it)

        return Listing()


@pytest.mark.parametrize("operation", ["copy", "move"])
def test_a_source_directory_swapped_for_a_symlink_while_planning_is_never_listed(
    tmp_path, monkeypatch, resolution, operation
):
    """The planner lists no directory through a symlink: before, it listed (and named in its
    errors) the files of the directory the symlink led to."""
    src, dst, outside = str(tmp_path / "src"), str(tmp_path / "dst"), str(tmp_path / "outside")
    write(os.path.join(src, "d", "planned.txt"), b"planned")
    write(os.path.join(src, "keep.txt"), b"k")
    write(os.path.join(outside, "root-only-name.txt"), b"ROOTONLY")
    monkeypatch.setattr(os, "scandir", _SwapAfterListing(os.scandir, src, os.path.join(src, "d"), outside))
    res = engine.transfer(operation, src, dst, ["*"], workers=1)
    assert res.exit_code == 1
    assert any(e.startswith("d: cannot list") and "symlink" in e for e in res.errors), res.errors
    assert not any("root-only-name" in text for text in res.errors + res.warnings), res.errors
    assert _read(os.path.join(outside, "root-only-name.txt")) == b"ROOTONLY"
    assert not os.path.exists(os.path.join(dst, "d", "root-only-name.txt"))
    assert _read(os.path.join(src, "d.orig", "planned.txt")) == b"planned"
    assert _read(os.path.join(dst, "keep.txt")) == b"k"
    assert res.files_done + res.files_failed + res.files_left == res.files_total


def test_a_source_directory_swapped_after_planning_is_never_followed(tmp_path, resolution):
    """The copy phase (finding 5): the files of the swapped directory fail, none is taken from
    where the symlink leads."""
    src, dst, outside = str(tmp_path / "src"), str(tmp_path / "dst"), str(tmp_path / "outside")
    write(os.path.join(src, "d", "secret.txt"), b"planned", mtime=1_600_000_000)
    write(os.path.join(outside, "secret.txt"), b"ROOTONL", mtime=1_600_000_000)
    swapped = []

    def swap(_snap, _reporter):
        if not swapped:
            _swap_for_symlink(os.path.join(src, "d"), outside)
            swapped.append(True)

    res = engine.transfer("move", src, dst, ["d"], workers=1, on_progress=swap)
    assert swapped and res.exit_code == 1
    assert any("d/secret.txt" in e and "symlink" in e for e in res.errors), res.errors
    assert _read(os.path.join(outside, "secret.txt")) == b"ROOTONL"
    assert not os.path.exists(os.path.join(dst, "d", "secret.txt"))


def test_a_source_directory_swapped_before_its_deletions_loses_nothing(tmp_path, monkeypatch, resolution):
    """The delete phase: the directory is swapped after its files were copied, for a symlink to
    a directory holding files of the same names: neither these nor the originals are deleted."""
    src, dst, outside = str(tmp_path / "src"), str(tmp_path / "dst"), str(tmp_path / "outside")
    for name in ("a", "b"):
        write(os.path.join(src, "d", name), name.encode() * 10)
        write(os.path.join(outside, name), b"outside " + name.encode())
    real = engine._Worker.delete_now

    def swap_then_delete(self, todo):
        if not os.path.islink(os.path.join(src, "d")):
            _swap_for_symlink(os.path.join(src, "d"), outside)
        real(self, todo)

    monkeypatch.setattr(engine._Worker, "delete_now", swap_then_delete)
    res = engine.transfer("move", src, dst, ["d"], workers=1)
    assert res.exit_code == 1
    assert sorted(e.split(":")[0] for e in res.errors) == ["d/a", "d/b"], res.errors
    assert all("symlink" in e for e in res.errors)
    assert [_read(os.path.join(outside, n)) for n in ("a", "b")] == [b"outside a", b"outside b"]
    assert _read(os.path.join(src, "d.orig", "a")) == b"a" * 10  # kept, and copied
    assert _read(os.path.join(dst, "d", "a")) == b"a" * 10
    assert res.files_done + res.files_failed + res.files_left == res.files_total


@pytest.mark.parametrize("operation", ["copy", "move"])
def test_a_journal_directory_that_is_a_symlink_is_refused_and_what_it_leads_to_untouched(
    tmp_path, resolution, operation
):
    """TARGET/.iosea-mover a symlink to another directory: the run fails with its reason; the
    files there are left as they are (before, the mover wrote its journal there and replaced a
    file named record.jsonl with it)."""
    src, dst, elsewhere = str(tmp_path / "src"), str(tmp_path / "dst"), str(tmp_path / "elsewhere")
    write(os.path.join(src, "f"), b"f")
    for name in ("journal.jsonl", "record.jsonl", "run-0123456789abcdef"):
        write(os.path.join(elsewhere, name), b"a user's own " + name.encode())
    before = digests(elsewhere)
    os.makedirs(dst)
    os.symlink(elsewhere, os.path.join(dst, ".iosea-mover"))
    res = engine.transfer(operation, src, dst, ["*"], progress_path=str(tmp_path / "p.json"))
    assert res.exit_code == 1 and res.state == "failed"
    assert any("cannot prepare target" in e and ".iosea-mover" in e and "symlink" in e for e in res.errors)
    assert res.errors == read_progress(str(tmp_path / "p.json"))["errors"]
    assert digests(elsewhere) == before
    assert _read(os.path.join(src, "f")) == b"f"


def test_a_target_root_swapped_for_the_source_after_its_path_was_judged_is_refused(tmp_path, monkeypatch):
    """The roots are judged again by the descriptors the run works through: a target swapped
    for a symlink to the source right after the check of its path is refused, nothing deleted."""
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    write(os.path.join(src, "f"), b"f")
    os.makedirs(dst)
    real = dirs.overlap

    def judged_then_swapped(source, target):
        why = real(source, target)
        os.rmdir(dst)
        os.symlink(src, dst)
        return why

    monkeypatch.setattr(dirs, "overlap", judged_then_swapped)
    with pytest.raises(engine.MoverUsageError, match="same directory"):
        engine.transfer("move", src, dst, ["*"])
    assert _read(os.path.join(src, "f")) == b"f" and sorted(os.listdir(src)) == ["f"]
