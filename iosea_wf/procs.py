"""Process helpers shared by the manager and the orchestrator."""

from __future__ import annotations

import contextlib


def alive(pid: int | None) -> bool:
    """True while a process exists and is not a zombie (PID 1 here reaps zombies slowly)."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@contextlib.contextmanager
def deferred_interrupts():
    """Hold SIGINT and SIGTERM off for a short critical section; raise Interrupted after it if one came.

    For what must not be cut in two (recording the jobs Slurm just accepted). Only in the main
    thread; elsewhere (a service's workers) no signal arrives anyway.
    """
    import signal
    import threading

    from .errors import Interrupted

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def note(signum, _frame):
        caught.append(signum)

    # A playbook run inside the section ends at once if a signal is already waiting here.
    note.caught = caught  # type: ignore[attr-defined]
    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        raise Interrupted(caught[0])
