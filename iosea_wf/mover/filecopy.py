"""Copy one file or symlink into place atomically, and verify the copy by hashing.

See :mod:`iosea_wf.mover.engine` for the integrity argument these primitives implement. File
copies work relative to open directory descriptors (the worker keeps one pair per directory), so
each file costs one short name lookup per call instead of a walk of the whole path.

Two ways of copying a file's bytes:

* small files (< ``KERNEL_COPY_MIN``): one read into an aligned buffer, one write of it; the digest is
  of that buffer, i.e. of exactly what was written;
* larger files: the kernel copies, chunk by chunk (``copy_file_range``, else ``sendfile``: no
  trip of the data through this process), then each chunk is hashed on both sides, the source
  by reading it, and the temp file, through a read-only mapping of the page cache (the source is
  never mapped: a process cutting a mapped file would kill this one with SIGBUS; a read lease
  against that made other processes' writes wait, and their non-blocking opens fail with
  EAGAIN), and the two digests must agree. Only the data ranges (SEEK_DATA/SEEK_HOLE) are
  copied: a sparse file stays sparse, its holes hashed as the zeros they read as.
  Measured on the bench box: writing a large file from a user buffer ran at 0.15-0.3 GB/s for
  minutes at a time, while kernel copies of the
  same data ran at 3 GB/s in the same minutes (cause not pinned down: inside write(2), the copy
  from the user's pages into new page-cache folios); read+write of 1 GiB took 0.25 s or 2.6 s,
  the kernel copy 0.26-0.35 s.
  Where neither kernel call works between the two files (an old kernel, a filesystem that
  refuses), the file is streamed through the buffer as a small one would be, chunk by chunk.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import stat
from collections.abc import Callable

import xxhash

from iosea_wf.mover import metadata
from iosea_wf.mover.patterns import TEMP_MARK

# 1 MiB buffers: measured on the bench box, larger buffers gave no gain and 256 KiB cost ~10 %.
BUF_SIZE = 1 << 20
# Kernel copies go CHUNK bytes at a time: the step of progress, of cancellation and of hashing
# (8 MiB of each side is hashed while it is still in the CPU's last-level cache).
CHUNK = 8 << 20
# Files from this size on are copied by the kernel. Measured with 1,024 files of 512 KiB, 12
# alternating pairs on a noisy day: median 1.0 s instead of 1.2 s through the buffer (cp -a ~1.3 s).
KERNEL_COPY_MIN = 64 << 10
# What copy_file_range / sendfile raise when they cannot copy between these two files at all.
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})
_PAGE = mmap.ALLOCATIONGRANULARITY
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # populate: one call maps the whole chunk
_NAME_MAX = 255
_RD = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # NONBLOCK: a FIFO must not hang us
_WR = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_WR_READ = _WR & ~os.O_WRONLY | os.O_RDWR  # large files: the copy is mapped back to be hashed
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
CHANGED = "changed since the transfer started; not transferred"


APPEARED = "appeared at the target during the copy; kept at the source, target left as it was"
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _load_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    return fn


_renameat2 = _load_renameat2()


def rename_noreplace(src: str, dst: str, dir_fd: int = _AT_FDCWD) -> None:
    """Rename ``src`` to ``dst`` (relative to ``dir_fd``) only if ``dst`` does not exist.

    One renameat2(RENAME_NOREPLACE): the kernel checks and renames at once, so a file another
    process creates at the target meanwhile is never replaced (FileExistsError). Where the
    filesystem or libc lacks it, an lstat before a plain rename narrows the window instead.
    """
    if _renameat2 is not None:
        if _renameat2(dir_fd, os.fsencode(src), dir_fd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), dst)
    fd = None if dir_fd == _AT_FDCWD else dir_fd
    try:
        os.lstat(dst, dir_fd=fd)
    except FileNotFoundError:
        os.rename(src, dst, src_dir_fd=fd, dst_dir_fd=fd)
        return
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)


class CopyAborted(Exception):
    """Raised inside a copy when the run is stopping; the temp file has been removed."""


class CopyFailed(Exception):
    """Raised when one file cannot be transferred for a reason that is not an OSError."""


def temp_name(name: str, token: str) -> str:
    """Return the hidden temporary name ``.<name>.iosea-tmp-<token>`` that fits NAME_MAX."""
    suffix = f"{TEMP_MARK}{token}"
    room = _NAME_MAX - 1 - len(suffix)
    encoded = os.fsencode(name)
    if len(encoded) > room:
        name = os.fsdecode(encoded[:room])  # cut the name (bytes), never the suffix
    return f".{name}{suffix}"


def new_buffer(size: int = BUF_SIZE) -> mmap.mmap:
    """Return a page-aligned buffer for reads (an anonymous mapping).

    Alignment matters: the kernel's copy into a buffer that is not cache-line aligned (a
    ``bytearray``'s data starts 16 bytes into its allocation) was measured 4.7x slower on the
    bench box (AMD EPYC: 1 GiB read from the page cache in 0.43 s instead of 0.09 s).
    """
    return mmap.mmap(-1, size)


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_rest(fd: int, data: bytes, size: int) -> bytes:
    """Finish a read that came back short (rare: network filesystems, signals) up to EOF or size+1."""
    parts = [data]
    got = len(data)
    while got <= size:
        more = os.read(fd, size + 1 - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _finish(tfd, sfd, planned, created_mode, fsync, info, notes) -> os.stat_result:
    """Check the source did not change while it was read; give the temp file its metadata."""
    size, mtime_ns, _mode = planned
    st = os.fstat(sfd)
    if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
        raise CopyFailed(CHANGED)
    lost = metadata.finish_file(sfd, tfd, st, created_mode, info)
    if lost and notes is not None:
        notes.extend(lost)
    if fsync:
        os.fsync(tfd)
    return st


def copy_file(
    sdir: int,
    tdir: int,
    name: str,
    tmp: str,
    planned: tuple[int, int, int],
    buf: mmap.mmap | bytearray,
    add_bytes: Callable[[int], None],
    stopping: Callable[[], bool],
    fsync: bool = False,
    written: Callable[[int, int, int], None] | None = None,
    noreplace: bool = False,
    info: metadata.DirInfo | None = None,
    notes: list[str] | None = None,
) -> tuple[os.stat_result, bytes]:
    """Copy regular file ``name`` of directory fd ``sdir`` to ``name`` in ``tdir`` through ``tmp``.

    Return the source's stat and the xxh3-128 of the bytes the copy holds. ``planned`` is the
    source's (size, mtime_ns, mode) when the transfer was planned: a source that differs afterwards
    is refused rather than copied half-old, half-new. ``add_bytes`` is called as bytes land (large
    files chunk by chunk, a small file once it is in place). ``buf`` should come from
    :func:`new_buffer` (aligned). ``written(fd, offset, length)``, if given, is called for each
    range of the temp file once it is written (a move starts the write-back to disk there).
    With ``noreplace``, a file that appeared at ``name`` meanwhile is left alone (CopyFailed).
    ``info`` is what ``tdir`` gives new files (:func:`metadata.dir_info`); what of the source's
    metadata the copy could not keep is appended to ``notes``.
    """
    size = planned[0]
    mode = planned[2] & 0o777  # setuid/setgid only once the copy is written and owned (metadata)
    sfd = os.open(name, _RD, dir_fd=sdir)
    try:
        small = size < min(KERNEL_COPY_MIN, len(buf))
        # Created with its final mode, so the usual case (no umask bit in it) needs no fchmod;
        # opened for reading too when the copy is to be mapped back and hashed.
        tfd = os.open(tmp, _WR if small else _WR_READ, mode, dir_fd=tdir)
        try:
            if small:
                # Small file: one read into the aligned buffer (asking one byte more detects growth)
                # and one write.
                view = memoryview(buf)
                n = os.readv(sfd, [view[: size + 1]])
                data = view[:n]
                if n != size:
                    data = _read_rest(sfd, bytes(data), size)
                    if len(data) != size:
                        raise CopyFailed(CHANGED)
                n = os.write(tfd, data)
                if n != size:
                    _write_all(tfd, memoryview(data)[n:])
                digest = xxhash.xxh3_128_digest(data)
                if written is not None:
                    written(tfd, 0, size)
            else:
                digest = _kernel_copy(sfd, tfd, size, buf, add_bytes, stopping, written)
                if digest is None:
                    digest = _stream(sfd, tfd, size, buf, add_bytes, stopping, written)
            st = _finish(tfd, sfd, planned, mode, fsync, info, notes)
        finally:
            os.close(tfd)
        if noreplace:
            try:
                rename_noreplace(tmp, name, tdir)
            except FileExistsError:
                raise CopyFailed(APPEARED) from None
        else:
            os.rename(tmp, name, src_dir_fd=tdir, dst_dir_fd=tdir)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=tdir)
        raise
    finally:
        os.close(sfd)
    if small:
        add_bytes(size)
    return st, digest


def _copy_file_range(sfd: int, tfd: int, count: int, offset: int) -> int:
    return os.copy_file_range(sfd, tfd, count, offset, offset)


def _sendfile(sfd: int, tfd: int, count: int, offset: int) -> int:
    os.lseek(tfd, offset, os.SEEK_SET)  # sendfile writes at tfd's position: holes are skipped
    return os.sendfile(tfd, sfd, offset, count)


def _data_ranges(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """Return the (offset, length) ranges of ``fd`` in [start, end) that hold data (not holes).

    SEEK_DATA/SEEK_HOLE, as ``cp`` uses them: a sparse file is copied sparse, its holes never read
    nor written. Where the filesystem cannot tell, the whole range is data.
    """
    ranges = []
    off = start
    while off < end:
        try:
            data = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after off: the rest is a hole
                break
            return [*ranges, (off, end - off)]
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        ranges.append((data, hole - data))
        off = hole
    return ranges


def _kernel_copy(sfd: int, tfd: int, size: int, buf, add_bytes, stopping, written=None) -> bytes | None:
    """Copy sfd to tfd in the kernel, chunk by chunk, holes kept, and verify; return the digest.

    Return None, having written nothing, when neither ``copy_file_range`` nor ``sendfile`` can
    copy between these two files. Only the data ranges of each chunk are copied (a hole stays a
    hole). Each chunk is then hashed on both sides: the source by reading it (never mapped: a
    process that cuts a mapped file kills the reader with SIGBUS, and the read lease that used to
    prevent it made other processes' writes wait or fail), the temp file through a read-only
    mapping (:func:`_hash_range`); the copy is refused unless both digests agree, every range copied
    fully and the temp file has the planned length. So the digest describes what the target holds,
    and a source that changed during the copy (even in place, size and mtime kept, or by data
    written into a hole) is caught by the comparison.
    """
    copy = _copy_file_range
    src_hash, dst_hash = xxhash.xxh3_128(), xxhash.xxh3_128()
    pos = 0
    started = False  # a kernel copy succeeded: from then on, an error fails the file
    holes = 0  # bytes of holes already counted as done (taken back if the copy falls back)
    while pos < size:
        if stopping():
            raise CopyAborted()
        end = min(pos + CHUNK, size)
        ranges = _data_ranges(sfd, pos, end)
        for off, length in ranges:
            done = 0
            while done < length:
                try:
                    n = copy(sfd, tfd, length - done, off + done)
                except OSError as e:
                    if started or e.errno not in _NO_KERNEL_COPY:
                        raise
                    if copy is _sendfile:
                        add_bytes(-holes)
                        return None
                    copy = _sendfile
                    continue
                if not n:
                    raise CopyFailed(CHANGED)  # the source ended early: it was cut
                started = True
                done += n
            if written is not None:
                written(tfd, off, length)
        if not ranges or sum(ranges[-1]) < end:
            os.ftruncate(tfd, end)  # the chunk ends in a hole: the temp file must reach it to be mapped
        # A source already shorter than the bytes just copied was cut: refused before its hash.
        if os.fstat(sfd).st_size < end:
            raise CopyFailed(CHANGED)
        if ranges or _data_ranges(sfd, pos, end):
            _hash_data(sfd, pos, end, src_hash, buf, _hash_read)
            _hash_data(tfd, pos, end, dst_hash, buf, _hash_range)
        else:
            # A hole on both sides (the source still has none of its data there): both read as
            # zeros, hashed once; the two hashes were equal so far, or the copy fails anyway.
            if src_hash.digest() != dst_hash.digest():
                break
            _hash_zeros(dst_hash, end - pos)
            src_hash = dst_hash.copy()
            if not started:
                holes += end - pos
        add_bytes(end - pos)
        pos = end
    os.ftruncate(tfd, size)  # a hole at the end is a length, not data
    if os.fstat(sfd).st_size != size:
        raise CopyFailed(CHANGED)
    _check_complete(tfd, size, size)
    digest = dst_hash.digest()
    if src_hash.digest() != digest:
        raise CopyFailed("verification failed: the copy differs from the source (changed while copied?)")
    return digest


_ZEROS = mmap.mmap(-1, BUF_SIZE)  # never written: reads as zeros


def _hash_data(fd: int, start: int, end: int, h, buf, hash_range) -> None:
    """Feed bytes [start, end) of ``fd`` to ``h``: its data ranges through ``hash_range``, its
    holes as zeros. A hole is never read: mapping one of a tmpfs file allocates its pages."""
    pos = start
    for off, length in _data_ranges(fd, start, end):
        _hash_zeros(h, off - pos)
        hash_range(fd, off, length, h, buf)
        pos = off + length
    _hash_zeros(h, end - pos)


def _hash_zeros(h, length: int) -> None:
    """Feed ``length`` zero bytes to ``h`` (a hole: xxh3 takes 4 GiB of them in ~0.06 s)."""
    view = memoryview(_ZEROS)
    while length > 0:
        n = min(length, len(view))
        h.update(view[:n])
        length -= n


def _hash_range(fd: int, offset: int, length: int, h, buf) -> None:
    """Feed bytes [offset, offset+length) of ``fd`` to ``h``: through a read-only mapping of the
    page cache (no copy), or read into ``buf`` where the file cannot be mapped."""
    start = offset - offset % _PAGE
    try:
        mapped = mmap.mmap(fd, offset + length - start, flags=_MAP_FLAGS, prot=mmap.PROT_READ, offset=start)
    except OSError:
        _hash_read(fd, offset, length, h, buf)
        return
    try:
        if start == offset:
            h.update(mapped)
        else:
            with memoryview(mapped) as view, view[offset - start :] as part:
                h.update(part)
    finally:
        mapped.close()


def _hash_read(fd: int, offset: int, length: int, h, buf) -> None:
    view = memoryview(buf)
    end = offset + length
    while offset < end:
        n = os.preadv(fd, [view[: min(len(view), end - offset)]], offset)
        if not n:
            raise CopyFailed(CHANGED)  # the file ended before the bytes just copied
        h.update(view[:n])
        offset += n


def _stream(sfd: int, tfd: int, size: int, buf, add_bytes, stopping, written=None) -> bytes:
    """Copy sfd to tfd through ``buf`` (holes skipped), hashing each piece from the buffer written.

    Every write must take the whole piece, each data range must be read fully, and the temp file
    must end up exactly the planned length: the digest then describes what the target holds.
    """
    h = xxhash.xxh3_128()
    view = memoryview(buf)
    pos = 0
    while pos < size:
        if stopping():
            raise CopyAborted()
        end = min(pos + CHUNK, size)
        for off, length in _data_ranges(sfd, pos, end):
            _hash_zeros(h, off - pos)  # the hole before this range
            add_bytes(off - pos)
            pos = off
            while pos < off + length:
                n = os.preadv(sfd, [view[: min(len(view), off + length - pos)]], pos)
                if not n:
                    raise CopyFailed(CHANGED)
                piece = view[:n]
                h.update(piece)
                done = 0
                while done < n:
                    done += os.pwrite(tfd, piece[done:], pos + done)
                if written is not None:
                    written(tfd, pos, n)
                pos += n
                add_bytes(n)
        _hash_zeros(h, end - pos)  # the hole after the last range
        add_bytes(end - pos)
        pos = end
    os.ftruncate(tfd, size)
    if os.fstat(sfd).st_size != size:
        raise CopyFailed(CHANGED)
    _check_complete(tfd, size, size)
    return h.digest()


def _check_complete(tfd: int, total: int, size: int) -> None:
    """Refuse a copy whose byte count is not the planned size, or whose temp file is not that long."""
    if total != size:
        raise CopyFailed(CHANGED)
    if os.fstat(tfd).st_size != total:
        raise CopyFailed("verification failed: the copy does not have the length written")


def _hash_fd(fd: int, buf, stopping=lambda: False) -> tuple[int, bytes]:
    """Return (size, xxh3-128) of open file ``fd``: its data ranges read, its holes hashed as zeros."""
    h = xxhash.xxh3_128()
    size = os.fstat(fd).st_size
    pos = 0
    while pos < size:
        if stopping():
            raise CopyAborted()
        end = min(pos + CHUNK, size)
        for off, length in _data_ranges(fd, pos, end):
            _hash_zeros(h, off - pos)
            _hash_read(fd, off, length, h, buf)
            pos = off + length
        _hash_zeros(h, end - pos)
        pos = end
    # Read on past the size seen at the start: a file that grew meanwhile is hashed whole.
    view = memoryview(buf)
    while True:
        n = os.preadv(fd, [buf], pos)
        if not n:
            return pos, h.digest()
        h.update(view[:n])
        pos += n


def hash_file(path: str, buf, stopping=lambda: False, dir_fd: int | None = None) -> tuple[int, bytes]:
    """Return (size, xxh3-128 digest) of regular file ``path`` (relative to ``dir_fd``), read with ``buf``."""
    fd = os.open(path, _RD, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CopyFailed("not a regular file")
        return _hash_fd(fd, buf, stopping)
    finally:
        os.close(fd)


def copy_symlink(
    dst: str,
    tmp: str,
    text: str,
    mtime_ns: int,
    noreplace: bool = False,
    dir_fd: int | None = None,
    *,
    src_dir_fd: int | None = None,
    notes: list[str] | None = None,
) -> None:
    """Create symlink ``dst`` -> ``text`` through ``tmp`` (atomic replace), keeping its mtime, and
    (given ``src_dir_fd``, the directory of the source link, also named ``dst``) its owner,
    attributes and atime; misses are added to ``notes``.

    ``dst`` and ``tmp`` are relative to ``dir_fd`` when it is given, and the source link to
    ``src_dir_fd``: no path is resolved again, so nothing can be redirected through a symlink.
    """
    try:
        os.symlink(text, tmp, dir_fd=dir_fd)
        st = None
        if src_dir_fd is not None:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(dst, dir_fd=src_dir_fd)
        if st is not None and stat.S_ISLNK(st.st_mode):
            lost = metadata.finish_symlink(src_dir_fd, dst, dir_fd, tmp, st)
            if lost and notes is not None:
                notes.extend(lost)
            if st.st_mtime_ns != mtime_ns:
                os.utime(tmp, ns=(st.st_atime_ns, mtime_ns), dir_fd=dir_fd, follow_symlinks=False)
        else:
            os.utime(tmp, ns=(mtime_ns, mtime_ns), dir_fd=dir_fd, follow_symlinks=False)
        if os.readlink(tmp, dir_fd=dir_fd) != text:
            raise CopyFailed("verification failed: the symlink differs from the source")
        if noreplace:
            try:
                rename_noreplace(tmp, dst, _AT_FDCWD if dir_fd is None else dir_fd)
            except FileExistsError:
                raise CopyFailed(APPEARED) from None
        else:
            os.rename(tmp, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
