"""Tests of the mover's file-copy primitives (aligned buffer, sizes at chunk edges, the kernel copy
and its fallbacks, changing sources) and of the end-of-run parallel deletion of a move."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import subprocess
import sys
import time

import pytest
import xxhash

from iosea_wf.mover import engine, filecopy
from tests.unit.mover_helpers import MOVER, digests, leftovers, write

BUF = filecopy.BUF_SIZE
CHUNK = filecopy.CHUNK


def _copy(tmp_path, data: bytes, planned_size: int | None = None, on_bytes=None, written=None):
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
            written=written,
        )
    finally:
        os.close(sdir)
        os.close(tdir)


def test_new_buffer_is_page_aligned():
    buf = filecopy.new_buffer()
    assert len(buf) == BUF
    assert ctypes.addressof(ctypes.c_char.from_buffer(buf)) % 4096 == 0


def _check_copied(tmp_path, data: bytes, st, digest) -> None:
    out = tmp_path / "dst" / "f"
    assert out.read_bytes() == data
    assert digest == xxhash.xxh3_128_digest(data) and st.st_size == len(data)
    assert os.listdir(tmp_path / "dst") == ["f"]  # no temp file left


KMIN = filecopy.KERNEL_COPY_MIN
SIZES = [
    0,
    1,
    4095,
    KMIN - 1,
    KMIN,
    BUF - 1,
    BUF,
    BUF + 1,
    3 * BUF - 7,
    CHUNK - 1,
    CHUNK,
    CHUNK + 1,
    2 * CHUNK + 4097,
]


@pytest.mark.parametrize("size", SIZES)
def test_copy_file_sizes_at_chunk_edges(tmp_path, size):
    data = os.urandom(size)
    ranges = []
    st, digest = _copy(tmp_path, data, written=lambda fd, off, n: ranges.append((off, n)))
    out = tmp_path / "dst" / "f"
    assert out.read_bytes() == data
    assert digest == xxhash.xxh3_128_digest(data) and st.st_size == size
    ost = os.stat(out)
    assert ost.st_mode & 0o777 == 0o640 and ost.st_mtime_ns == 1_600_000_000 * 10**9
    assert os.listdir(tmp_path / "dst") == ["f"]  # no temp file left
    # The write-back hook saw every byte of the temp file once, in order (a move relies on it).
    assert [off for off, _n in ranges] == [sum(n for _o, n in ranges[:i]) for i in range(len(ranges))]
    assert sum(n for _o, n in ranges) == size


def _counting(monkeypatch, name: str, fail_errno: int | None = None) -> list[int]:
    """Wrap ``os.<name>`` to count its calls, or make it fail with ``fail_errno``."""
    calls: list[int] = []
    real = getattr(os, name)

    def wrapper(*args):
        calls.append(1)
        if fail_errno is not None:
            raise OSError(fail_errno, os.strerror(fail_errno))
        return real(*args)

    monkeypatch.setattr(os, name, wrapper)
    return calls


def test_large_file_is_copied_by_the_kernel_in_chunks(tmp_path, monkeypatch):
    cfr = _counting(monkeypatch, "copy_file_range")
    readv = _counting(monkeypatch, "readv")
    data = os.urandom(2 * CHUNK + 5)
    _check_copied(tmp_path, data, *_copy(tmp_path, data))
    assert len(cfr) == 3 and readv == []  # 3 chunks, each in one call; no write from Python


@pytest.mark.parametrize("code", [errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL])
def test_sendfile_is_used_where_copy_file_range_cannot_copy(tmp_path, monkeypatch, code):
    _counting(monkeypatch, "copy_file_range", fail_errno=code)
    sent = _counting(monkeypatch, "sendfile")
    data = os.urandom(CHUNK + 3 * BUF)
    _check_copied(tmp_path, data, *_copy(tmp_path, data))
    assert len(sent) >= 2


def test_stream_through_the_buffer_where_no_kernel_copy_works(tmp_path, monkeypatch):
    _counting(monkeypatch, "copy_file_range", fail_errno=errno.EXDEV)
    _counting(monkeypatch, "sendfile", fail_errno=errno.EINVAL)
    data = os.urandom(CHUNK + 3 * BUF)
    _check_copied(tmp_path, data, *_copy(tmp_path, data))


def test_a_kernel_copy_error_that_is_not_unsupported_fails_the_file(tmp_path, monkeypatch):
    _counting(monkeypatch, "copy_file_range", fail_errno=errno.EIO)
    with pytest.raises(OSError) as info:
        _copy(tmp_path, os.urandom(2 * BUF))
    assert info.value.errno == errno.EIO and os.listdir(tmp_path / "dst") == []


def test_hash_by_reading_where_files_cannot_be_mapped(tmp_path, monkeypatch):
    real = mmap.mmap
    refused = []

    def no_file_maps(fd, *args, **kwargs):
        if fd >= 0:
            refused.append(fd)
            raise OSError(errno.ENODEV, "no mmap here")
        return real(fd, *args, **kwargs)  # the anonymous buffer

    monkeypatch.setattr(filecopy.mmap, "mmap", no_file_maps)
    data = os.urandom(CHUNK + 7)
    _check_copied(tmp_path, data, *_copy(tmp_path, data))
    assert len(refused) == 2  # 2 chunks, each hashed on the temp file (the source is never mapped)


def test_source_rewritten_in_place_during_the_copy_is_refused(tmp_path, monkeypatch):
    """Same size, same mtime afterwards: only the comparison of the two digests can see it.

    (Done in this process between the copy of a chunk and its hash.)
    """
    path = tmp_path / "src" / "f"
    real = os.copy_file_range

    def copy_then_rewrite(src, dst, count, *offsets):
        n = real(src, dst, count, *offsets)
        st = os.stat(path)
        with open(path, "r+b") as f:
            f.write(b"\0" * 16)  # after the kernel copied the old bytes of this chunk
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        return n

    monkeypatch.setattr(os, "copy_file_range", copy_then_rewrite)
    with pytest.raises(filecopy.CopyFailed, match="differs from the source"):
        _copy(tmp_path, os.urandom(2 * BUF))
    assert os.listdir(tmp_path / "dst") == []


def _another_process(code: str) -> subprocess.Popen:
    """Start a process that runs ``code`` (a writer elsewhere on the node) and wait for it."""
    other = subprocess.Popen([sys.executable, "-c", code])
    other.wait(timeout=20)
    return other


def _cut_by_another_process(path, size: int) -> subprocess.Popen:
    return _another_process(f"import os; os.truncate({str(path)!r}, {size})")


@pytest.mark.parametrize("when", ["after the copy", "after the size check"])
def test_another_process_cuts_a_source_at_once_and_the_copy_is_refused_not_fatal(tmp_path, monkeypatch, when):
    """A process cutting a source being copied is never held off nor refused (coreutils truncate
    opens O_NONBLOCK, which a read lease made fail with EAGAIN), and the copier, which never
    maps a source, reads it short and refuses the copy instead of dying of SIGBUS."""
    path = tmp_path / "src" / "f"
    seen = {}

    def cut():
        t0 = time.monotonic()
        proc = subprocess.run(["truncate", "-s", "4096", str(path)], capture_output=True, text=True)
        seen["cut"] = (proc.returncode, proc.stderr, time.monotonic() - t0)

    if when == "after the copy":
        real = os.copy_file_range

        def copy_then_cut(src, dst, count, *offsets):
            n = real(src, dst, count, *offsets)
            if "cut" not in seen:
                cut()
            return n

        monkeypatch.setattr(os, "copy_file_range", copy_then_cut)
    else:
        real = filecopy._hash_read

        def cut_then_hash(fd, *args):
            if "cut" not in seen:
                cut()
            return real(fd, *args)

        monkeypatch.setattr(filecopy, "_hash_read", cut_then_hash)
    try:
        _copy(tmp_path, os.urandom(3 * CHUNK))
        refused = ""
    except filecopy.CopyFailed as e:
        refused = str(e)
    code, err, took = seen["cut"]
    assert code == 0, err  # main's read lease: "cannot open ... Resource temporarily unavailable"
    assert took < 2  # not held for a lease (the kernel's lease-break time is 45 s)
    assert refused.startswith("changed since")
    assert os.listdir(tmp_path / "dst") == [] and os.stat(path).st_size == 4096


@pytest.mark.parametrize("size", [100, 3 * BUF + 5, 2 * CHUNK + 5])
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
                _another_process(f"open({str(path)!r}, 'ab').write(b'x' * 10)")
            else:
                _cut_by_another_process(path, CHUNK + 10)

    with pytest.raises(filecopy.CopyFailed, match="changed since"):
        _copy(tmp_path, os.urandom(3 * CHUNK), on_bytes=on_bytes)
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


def test_a_suspended_mover_makes_no_writer_of_its_sources_wait(tmp_path):
    """SIGSTOP the mover (all its processes) in the middle of a large file: a writer that opens
    that source, and a truncate of it, go through at once (main: EAGAIN, or 45 s of lease break)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    names = [f"big{i}.dat" for i in range(4)]
    for name in names:
        write(str(src / name), os.urandom(64 << 20))
    proc = subprocess.Popen(
        [MOVER, "copy", "--workers", "1", "--source", str(src), "--target", str(dst), "*"],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (dst.is_dir() and any(".iosea-tmp-" in n for n in os.listdir(dst))):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.0005)
        os.killpg(proc.pid, signal.SIGSTOP)  # in the middle of a file (its temp file is there)
        t0 = time.monotonic()
        for name in names:
            path = str(src / name)
            cut = subprocess.run(["truncate", "-s", "4096", path], capture_output=True, text=True, timeout=10)
            assert cut.returncode == 0, cut.stderr
            opened = subprocess.run(
                [sys.executable, "-c", f"open({path!r}, 'ab').write(b'x')"], capture_output=True, timeout=10
            )
            assert opened.returncode == 0, opened.stderr
        assert time.monotonic() - t0 < 5  # nobody waited for a lease (the kernel would make it 45 s)
    finally:
        os.killpg(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "changed since the transfer started" in err, err
    assert "Traceback" not in err
