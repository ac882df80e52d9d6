"""Process helpers shared by the manager and the orchestrator."""

from __future__ import annotations


def alive(pid: int | None) -> bool:
    """True while a process exists and is not a zombie (PID 1 here reaps zombies slowly)."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
