"""A user's FUSE mount of an NFS export: a job's I/O through its ephemeral NFS service.

This kernel has no NFS client, but has FUSE. ``iosea-wf-nfsfuse URL MOUNTPOINT [--ro]`` connects
to the export at ``URL`` (the service's libnfs-style ``nfs://host/path?nfsport=..&mountport=..``
URL, NFSv3) as the calling user (AUTH_SYS with the process's own uid and gid: exports are root
squashed) through nfs-rs, a userspace NFS client, and serves it at ``MOUNTPOINT`` through
mfusepy (libfuse 3), in the foreground, until it is unmounted or receives SIGTERM/SIGINT/SIGHUP
(libfuse then unmounts). A user mounts with Debian's setuid ``fusermount3`` on a directory they
own, outside any user namespace; ``iosea_wf.attach --nfs`` then binds that mount onto the WDF
mountpoint inside the job's namespace.

What goes faster than one RPC per kernel request, cheaply:
- writes are gathered per open file (contiguous ones, up to ``WRITE_GATHER`` bytes: 4 MiB, the
  server's largest WRITE and the fastest call size measured here) and sent as
  one positional write, which nfs-rs splits into concurrent UNSTABLE chunks and commits once;
  they are sent at the latest on flush (close), fsync, release, and before any read, getattr,
  truncate or rename of the same file, so the file's size and contents are always right;
- sequential reads fetch ``READ_AHEAD`` bytes at once (1 MiB: larger READ calls were slower here);
- libfuse runs multi-threaded, with 1 s attribute and entry caches (the kernel's).

It exits 1 with one line on stderr when the server cannot be reached or the export refuses the
user (before anything is mounted), and every later failure of the server reaches the job as EIO
(an RPC waits ``--timeout`` seconds at most).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import stat
import sys
import threading
import time
from itertools import count
from typing import Any

from .attach import describe

WRITE_GATHER = 4 << 20
READ_AHEAD = 1 << 20
_TYPE_BITS = {"file": stat.S_IFREG, "directory": stat.S_IFDIR, "symlink": stat.S_IFLNK}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC | os.O_CREAT


class NfsFuseError(Exception):
    """Raised when the export cannot be reached or used before the mount (the client exits 1)."""


def _errno_of(exc: BaseException) -> int:
    code = getattr(exc, "errno", None)
    return code if isinstance(code, int) and code > 0 else errno.EIO


class _Open:
    """One open file: its nfs-rs file, the writes gathered and the data read ahead."""

    def __init__(self, path: str, file: Any, writable: bool) -> None:
        self.path = path
        self.file = file
        self.writable = writable
        self.lock = threading.Lock()
        self.pending_at = 0
        self.pending = bytearray()
        self.ahead_at = 0
        self.ahead = b""
        self.read_end = -1


def _operations_base():
    import mfusepy

    return mfusepy.Operations


class NfsOperations(_operations_base()):  # type: ignore[misc]
    """The FUSE operations, each one or a few NFS RPCs as the user."""

    use_ns = True

    def __init__(self, client: Any, read_only: bool) -> None:
        self.client = client
        self.read_only = read_only
        self._open: dict[int, _Open] = {}
        self._ids = count(1)
        self._lock = threading.Lock()
        # Set once the kernel's INIT arrived: the mount was made and served.
        self.served = False

    def init(self, path: str) -> None:
        self.served = True

    # --- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _rel(path: str) -> str:
        rel = path.lstrip("/")
        return rel or "."

    def _fail(self, exc: BaseException) -> Exception:
        import mfusepy

        return mfusepy.FuseOSError(_errno_of(exc))

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # nfs-rs raises NfsError subclasses; anything else is EIO
            raise self._fail(exc) from None

    def _refuse_if_ro(self) -> None:
        import mfusepy

        if self.read_only:
            raise mfusepy.FuseOSError(errno.EROFS)

    def _handle(self, fh: int) -> _Open:
        import mfusepy

        handle = self._open.get(fh)
        if handle is None:
            raise mfusepy.FuseOSError(errno.EBADF)
        return handle

    def _send(self, handle: _Open) -> None:
        """Write what ``handle`` gathered (caller holds its lock)."""
        if handle.pending:
            data, at = bytes(handle.pending), handle.pending_at
            handle.pending.clear()
            self._call(handle.file.write_at, data, at)

    def _send_path(self, path: str) -> None:
        """Write what every open file of ``path`` gathered: its size and data are then the server's."""
        with self._lock:
            handles = [h for h in self._open.values() if h.path == path and h.pending]
        for handle in handles:
            with handle.lock:
                self._send(handle)

    def _forget_read_ahead(self, path: str) -> None:
        """Drop what any open file of ``path`` read ahead: the file is changing."""
        with self._lock:
            for handle in self._open.values():
                if handle.path == path:
                    handle.ahead = b""

    @staticmethod
    def _attrs(info: Any) -> dict[str, int]:
        kind = getattr(info.type, "value", info.type)
        return {
            "st_mode": _TYPE_BITS.get(kind, 0) | (info.mode & 0o7777),
            "st_nlink": info.nlink,
            "st_uid": info.uid,
            "st_gid": info.gid,
            "st_size": info.size,
            "st_blocks": (info.used + 511) // 512,
            "st_ino": info.fileid,
            "st_atime": info.atime,
            "st_mtime": info.mtime,
            "st_ctime": info.ctime,
        }

    # --- metadata --------------------------------------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        self._send_path(path)
        return self._attrs(self._call(self.client.stat, self._rel(path)))

    def readdir(self, path: str, fh: int):
        names = [".", ".."]
        try:
            names += [entry.name for entry in self.client.scandir(self._rel(path))]
        except Exception as exc:
            raise self._fail(exc) from None
        return names

    def readlink(self, path: str) -> str:
        return self._call(self.client.readlink, self._rel(path))

    def statfs(self, path: str) -> dict[str, int]:
        fs = self._call(self.client.fs_stat)
        block = 4096
        return {
            "f_bsize": block,
            "f_frsize": block,
            "f_blocks": fs.total_bytes // block,
            "f_bfree": fs.free_bytes // block,
            "f_bavail": fs.available_bytes // block,
            "f_files": fs.total_files,
            "f_ffree": fs.free_files,
            "f_favail": fs.available_files,
            "f_namemax": 255,
        }

    def chmod(self, path: str, mode: int) -> int:
        self._refuse_if_ro()
        self._call(self.client.chmod, self._rel(path), mode & 0o7777)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        self._refuse_if_ro()
        info = self._call(self.client.stat, self._rel(path))
        uid = info.uid if uid in (-1, 0xFFFFFFFF) else uid
        gid = info.gid if gid in (-1, 0xFFFFFFFF) else gid
        self._call(self.client.chown, self._rel(path), uid, gid)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        self._refuse_if_ro()
        self._send_path(path)
        if times is None:
            now = time.time_ns()
            times = (now, now)
        self._call(self.client.utime, self._rel(path), ns=(int(times[0]), int(times[1])))
        return 0

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        self._refuse_if_ro()
        self._send_path(path)
        self._call(self.client.truncate, self._rel(path), length)
        self._forget_read_ahead(path)
        return 0

    # --- namespace -----------------------------------------------------------------------------

    def mkdir(self, path: str, mode: int) -> int:
        self._refuse_if_ro()
        self._call(self.client.mkdir, self._rel(path), mode & 0o7777)
        return 0

    def rmdir(self, path: str) -> int:
        self._refuse_if_ro()
        self._call(self.client.rmdir, self._rel(path))
        return 0

    def unlink(self, path: str) -> int:
        self._refuse_if_ro()
        self._call(self.client.unlink, self._rel(path))
        return 0

    def rename(self, old: str, new: str) -> int:
        self._refuse_if_ro()
        self._send_path(old)
        self._call(self.client.rename, self._rel(old), self._rel(new))
        with self._lock:
            for handle in self._open.values():
                if handle.path == old:
                    handle.path = new
        return 0

    def symlink(self, target: str, source: str) -> int:
        # mfusepy's order: symlink(link path, what it points to).
        self._refuse_if_ro()
        self._call(self.client.symlink, source, self._rel(target))
        return 0

    def link(self, target: str, source: str) -> int:
        self._refuse_if_ro()
        self._call(self.client.link, self._rel(source), self._rel(target))
        return 0

    # --- files -----------------------------------------------------------------------------------

    def _register(self, path: str, file: Any, writable: bool) -> int:
        with self._lock:
            fh = next(self._ids)
            self._open[fh] = _Open(path, file, writable)
        return fh

    def open(self, path: str, flags: int) -> int:
        writable = bool(flags & (os.O_WRONLY | os.O_RDWR))
        if writable or flags & (os.O_APPEND | os.O_TRUNC):
            self._refuse_if_ro()
        file = self._call(self.client.open, self._rel(path), "r+b" if writable else "rb")
        return self._register(path, file, writable)

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        self._refuse_if_ro()
        file = self._call(self.client.open, self._rel(path), "w+b")
        try:
            self._call(self.client.chmod, self._rel(path), mode & 0o7777)
        except Exception:
            file.close()
            raise
        return self._register(path, file, True)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        handle = self._handle(fh)
        self._send_path(handle.path)
        with handle.lock:
            start = offset - handle.ahead_at
            if start >= 0 and offset + size <= handle.ahead_at + len(handle.ahead):
                data = handle.ahead[start : start + size]
            else:
                # Sequential: fetch ahead (concurrent READs); anything else: just what was asked.
                want = max(size, READ_AHEAD) if offset == handle.read_end else size
                handle.ahead = self._call(handle.file.read_at, offset, want)
                handle.ahead_at = offset
                data = handle.ahead[:size]
            handle.read_end = offset + len(data)
            return data

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        self._refuse_if_ro()
        handle = self._handle(fh)
        self._forget_read_ahead(handle.path)
        with handle.lock:
            if handle.pending and offset != handle.pending_at + len(handle.pending):
                self._send(handle)
            if not handle.pending:
                handle.pending_at = offset
            handle.pending += data
            if len(handle.pending) >= WRITE_GATHER:
                self._send(handle)
        return len(data)

    def flush(self, path: str, fh: int) -> int:
        handle = self._handle(fh)
        with handle.lock:
            self._send(handle)
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        return self.flush(path, fh)

    def release(self, path: str, fh: int) -> int:
        with self._lock:
            handle = self._open.pop(fh, None)
        if handle is None:
            return 0
        with handle.lock:
            try:
                self._send(handle)
            finally:
                handle.file.close()
        return 0

    def destroy(self, path: str) -> None:
        for fh in list(self._open):
            try:
                self.release(path, fh)
            except Exception as exc:  # the mount is going away: say what was lost
                print(f"iosea-wf-nfsfuse: data of an open file not written: {exc}", file=sys.stderr)
        self.client.close()


def connect(url: str, timeout: float) -> Any:
    """A nfs-rs client of ``url`` as this process's user, checked by a stat of the export's root."""
    import nfs_rs

    uid, gid = os.getuid(), os.getgid()
    where = describe(url)
    try:
        # A user cannot bind a reserved source port (and the site's exports do not ask for one).
        client = nfs_rs.Client.connect(
            url,
            versions=["3"],
            uid=uid,
            gid=gid,
            noresvport=uid != 0,
            connect_timeout=timeout,
            operation_timeout=timeout,
        )
    except Exception as exc:
        raise NfsFuseError(f"cannot mount the NFS export {where}: {exc}") from None
    try:
        info = client.stat(".")
    except Exception as exc:
        client.close()
        raise NfsFuseError(f"the NFS export {where} refuses uid {uid}: {exc}") from None
    if getattr(info.type, "value", info.type) != "directory":
        client.close()
        raise NfsFuseError(f"the NFS export {where} is not a directory")
    return client


def mount(url: str, mountpoint: str, *, read_only: bool, timeout: float) -> None:
    """Serve ``url`` at ``mountpoint`` until unmounted (blocks; libfuse unmounts on SIGTERM)."""
    import mfusepy

    client = connect(url, timeout)
    operations = NfsOperations(client, read_only)
    options: dict[str, Any] = {
        "foreground": True,
        "fsname": f"iosea-nfs:{describe(url).split(' ')[0]}",
        "subtype": "iosea-nfs",
        "attr_timeout": 1.0,
        "entry_timeout": 1.0,
        "negative_timeout": 0.0,
        # If this process dies without unmounting, fusermount3 unmounts: no stale mount is left.
        "auto_unmount": True,
    }
    if read_only:
        options["ro"] = True
    try:
        mfusepy.FUSE(operations, mountpoint, **options)
    except RuntimeError:
        # libfuse's loop reports the signal that ended it (SIGTERM: the job is over) as an error.
        if not operations.served:
            raise


def main(argv: list[str] | None = None) -> int:
    """``iosea-wf-nfsfuse URL MOUNTPOINT [--ro] [--timeout S]``: mount until unmounted."""
    parser = argparse.ArgumentParser(prog="iosea-wf-nfsfuse", description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the service's nfs:// URL (NFSv3; nfsport/mountport in the query)")
    parser.add_argument("mountpoint", help="an empty directory the user owns")
    parser.add_argument("--ro", action="store_true", help="read-only: every write fails with EROFS")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds an RPC may wait (default 30)")
    args = parser.parse_args(argv)
    # mfusepy logs every failed operation (ENOENT of a lookup too) at DEBUG: keep the job's log clean.
    logging.getLogger("mfusepy").setLevel(logging.CRITICAL)
    try:
        mount(args.url, args.mountpoint, read_only=args.ro, timeout=args.timeout)
    except NfsFuseError as exc:
        print(f"iosea-wf-nfsfuse: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"iosea-wf-nfsfuse: cannot mount at {args.mountpoint}: libfuse error {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
