"""Give a copy the metadata of its source as ``cp -a`` does; say what the target could not keep.

Called at the few places where an element is finished: a file's temp copy before its rename
(:func:`finish_file`, on open descriptors), a symlink's temp link (:func:`finish_symlink`) and a
directory at the end of the copy phase (:func:`finish_dir`). What is kept: owner and group (as
root; otherwise the group, where this user is a member of it), the mode exactly (setuid, setgid
and sticky bits included), extended attributes (``user.*``; as root also ``trusted.*`` and
``security.*``, where the kernel lets them be set), POSIX ACLs (the ``system.posix_acl_access``
and ``system.posix_acl_default`` attributes; an ACL the new element inherited from a default ACL
of its target directory is removed when the source has none, as ``cp -a`` does) and times.

Order matters: the owner first (chown clears setuid/setgid and file capabilities), then the
attributes (setting an access ACL rewrites the group bits of the mode), then the mode, then the
times. Each thing that cannot be kept is returned as a note (``"xattr user.x not kept: Operation
not supported"``); the caller reports it, so nothing is dropped silently. A file whose ACL cannot
be kept gets, as the group bits of its mode, the owning group's effective rights under that ACL
(its ``group::`` entry masked), never the mask itself: the owning group does not gain rights
(write, typically) that the ACL denied it.
"""

from __future__ import annotations

import errno
import os
import stat
import struct

ACL_ACCESS = "system.posix_acl_access"
ACL_DEFAULT = "system.posix_acl_default"
_ACL_NAMES = (ACL_ACCESS, ACL_DEFAULT)
_ACL_GROUP_OBJ, _ACL_MASK = 0x04, 0x10
_AS_ROOT = os.geteuid() == 0
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once at import, in the main thread: os.umask cannot be read without setting it
# listxattr/getxattr errors meaning "this filesystem or this element has no attributes to give".
_NO_XATTRS = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EPERM})


class DirInfo:
    """What a new file gets in one target directory: its owner (this process), its group (the
    directory's if setgid), and whether it inherits a default ACL."""

    __slots__ = ("uid", "gid", "default_acl")

    def __init__(self, uid: int, gid: int, default_acl: bool):
        self.uid = uid
        self.gid = gid
        self.default_acl = default_acl  # a new file inherits an ACL (and its mode ignores the umask)


def dir_info(tdir: int) -> DirInfo:
    """Return what a file created in open target directory ``tdir`` inherits."""
    st = os.fstat(tdir)
    gid = st.st_gid if st.st_mode & stat.S_ISGID else os.getegid()
    try:
        os.getxattr(tdir, ACL_DEFAULT)
        default_acl = True
    except OSError:
        default_acl = False
    return DirInfo(os.geteuid(), gid, default_acl)


def _names(target, follow: bool = True) -> list[str]:
    try:
        return os.listxattr(target, follow_symlinks=follow)
    except OSError as e:
        if e.errno in _NO_XATTRS:
            return []
        raise


def _owner(target, st: os.stat_result, now: tuple[int, int] | None, notes: list[str], follow=True) -> None:
    """Give ``target`` the owner and group of ``st`` (as root), else the group where allowed."""
    if now is None:
        cur = os.stat(target, follow_symlinks=follow)
        now = (cur.st_uid, cur.st_gid)
    want = (st.st_uid, st.st_gid)
    if now == want:
        return
    if _AS_ROOT:
        try:
            os.chown(target, *want, follow_symlinks=follow)
        except OSError as e:
            notes.append(f"owner {want[0]}:{want[1]} not kept: {e.strerror}")
        return
    if now[1] != want[1]:
        try:
            os.chown(target, -1, want[1], follow_symlinks=follow)
        except OSError as e:
            notes.append(f"group {want[1]} not kept: {e.strerror}")
    if now[0] != want[0]:
        notes.append(f"owner {want[0]} not kept: only root can give a file another owner")


def _copy_xattrs(src, dst, names: list[str], remove, notes: list[str], follow=True) -> bool:
    """Copy attributes ``names`` of ``src`` to ``dst``; remove those of ``remove`` from ``dst``
    (ACLs it inherited or had that the source lacks).

    Return False when the source has an access ACL that could not be set on ``dst``.
    """
    acl_ok = True
    for name in names:
        try:
            value = os.getxattr(src, name, follow_symlinks=follow)
        except OSError as e:
            if e.errno == errno.ENODATA:
                continue  # removed meanwhile
            notes.append(f"xattr {name} not read: {e.strerror}")
            acl_ok = acl_ok and name != ACL_ACCESS
            continue
        try:
            os.setxattr(dst, name, value, follow_symlinks=follow)
        except OSError as e:
            notes.append(f"{'POSIX ACL' if name in _ACL_NAMES else 'xattr'} {name} not kept: {e.strerror}")
            acl_ok = acl_ok and name != ACL_ACCESS
    for name in remove:
        try:
            os.removexattr(dst, name, follow_symlinks=follow)
        except OSError as e:
            if e.errno not in (errno.ENODATA, *_NO_XATTRS):
                notes.append(f"{name} the source has not, not removed: {e.strerror}")
    return acl_ok


def _acls_lacking(names: list[str]) -> list[str]:
    return [n for n in _ACL_NAMES if n not in names]


def _acl_group_rights(value: bytes) -> int | None:
    """Return the owning group's effective rights (0-7) under an ACL xattr value, or None."""
    group = mask = None
    for off in range(4, len(value) - 7, 8):
        tag, perm, _id = struct.unpack_from("<HHI", value, off)
        if tag == _ACL_GROUP_OBJ:
            group = perm & 7
        elif tag == _ACL_MASK:
            mask = perm & 7
    if group is None:
        return None
    return group if mask is None else group & mask


def _mode_without_acl(src, st: os.stat_result, follow=True) -> int:
    """The mode to give a copy that could not keep its source's access ACL (see the module doc)."""
    mode = stat.S_IMODE(st.st_mode)
    try:
        rights = _acl_group_rights(os.getxattr(src, ACL_ACCESS, follow_symlinks=follow))
    except OSError:
        rights = None
    if rights is None:
        return mode & ~0o070
    return mode & ~0o070 | rights << 3


def _mode(target, st: os.stat_result, created: int | None, acl_ok: bool, src, notes: list[str]) -> None:
    """Give ``target`` the mode of ``st`` exactly; note special bits the kernel would not set."""
    want = stat.S_IMODE(st.st_mode) if acl_ok else _mode_without_acl(src, st)
    if created != want:
        os.chmod(target, want)
        if want & (stat.S_ISUID | stat.S_ISGID) and not _AS_ROOT:
            # Without CAP_FSETID the kernel silently drops setgid for a group this user is not in.
            got = stat.S_IMODE(os.stat(target).st_mode)
            if got != want:
                notes.append(f"mode {want:04o} not kept (the target has {got:04o}): not allowed here")


def finish_file(sfd: int, tfd: int, st: os.stat_result, created_mode: int, info: DirInfo | None) -> list[str]:
    """Give temp file ``tfd`` the owner, attributes, ACLs, mode and times of source ``sfd`` (stat ``st``).

    ``created_mode`` is the mode ``tfd`` was created with (before the umask) and ``info`` what its
    directory gives new files (None: nothing special). Return what could not be kept.
    """
    notes: list[str] = []
    names = _names(sfd)
    if info is None:
        info = DirInfo(os.geteuid(), os.getegid(), False)
    inherited = info.default_acl
    owner = (info.uid, info.gid)
    if (st.st_uid, st.st_gid) != owner:
        _owner(tfd, st, owner, notes)
    remove = _acls_lacking(names) if inherited else ()
    acl_ok = _copy_xattrs(sfd, tfd, names, remove, notes) if names or inherited else True
    # A default ACL replaces the umask (and the new file's mode is masked by it): chmod always then.
    plain = not (inherited or names) and (st.st_uid, st.st_gid) == owner
    created = created_mode & ~_UMASK if plain else None
    _mode(tfd, st, created, acl_ok, sfd, notes)
    os.utime(tfd, ns=(st.st_atime_ns, st.st_mtime_ns))
    return notes


def _at(dir_fd: int, name: str) -> str:
    """A path to ``name`` in open directory ``dir_fd`` that resolves nothing but ``name`` itself.

    The xattr calls take no ``dir_fd``: /proc/self/fd/N leads to the very directory opened (it is
    not a path looked up again), and with ``follow_symlinks=False`` the last component is not
    followed either, so a directory swapped for a symlink since cannot redirect the call.
    """
    return f"/proc/self/fd/{dir_fd}/{name}"


def finish_symlink(sdir: int, name: str, tdir: int, tmp: str, st: os.stat_result) -> list[str]:
    """Give symlink ``tmp`` (in open directory ``tdir``) the owner, attributes and times of symlink
    ``name`` in open directory ``sdir`` (its lstat ``st``)."""
    notes: list[str] = []
    src, dst = _at(sdir, name), _at(tdir, tmp)
    _owner(dst, st, None, notes, follow=False)
    names = _names(src, follow=False)
    if names:
        _copy_xattrs(src, dst, names, (), notes, follow=False)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=tdir, follow_symlinks=False)
    return notes


def finish_dir(sfd: int, tfd: int, st: os.stat_result) -> list[str]:
    """Give open directory ``tfd`` the owner, attributes, ACLs, mode and times of open directory
    ``sfd`` (stat ``st`` taken before the transfer touched it: a move's deletions change the
    source's mtime). Both are descriptors: nothing is looked up by path."""
    notes: list[str] = []
    _owner(tfd, st, None, notes)
    names = _names(sfd)
    acl_ok = _copy_xattrs(sfd, tfd, names, _acls_lacking(names), notes)
    _mode(tfd, st, None, acl_ok, sfd, notes)
    os.utime(tfd, ns=(st.st_atime_ns, st.st_mtime_ns))
    return notes


def refresh(sdir: int, tdir: int, name: str) -> list[str]:
    """Give existing file ``name`` in open directory ``tdir``, verified to hold the bytes of ``name``
    in open directory ``sdir``, the source's metadata where it differs (nothing is touched where
    it is the same: its ctime stays). Return the misses."""
    notes: list[str] = []
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    sfd = os.open(name, flags, dir_fd=sdir)
    try:
        tfd = os.open(name, flags, dir_fd=tdir)
        try:
            st, tst = os.fstat(sfd), os.fstat(tfd)
            _owner(tfd, st, (tst.st_uid, tst.st_gid), notes)
            snames, tnames = _names(sfd), _names(tfd)
            differ = [n for n in snames if _value(tfd, n) != _value(sfd, n)]
            extra = [n for n in _ACL_NAMES if n in tnames and n not in snames]
            acl_ok = True
            if differ or extra:
                acl_ok = _copy_xattrs(sfd, tfd, differ, extra, notes)
            created = stat.S_IMODE(os.fstat(tfd).st_mode)
            _mode(tfd, st, created, acl_ok, sfd, notes)
            if tst.st_mtime_ns != st.st_mtime_ns:
                os.utime(tfd, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(tfd)
    finally:
        os.close(sfd)
    return notes


def _value(fd: int, name: str) -> bytes | None:
    try:
        return os.getxattr(fd, name)
    except OSError:
        return None
