"""Which runs have written into a target: the record that lets a mover remove only its own leftovers.

Every run draws a run id (16 hex digits) and names its temporary files with it
(``.<name>.iosea-tmp-<run id>-<n>``). Before it creates the first one, it records itself in
``<target>/.iosea-mover/run-<run id>`` (host, pid, the pid's start time), and it removes that
record when it ends having removed its own temporaries. A later run removes a temporary file
only when its run id has a record and that run is gone: it holds the target's lock (a lock dies
with its holder, kill -9 included), or the recorded process no longer exists on this host. So a
user's file that merely looks like a temporary, or a temporary of a mover still running (into
this target without a working lock, or into a directory above or below it), is never removed.
"""

from __future__ import annotations

import contextlib
import json
import os

from iosea_wf.mover.patterns import JOURNAL_DIR

_PREFIX = "run-"
_HOST = os.uname().nodename  # what socket.gethostname() returns, without importing socket


def new_run_id() -> str:
    """Return a fresh run id: 16 hex digits."""
    return os.urandom(8).hex()


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (field 22 of /proc/pid/stat), or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


class Runs:
    """The run records kept in a target's journal directory."""

    def __init__(self, target: str, run_id: str):
        self.dir = os.path.join(target, JOURNAL_DIR)
        self.run_id = run_id
        self.path = os.path.join(self.dir, _PREFIX + run_id)
        # The journal directory, opened beneath the target without following a symlink (set by
        # the engine once the journal has opened it): every record is read and written through it.
        self.dir_fd: int | None = None

    def record(self) -> None:
        """Record this run (before it creates any temporary file)."""
        me = {"host": _HOST, "pid": os.getpid(), "start": _start_time(os.getpid())}
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(_PREFIX + self.run_id, flags, 0o600, dir_fd=self.dir_fd)
        try:
            os.write(fd, json.dumps(me).encode())
        finally:
            os.close(fd)

    def dead(self, locked: bool) -> set[str]:
        """Return the ids of recorded runs other than this one that are gone.

        ``locked``: this run holds the target's exclusive lock, so no other run into it is alive.
        """
        found: set[str] = set()
        if self.dir_fd is None:
            return found
        try:
            names = os.listdir(self.dir_fd)
        except OSError:
            return found
        host = _HOST
        for name in names:
            run_id = name[len(_PREFIX) :]
            if not name.startswith(_PREFIX) or run_id == self.run_id:
                continue
            if locked:
                found.add(run_id)
                continue
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)
                with open(fd, "rb") as f:
                    rec = json.loads(f.read() or b"{}")
            except (OSError, ValueError):
                continue  # unreadable or half written: it may be alive, keep its files
            pid = rec.get("pid")
            if (
                rec.get("host") == host
                and isinstance(pid, int)
                and pid > 0
                and _start_time(pid) != rec.get("start")
            ):
                found.add(run_id)
        return found

    def forget(self, run_ids) -> None:
        """Remove the records of ``run_ids`` (their temporaries were removed) or this run's (None)."""
        if self.dir_fd is None:
            return
        for run_id in [self.run_id] if run_ids is None else run_ids:
            with contextlib.suppress(OSError):
                os.unlink(_PREFIX + run_id, dir_fd=self.dir_fd)
