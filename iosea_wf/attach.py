"""Attach a session's services inside a job, then run the job's own command.

The local site attaches services by bind-mounting each service's namespace at its WDF mountpoint
in a private mount namespace of the job (read-only for ``RO``), since this kernel has no NFS
client. A generated batch script runs::

    python -m iosea_wf.attach --bind NAMESPACE:MOUNTPOINT:ro ... -- COMMAND ARGS...

Run as root, it makes a private mount namespace (``unshare(CLONE_NEWNS)``), mounts, and runs the
command. Run as any other user (every real user's job) it makes a user namespace with a mount
namespace in which the user is root (uid 0 maps to the user's uid, nothing else is mapped), mounts
there, then enters a nested user namespace that maps the user's own uid and gid back, so the
command sees ``id -u`` as the user and the files it writes are the user's. In that nested
namespace the command has no capability over the mounts: it cannot unmount or remount an ``RO``
service read-write. Supplementary groups are not kept (the kernel allows no mapping for them).

A mountpoint that does not exist is never created on the host (it would stay there after the
session): a tmpfs is mounted over its nearest existing ancestor inside the job's namespace only,
every entry the ancestor had is bound back onto that tmpfs, so the job still sees (and reaches,
with its usual rights) what the ancestor holds, and the mountpoint is made in that tmpfs.
Limits of that case: the ancestor itself appears as the user's tmpfs (its mode is copied, not its
owner), entries others create in it during the job are not seen, and ``/`` is never covered. The
user must be able to list the ancestor.

With ``--nfs URL:MOUNTPOINT:MODE`` (the site's ``nfs`` method) the job's I/O goes through the
service's NFS server instead: before any namespace is made, the user's own FUSE NFS client
(:mod:`iosea_wf.nfsfuse`, as the user, with the setuid ``fusermount3``: inside a user namespace
it would not help) mounts the export on a private directory the user owns under ``$TMPDIR`` (or
``/tmp``), read-only for ``RO``; that mount is then bound at the mountpoint in the job's namespace
like a ``--bind`` source. This process then stays as the job's parent: it forwards SIGTERM, SIGHUP,
SIGUSR1 and SIGUSR2 to the command, and when the command ends it unmounts (the FUSE client then
exits), removes the private directory and exits with the command's status. A mount that does
not appear within the timeout, or a client that exits first (server down, export refusing the
user), fails the job before its command runs, with the client's reason.

How a site attaches is its ``iosea_service_attach`` setting (``bind``, ``nfs`` or ``env``), not
code here.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_RELATIME = 0x200000
# statvfs f_flag bits -> the mount flags a remount inside a user namespace must keep (the kernel
# refuses to clear flags that a more privileged namespace set: they are "locked").
_KEPT_FLAGS = {
    os.ST_NOSUID: MS_NOSUID,
    os.ST_NODEV: MS_NODEV,
    os.ST_NOEXEC: MS_NOEXEC,
    os.ST_NOATIME: MS_NOATIME,
    os.ST_NODIRATIME: MS_NODIRATIME,
    os.ST_RELATIME: MS_RELATIME,
}

_libc = ctypes.CDLL(None, use_errno=True)


class AttachError(Exception):
    """Raised when a service cannot be attached inside the job (the job then fails)."""


def _call(rc: int, what: str) -> None:
    if rc != 0:
        raise AttachError(f"{what}: {os.strerror(ctypes.get_errno())}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = [None if v is None else os.fsencode(v) for v in (source, target, fstype, data)]
    _call(_libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {target}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


def _enter_namespaces() -> tuple[int, int] | None:
    """A private mount namespace (and, for a non-root user, a user namespace it is root in).

    Returns the (uid, gid) to map back to before running the command, None for root.
    """
    uid, gid = os.getuid(), os.getgid()
    if os.geteuid() == 0:
        _call(_libc.unshare(CLONE_NEWNS), "unshare the mount namespace")
        back = None
    else:
        _call(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS), "unshare user and mount namespaces")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"0 {uid} 1")
        _write("/proc/self/gid_map", f"0 {gid} 1")
        back = (uid, gid)
    # Nothing mounted here may reach the parent namespace.
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    return back


def _map_back(uid: int, gid: int) -> None:
    """Enter a nested user namespace where this process is the user again (uid, gid)."""
    _call(_libc.unshare(CLONE_NEWUSER), "unshare the nested user namespace")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} 0 1")
    _write("/proc/self/gid_map", f"{gid} 0 1")


def _cover_keeping_entries(ancestor: str) -> None:
    """Mount a tmpfs over ``ancestor`` and bind each of its former entries back onto it."""
    try:
        names = os.listdir(ancestor)
        mode = os.stat(ancestor).st_mode & 0o7777
    except OSError as exc:
        raise AttachError(f"cannot list {ancestor} to cover it: {exc.strerror}") from None
    # The covered directory stays reachable through this descriptor (/proc/self/fd/N/...).
    fd = os.open(ancestor, os.O_PATH | os.O_DIRECTORY)
    try:
        _mount("tmpfs", ancestor, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode:o}")
        for name in names:
            source = f"/proc/self/fd/{fd}/{name}"
            target = os.path.join(ancestor, name)
            if os.path.islink(source):
                os.symlink(os.readlink(source), target)
                continue
            if os.path.isdir(source):
                os.mkdir(target)
            else:
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            _mount(source, target, None, MS_BIND | MS_REC)
    finally:
        os.close(fd)


def _prepare_mountpoint(target: str) -> None:
    """Make ``target`` a directory in the job's namespace only: nothing is created on the host.

    A directory made with mkdir would outlive the job on the host (a mount namespace separates
    mounts, not directory entries), so a missing mountpoint is made in a tmpfs that covers its
    nearest existing ancestor, in this namespace only.
    """
    if os.path.isdir(target):
        return
    if os.path.lexists(target):
        raise AttachError(f"{target} exists and is not a directory")
    ancestor = os.path.dirname(target)
    while not os.path.isdir(ancestor):
        if os.path.lexists(ancestor):
            raise AttachError(f"{ancestor} exists and is not a directory")
        ancestor = os.path.dirname(ancestor)
    if ancestor == "/":
        raise AttachError(f"cannot create {target}: / is never covered, and {target} would stay on the host")
    _cover_keeping_entries(ancestor)
    os.makedirs(target)


def _bind(source: str, target: str, mode: str) -> None:
    _prepare_mountpoint(target)
    _mount(source, target, None, MS_BIND | MS_REC)
    if mode == "ro":
        # A bind mount only becomes read-only through a remount, which must keep locked flags.
        kept = os.statvfs(target).f_flag
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for bit, flag in _KEPT_FLAGS.items():
            if kept & bit:
                flags |= flag
        _mount(None, target, None, flags)


class NfsMount:
    """The user's FUSE mount of one NFS export, on a private directory outside every namespace."""

    def __init__(self, url: str, mode: str, timeout: float) -> None:
        self.url = url
        self.base = tempfile.mkdtemp(prefix="iosea-wf-nfs.")
        self.path = os.path.join(self.base, "mnt")
        os.mkdir(self.path, 0o700)
        self.log = os.path.join(self.base, "client.log")
        argv = [sys.executable, "-m", "iosea_wf.nfsfuse", url, self.path, "--timeout", str(timeout)]
        if mode == "ro":
            argv.append("--ro")
        with open(self.log, "wb") as log:
            # Its own session: a terminal's Ctrl-C reaches the command, never the mount under it.
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )

    def mounted(self) -> bool:
        """True while the mount is in this process's mount table (read without touching FUSE)."""
        with open("/proc/self/mountinfo", "rb") as fh:
            for line in fh:
                field = line.split(b" ")[4].decode("unicode_escape", errors="replace")
                if field == self.path:
                    return True
        return False

    def reason(self) -> str:
        """What the client said (its last lines), or its exit status."""
        try:
            with open(self.log, errors="replace") as fh:
                lines = [ln.strip() for ln in fh if ln.strip()]
        except OSError:
            lines = []
        if lines:
            return " / ".join(lines[-3:])
        code = self.proc.poll()
        return f"the NFS client exited with status {code}" if code is not None else "no answer"

    def wait_ready(self, timeout: float) -> None:
        """Return once mounted; AttachError if the client exits first or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while not self.mounted():
            if self.proc.poll() is not None:
                raise AttachError(self.reason())
            if time.monotonic() > deadline:
                raise AttachError(f"the export was not mounted within {timeout:g} s ({self.reason()})")
            time.sleep(0.02)

    def stop(self) -> list[str]:
        """Unmount (the client then exits), make sure the client is gone; return what went wrong.

        Unmounting is what ends a FUSE daemon for sure: a signal may land in a thread of the NFS
        client's runtime, where libfuse's handler marks the loop done but wakes none of its
        threads. Data the job wrote is already sent: every file is flushed when it is closed.
        """
        problems = []
        if self.mounted():
            done = _unmount(self.path, lazy=False)
            if done.returncode != 0 and self.mounted():
                # Busy (a process of this host has its cwd in it): detach it now, it goes when freed.
                done = _unmount(self.path, lazy=True)
                if done.returncode != 0 and self.mounted():
                    problems.append(f"cannot unmount {self.path}: {done.stderr.strip()}")
        for sig, wait in ((None, 10), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            if sig is not None and self.proc.poll() is None:
                self.proc.send_signal(sig)
                if sig == signal.SIGKILL:
                    problems.append("the NFS client did not stop after its unmount and was killed")
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        if not self.mounted():
            shutil.rmtree(self.base, ignore_errors=True)
        return problems


def _unmount(path: str, lazy: bool) -> subprocess.CompletedProcess:
    argv = [_fusermount(), "-u", *(["-z"] if lazy else []), path]
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(argv, 1, "", str(exc))


def describe(url: str) -> str:
    """``host:/path (port N)`` of a service's nfs:// URL, for messages (no query)."""
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    port = f" (port {query['nfsport']})" if "nfsport" in query else ""
    return f"{parts.hostname}:{urllib.parse.unquote(parts.path)}{port}"


def _fusermount() -> str:
    return shutil.which("fusermount3") or "/usr/bin/fusermount3"


def _run_child(binds: list[tuple[str, str, str]], command: list[str]) -> None:
    """In the forked child: make the namespaces, attach, map back and exec (never returns)."""
    try:
        back = _enter_namespaces()
    except (OSError, AttachError) as exc:
        print(f"iosea_wf.attach: cannot make the job's namespaces: {exc}", file=sys.stderr)
        os._exit(1)
    for source, target, mode, label in binds:
        try:
            _bind(source, target, mode)
        except (OSError, AttachError) as exc:
            print(f"iosea_wf.attach: cannot attach {label} at {target}: {exc}", file=sys.stderr)
            os._exit(1)
    if back is not None:
        try:
            _map_back(*back)
        except (OSError, AttachError) as exc:
            print(f"iosea_wf.attach: cannot map the job back to its user: {exc}", file=sys.stderr)
            os._exit(1)
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"iosea_wf.attach: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
    os._exit(127)


_FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


class _Interrupted(Exception):
    """A forwarded signal arrived before the command was started."""


def _run_with_mounts(
    nfs: list[tuple[str, str, str]], binds: list[tuple[str, str, str]], command: list[str], timeout: float
) -> int:
    """Mount every NFS export as the user, run the command in its namespaces, then unmount.

    Returns the command's exit status (128+N for a signal), or 1 if attaching or cleaning failed.
    """
    mounts: list[NfsMount] = []

    def interrupted(signum, _frame):
        raise _Interrupted(signum)

    # Cancelled while mounting (before the command runs): what was mounted is unmounted all the same.
    for sig in _FORWARDED:
        signal.signal(sig, interrupted)
    try:
        status = _attach_and_run(nfs, binds, command, timeout, mounts)
    except _Interrupted as exc:
        print(f"iosea_wf.attach: interrupted by signal {exc.args[0]} while attaching", file=sys.stderr)
        status = 128 + exc.args[0]
    finally:
        problems = [p for mount in mounts for p in mount.stop()]
    for problem in problems:
        print(f"iosea_wf.attach: {problem}", file=sys.stderr)
    return status or (1 if problems else 0)


def _attach_and_run(nfs, binds, command, timeout: float, mounts: list[NfsMount]) -> int:
    """Mount each export (appending to ``mounts``), then fork the command into its namespaces."""
    for url, target, mode in nfs:
        where = f"the NFS export {describe(url)}"
        try:
            mount = NfsMount(url, mode, timeout)
        except OSError as exc:
            print(f"iosea_wf.attach: cannot start the NFS client of {where}: {exc}", file=sys.stderr)
            return 1
        mounts.append(mount)
        try:
            mount.wait_ready(timeout + 10)
        except AttachError as exc:
            print(f"iosea_wf.attach: cannot attach {where} at {target}: {exc}", file=sys.stderr)
            return 1
        binds.append((mount.path, target, mode, where))
    pid = os.fork()
    if pid == 0:
        for sig in _FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        _run_child(binds, command)

    def forward(signum, _frame):
        os.kill(pid, signum)

    for sig in _FORWARDED:
        signal.signal(sig, forward)
    # A terminal's Ctrl-C reaches the command itself (same process group): not forwarded twice.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _, raw = os.waitpid(pid, 0)  # PEP 475: retried after a forwarded signal
    status = os.waitstatus_to_exitcode(raw)
    return 128 - status if status < 0 else status


def main(argv: list[str] | None = None) -> int:
    """Bind every ``--bind SRC:DST:MODE``, mount every ``--nfs URL:DST:MODE``, then run the command."""
    parser = argparse.ArgumentParser(prog="iosea_wf.attach", description=__doc__)
    parser.add_argument("--bind", action="append", default=[], metavar="SRC:DST:ro|rw")
    parser.add_argument("--nfs", action="append", default=[], metavar="URL:DST:ro|rw")
    parser.add_argument(
        "--nfs-timeout", type=float, default=30.0, help="seconds an NFS RPC or the mount may wait"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("iosea_wf.attach: no command to run", file=sys.stderr)
        return 2
    binds = [(*spec.rsplit(":", 2), spec.rsplit(":", 2)[0]) for spec in args.bind]
    if args.nfs:
        nfs = [tuple(spec.rsplit(":", 2)) for spec in args.nfs]
        return _run_with_mounts(nfs, binds, command, args.nfs_timeout)
    try:
        back = _enter_namespaces() if binds else None
    except (OSError, AttachError) as exc:
        print(f"iosea_wf.attach: cannot make the job's namespaces: {exc}", file=sys.stderr)
        return 1
    for source, target, mode, _label in binds:
        try:
            _bind(source, target, mode)
        except (OSError, AttachError) as exc:
            print(f"iosea_wf.attach: cannot attach {source} at {target}: {exc}", file=sys.stderr)
            return 1
    if back is not None:
        try:
            _map_back(*back)
        except (OSError, AttachError) as exc:
            print(f"iosea_wf.attach: cannot map the job back to its user: {exc}", file=sys.stderr)
            return 1
    os.execvp(command[0], command)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
