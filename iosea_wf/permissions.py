"""What a Unix user may do with a path, judged by the kernel for that user, not for this process.

The orchestrator runs as the user today; a later site service runs it as root on behalf of every
user. Root's own ``os.access`` says yes to nearly everything, so for another user the question is
asked in a child process that has taken that user's uid, gid and supplementary groups: the kernel
then applies mode bits, ACLs, mount options (``ro``) and the traversal of every parent directory
exactly as it will for the user's jobs.
"""

from __future__ import annotations

import os
import pwd

from .errors import IoseaError, SiteError

# "r": list and enter a directory (or read a file); "w": also create and remove entries in it;
# "x": run a file (every directory to it searchable, symlinks followed).
_FLAGS = {"r": os.R_OK | os.X_OK, "w": os.R_OK | os.W_OK | os.X_OK, "x": os.X_OK}


def user_may(user: str, path: str, mode: str) -> bool:
    """True when Unix user ``user`` may use ``path`` for ``mode`` ("r", "w" or "x")."""
    if mode not in _FLAGS:
        raise ValueError(f"mode must be 'r', 'w' or 'x', got {mode!r}")
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise SiteError(f"user {user!r} is not known on this host (getpwnam)") from None
    if entry.pw_uid == 0:
        return True
    flags = _FLAGS[mode]
    if os.geteuid() == entry.pw_uid and os.getuid() == entry.pw_uid:
        # os.access checks the real uid and gids, which are this very user's.
        return os.access(path, flags)
    if os.geteuid() != 0:
        # The Workflow Manager's own account: its privileged helper asks the kernel as the user.
        try:
            return bool(_ask_helper(user, mode, path).get("may"))
        except IoseaError as exc:
            raise SiteError(
                f"cannot check the permissions of user {user!r} while running as uid {os.geteuid()}: {exc}"
            ) from None
    groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
    return _as_user(entry.pw_uid, entry.pw_gid, groups, path, flags)


def _as_user(uid: int, gid: int, groups: list[int], path: str, flags: int) -> bool:
    """Ask the kernel in a child that has become (uid, gid, groups); the parent keeps root."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports by exit status only
        try:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            os._exit(0 if os.access(path, flags) else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 2:
        raise SiteError(f"cannot take the identity of uid {uid} to check {path}")
    return code == 0


def resolve(user: str, path: str) -> tuple[str, bool]:
    """(realpath, is a directory) of ``path`` as ``user`` resolves it.

    Root and the user themselves resolve it directly. The Workflow Manager's own account cannot
    enter a user's 0700 directories: its privileged helper resolves it as the user.
    """
    if os.geteuid() == 0 or user == _own_name():
        real = os.path.realpath(path)
        return real, os.path.isdir(real)
    try:
        answer = _ask_helper(user, "r", path)
    except IoseaError as exc:
        raise SiteError(f"cannot resolve {path} as user {user!r}: {exc}") from None
    return str(answer.get("realpath") or path), bool(answer.get("is_dir"))


def _ask_helper(user: str, mode: str, path: str) -> dict:
    """The may-use helper's answer (as root, for ``user``): asked anew each time, never kept.

    (A kept answer outlives a chmod: a namespace closed a second ago must be refused now.)
    """
    from . import privileged

    return privileged.call("may-use", ["--user", user, "--mode", mode, "--path", path])


def _own_name() -> str | None:
    """This process's user name (None for a uid without one)."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return None
