"""The data mover never silently replaces a file at the target that it did not write (issue 12, 2b)."""

from __future__ import annotations

import os
import threading

import pytest

from iosea_wf.mover import engine, filecopy
from tests.unit.mover_helpers import leftovers, read_progress, run_mover, write

MB = 1 << 20


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("size", [5000, 3 * MB], ids=["small", "large"])
@pytest.mark.parametrize("operation", ["copy", "move"])
def test_a_different_file_at_the_target_is_refused_and_the_source_kept(tmp_path, operation, size):
    src, dst = tmp_path / "src", tmp_path / "dst"
    new, old = os.urandom(size), os.urandom(size)
    write(str(src / "gauges" / "g1.hdf5"), new, mtime=1_700_000_000)
    write(str(src / "gauges" / "g2.hdf5"), b"fresh", mtime=1_700_000_000)
    write(str(dst / "gauges" / "g1.hdf5"), old, mtime=1_600_000_000)  # an earlier session's copy
    prog = tmp_path / "progress.json"
    r = run_mover(operation, "--source", str(src), "--target", str(dst), "--progress", str(prog), "gauges")
    assert r.returncode == 1, r.stderr
    assert "gauges/g1.hdf5: a different file is already at the target" in r.stderr
    assert "--replace" in r.stderr
    assert _read(dst / "gauges" / "g1.hdf5") == old  # untouched
    assert _read(src / "gauges" / "g1.hdf5") == new  # kept
    assert _read(dst / "gauges" / "g2.hdf5") == b"fresh"  # the others transferred
    assert (src / "gauges" / "g2.hdf5").exists() == (operation == "copy")
    doc = read_progress(str(prog))
    assert doc["state"] == "failed" and doc["files_failed"] == 1
    assert any(e.startswith("gauges/g1.hdf5: a different file") for e in doc["errors"])
    assert leftovers(str(dst)) == []


def test_other_sizes_and_kinds_in_the_way_are_refused_before_copying(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write(str(src / "a.bin"), b"a" * 10, mtime=1_700_000_000)
    write(str(src / "b.bin"), b"b" * 10, mtime=1_700_000_000)
    os.symlink("a.bin", src / "link")
    write(str(dst / "a.bin"), b"shorter", mtime=1_700_000_000)
    os.makedirs(dst / "b.bin")
    os.symlink("elsewhere", dst / "link")
    res = engine.transfer("move", str(src), str(dst), ["*"])
    assert res.exit_code == 1 and res.state == "failed"
    assert sorted(e.split(":")[0] for e in res.errors) == ["a.bin", "b.bin", "link"]
    assert all("already at the target" in e for e in res.errors)
    assert sorted(os.listdir(src)) == ["a.bin", "b.bin", "link"]
    assert _read(dst / "a.bin") == b"shorter" and os.readlink(dst / "link") == "elsewhere"


@pytest.mark.parametrize("operation", ["copy", "move"])
def test_an_identical_file_at_the_target_is_fine(tmp_path, operation):
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = os.urandom(3 * MB)
    write(str(src / "g1.hdf5"), data, mtime=1_700_000_000)
    write(str(src / "g2.hdf5"), b"same bytes", mtime=1_700_000_000)
    write(str(dst / "g1.hdf5"), data, mtime=1_700_000_000)  # a rerun after an interrupted run
    write(str(dst / "g2.hdf5"), b"same bytes", mtime=1_650_000_000)  # same bytes, another mtime
    res = engine.transfer(operation, str(src), str(dst), ["*"])
    assert res.exit_code == 0, res.errors
    assert res.files_done == 2 and res.bytes_copied == 0
    assert _read(dst / "g1.hdf5") == data and _read(dst / "g2.hdf5") == b"same bytes"
    assert sorted(os.listdir(src)) == ([] if operation == "move" else ["g1.hdf5", "g2.hdf5"])


def test_replace_overwrites_what_is_in_the_way(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write(str(src / "g1.hdf5"), b"new" * 1000, mtime=1_700_000_000)
    write(str(src / "g2.hdf5"), b"n2" * 100, mtime=1_700_000_000)
    os.symlink("g1.hdf5", src / "link")
    write(str(dst / "g1.hdf5"), b"old" * 1000, mtime=1_700_000_000)  # same size and mtime
    write(str(dst / "g2.hdf5"), b"old", mtime=1_600_000_000)
    os.symlink("elsewhere", dst / "link")
    r = run_mover("move", "--replace", "--source", str(src), "--target", str(dst), "*")
    assert r.returncode == 0, r.stderr
    assert _read(dst / "g1.hdf5") == b"new" * 1000 and _read(dst / "g2.hdf5") == b"n2" * 100
    assert os.readlink(dst / "link") == "g1.hdf5"
    assert os.listdir(src) == []


def test_replace_is_documented_in_help():
    r = run_mover("--help")
    assert r.returncode == 0 and "--replace" in r.stdout and "never replaced silently" in r.stdout


def test_a_file_appearing_at_the_target_during_the_copy_is_not_replaced(tmp_path):
    """The rename is RENAME_NOREPLACE: another writer's file that lands mid-copy stays."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    os.makedirs(dst)
    write(str(src / "g1.hdf5"), b"x" * 100, mtime=1_700_000_000)
    sdir = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    tdir = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
    try:
        st = os.stat(src / "g1.hdf5")

        def intruder(_fd, _offset, _length):
            write(str(dst / "g1.hdf5"), b"theirs", mtime=1)

        with pytest.raises(filecopy.CopyFailed, match="appeared at the target"):
            filecopy.copy_file(
                sdir,
                tdir,
                "g1.hdf5",
                ".g1.hdf5.iosea-tmp-test",
                (st.st_size, st.st_mtime_ns, st.st_mode),
                filecopy.new_buffer(),
                lambda n: None,
                threading.Event().is_set,
                written=intruder,
                noreplace=True,
            )
    finally:
        os.close(sdir)
        os.close(tdir)
    assert _read(dst / "g1.hdf5") == b"theirs"
    assert os.listdir(dst) == ["g1.hdf5"]
