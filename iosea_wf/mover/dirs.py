"""Where the mover's paths lead: directories opened beneath a root without following any symlink,
and whether a source and a target overlap, by any path to them.

Every directory the mover reads, writes or deletes in is opened relative to a descriptor of its
root (the source or the target, opened once), never by a path the kernel would resolve through
symlinks: ``openat2(RESOLVE_NO_SYMLINKS|RESOLVE_BENEATH)`` where the kernel has it, else one
``openat(O_NOFOLLOW|O_DIRECTORY)`` per component. So a directory swapped for a symlink after the
plan was made (or a target directory that is a symlink back into the source) is an error for the
files under it, never followed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import stat

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
# openat2 has one number on every architecture that has it (it came after the syscall tables merged).
_SYS_OPENAT2 = 437 if os.uname().machine in ("x86_64", "aarch64", "riscv64", "ppc64le", "s390x") else None
_OCTAL = re.compile(rb"\\([0-7]{3})")
SYMLINK_IN_PATH = "a directory on its path is a symlink (or was swapped for one); not followed"


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


def _load_syscall():
    try:
        fn = ctypes.CDLL(None, use_errno=True).syscall
    except (AttributeError, OSError):
        return None
    fn.restype = ctypes.c_long
    return fn


_syscall = _load_syscall() if _SYS_OPENAT2 is not None else None
_have_openat2 = _syscall is not None  # cleared at the first ENOSYS (old kernel, seccomp filter)


def _symlink_error(rel: str) -> OSError:
    return OSError(errno.ELOOP, SYMLINK_IN_PATH, rel)


def _openat2(root_fd: int, rel: str) -> int | None:
    """Open directory ``rel`` beneath ``root_fd`` with openat2; None where openat2 cannot be used."""
    global _have_openat2
    how = _OpenHow(DIR_FLAGS, 0, _RESOLVE_NO_SYMLINKS | _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
    for _ in range(8):  # EAGAIN: a rename raced with the lookup; the kernel asks to try again
        fd = _syscall(_SYS_OPENAT2, root_fd, os.fsencode(rel), ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err == errno.EAGAIN:
            continue
        if err in (errno.ENOSYS, errno.EPERM, errno.E2BIG):
            _have_openat2 = False
            return None
        if err in (errno.ELOOP, errno.EXDEV):
            raise _symlink_error(rel)
        raise OSError(err, os.strerror(err), rel)
    return None


def _components(rel: str) -> list[str]:
    comps = rel.split("/") if rel else []
    if any(c in ("", ".", "..") for c in comps):
        raise OSError(errno.EINVAL, "not a plain relative path", rel)
    return comps


def _open_component(parent: int, name: str, rel: str) -> int:
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            try:
                link = stat.S_ISLNK(os.lstat(name, dir_fd=parent).st_mode)
            except OSError:
                link = False
            if link:
                raise _symlink_error(rel) from None
        raise


def open_dir(root_fd: int, rel: str) -> int:
    """Open directory ``rel`` (relative, '/'-separated; "" is the root) beneath ``root_fd``.

    No symlink is followed on the way, the last component included (OSError ELOOP).
    """
    comps = _components(rel)
    if not comps:
        return os.open(".", DIR_FLAGS, dir_fd=root_fd)
    if _have_openat2:
        try:
            fd = _openat2(root_fd, rel)
        except NotADirectoryError:
            fd = None  # a symlink as the last component says ENOTDIR: the walk below tells which
        if fd is not None:
            return fd
    return _walk(root_fd, comps, create=False)


def make_dirs(root_fd: int, rel: str) -> int:
    """Open directory ``rel`` beneath ``root_fd``, creating what is missing; no symlink is followed."""
    try:
        return open_dir(root_fd, rel)
    except FileNotFoundError:
        pass
    return _walk(root_fd, _components(rel), create=True)


def _walk(root_fd: int, comps: list[str], create: bool) -> int:
    """Open ``comps`` one component at a time beneath ``root_fd`` (made first when ``create``)."""
    cur = root_fd
    try:
        for i, name in enumerate(comps):
            if create:
                with contextlib.suppress(FileExistsError):  # another worker or mover made it meanwhile
                    os.mkdir(name, 0o777, dir_fd=cur)
            nxt = _open_component(cur, name, "/".join(comps[: i + 1]))
            if cur != root_fd:
                os.close(cur)
            cur = nxt
    except BaseException:
        if cur != root_fd:
            os.close(cur)
        raise
    return cur


# -- overlap of the two roots ------------------------------------------------------------------
def _ancestry(path: str | int) -> list[tuple[int, int]]:
    """(st_dev, st_ino) of ``path`` (or of open directory ``path``) and of each directory above
    it, following '..' to '/'."""
    ids: list[tuple[int, int]] = []
    if isinstance(path, int):
        fd = os.open(".", DIR_FLAGS, dir_fd=path)
    else:
        fd = os.open(path, DIR_FLAGS & ~os.O_NOFOLLOW)
    try:
        while True:
            st = os.fstat(fd)
            here = (st.st_dev, st.st_ino)
            if ids and ids[-1] == here:
                return ids  # '..' of the root is the root
            ids.append(here)
            up = os.open("..", DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = up
    finally:
        os.close(fd)


def _unescape(field: bytes) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes
    return os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def _fs_location(path: str) -> tuple[str, str] | None:
    """Return (device, path inside that filesystem) of real path ``path``, from /proc/self/mountinfo.

    Two mounts of one filesystem (a bind mount, two mount paths of one NFS or Lustre filesystem)
    give one device and the same inner path for the same directory, whatever path reaches it.
    """
    best: tuple[int, str, str] | None = None
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split(b" ")
                if len(fields) < 5:
                    continue
                root, point = _unescape(fields[3]), _unescape(fields[4])
                # the longest mount point wins; of equal ones the last (it is the one on top)
                if _contains(point, path) and (best is None or len(point) >= best[0]):
                    rest = path[len(point) :].lstrip("/")
                    inner = os.path.join(root, rest) if rest else root
                    best = (len(point), fields[2].decode(), os.path.normpath(inner))
    except OSError:
        return None
    return None if best is None else (best[1], best[2])


def _contains(outer: str, inner: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def overlap_open(source_fd: int, target_fd: int) -> str | None:
    """Why open directories ``source_fd`` and ``target_fd`` overlap (one is, or is inside, the
    other, by '..'), or None. The roots as opened: a root swapped since :func:`overlap` judged its
    path is judged again, by what the descriptors hold."""
    src_up, dst_up = _ancestry(source_fd), _ancestry(target_fd)
    if src_up[0] == dst_up[0]:
        return "--source and --target are the same directory"
    if src_up[0] in dst_up:
        return "--target is inside --source"
    if dst_up[0] in src_up:
        return "--source is inside --target"
    return None


def overlap(source: str, target: str) -> str | None:
    """Why ``source`` and ``target`` (real absolute paths) overlap, or None when they do not.

    They overlap when they are one directory (same st_dev and st_ino, by whatever path) or one
    contains the other: by '..' from either, or inside one filesystem reached through two mounts.
    """
    existing, missing = target, []
    while not os.path.isdir(existing):  # a target not made yet: judge by where it will be made
        existing, name = os.path.split(existing)
        missing.insert(0, name)
    src_up, dst_up = _ancestry(source), _ancestry(existing)
    if not missing and src_up[0] == dst_up[0]:
        return "--source and --target are the same directory"
    if src_up[0] in dst_up:
        return "--target is inside --source"
    if not missing and dst_up[0] in src_up:
        return "--source is inside --target"
    s, t = _fs_location(source), _fs_location(existing)
    if s is not None and t is not None and s[0] == t[0]:
        inner_t = os.path.join(t[1], *missing) if missing else t[1]
        if s[1] == inner_t:
            return "--source and --target are the same directory (through another mount of it)"
        if _contains(s[1], inner_t):
            return "--target is inside --source (through another mount of it)"
        if _contains(inner_t, s[1]):
            return "--source is inside --target (through another mount of it)"
    return None
