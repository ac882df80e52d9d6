"""Tests of the mover's file-copy primitives (aligned buffer, sizes at chunk edges, changing sources)
and of the end-of-run parallel deletion of a move."""

from __future__ import annotations

import ctypes
import os

import pytest
import xxhash

from iosea_wf.mover import engine, filecopy
from tests.unit.mover_helpers import digests, leftovers, write

BUF = filecopy.BUF_SIZE


def _copy(tmp_path, data: bytes, planned_size: int | None = None, on_bytes=None):
    """Copy src/f to dst/f with copy_file; return (stat, digest) or raise what copy_file raised."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    write(str(src / "f"), data, mode=0o640, mtime=1_600_000_000)
    dst.mkdir()
    st = os.stat(src / "f")
    sdir = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    tdir = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
    size = st.st_size if planned_size is None else planned_size
    try:
        return filecopy.copy_file(
            sdir,
            tdir,
            "f",
            filecopy.temp_name("f", "abc"),
            (size, st.st_mtime_ns, 0o640),
            filecopy.new_buffer(),
            on_bytes or (lambda n: None),
            lambda: False,
        )
    finally:
        os.close(sdir)
        os.close(tdir)


def test_new_buffer_is_page_aligned():
    buf = filecopy.new_buffer()
    assert len(buf) == BUF
    assert ctypes.addressof(ctypes.c_char.from_buffer(buf)) % 4096 == 0


@pytest.mark.parametrize("size", [0, 1, 4095, BUF - 1, BUF, BUF + 1, 2 * BUF, 3 * BUF - 7])
def test_copy_file_sizes_at_chunk_edges(tmp_path, size):
    data = os.urandom(size)
    st, digest = _copy(tmp_path, data)
    out = tmp_path / "dst" / "f"
    assert out.read_bytes() == data
    assert digest == xxhash.xxh3_128_digest(data) and st.st_size == size
    ost = os.stat(out)
    assert ost.st_mode & 0o777 == 0o640 and ost.st_mtime_ns == 1_600_000_000 * 10**9
    assert os.listdir(tmp_path / "dst") == ["f"]  # no temp file left


@pytest.mark.parametrize("size", [100, 3 * BUF + 5])
@pytest.mark.parametrize("delta", [-1, 1])
def test_source_of_another_size_than_planned_is_refused(tmp_path, size, delta):
    """The plan says one size, the file has another (it grew or shrank after planning)."""
    with pytest.raises(filecopy.CopyFailed, match="changed since"):
        _copy(tmp_path, os.urandom(size), planned_size=size + delta)
    assert os.listdir(tmp_path / "dst") == []


@pytest.mark.parametrize("change", ["grow", "shrink"])
def test_source_changing_while_streamed_is_refused(tmp_path, change):
    """A large source that grows or shrinks between two chunks is detected; nothing lands."""
    path = tmp_path / "src" / "f"
    calls = []

    def on_bytes(n):
        calls.append(n)
        if len(calls) == 1:  # after the first chunk
            if change == "grow":
                with open(path, "ab") as f:
                    f.write(b"x" * 10)
            else:
                os.truncate(path, BUF + 10)

    with pytest.raises(filecopy.CopyFailed, match="changed since"):
        _copy(tmp_path, os.urandom(4 * BUF), on_bytes=on_bytes)
    assert os.listdir(tmp_path / "dst") == []


def test_move_deletes_many_sources_with_parallel_unlinks(tmp_path):
    """More sources than one unlink thread takes: every one is deleted, every copy is intact."""
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    n = engine._UNLINK_THREADS * engine._UNLINK_MIN + 17
    for i in range(n):
        write(os.path.join(src, f"d{i % 7}", f"f{i:05}"), f"{i}".encode() * (i % 50))
    expected = digests(src)
    result = engine.transfer("move", src, dst, ["*"], workers=1)
    assert result.exit_code == 0, result.errors
    assert digests(dst) == expected and leftovers(dst) == []
    assert not os.path.exists(src) or all(not files for _d, _s, files in os.walk(src))
