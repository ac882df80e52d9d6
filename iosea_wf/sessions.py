"""What a session and its steps are called and how a session is shown: pure helpers the client shares.

They live apart from :mod:`iosea_wf.manager` and :mod:`iosea_wf.steps` (which re-export them), so
the CLI talking to the site's Workflow Manager service imports neither the store nor the site
model on every command.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import UsageError

SESSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_session_name(name: str | None) -> str:
    """Reject missing or unusable session names before anything is done."""
    if not name:
        raise UsageError("SESSION= is mandatory (e.g. SESSION=my-run)")
    if not SESSION_NAME.match(name):
        raise UsageError(
            f"invalid session name {name!r}: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_step_name(step: str | None) -> str:
    """Reject a missing STEP= or one that cannot be a step's name (the WDF's name rule)."""
    from .wdf.model import NAME_RULE, name_problem

    if not step:
        raise UsageError("STEP= is mandatory (e.g. STEP=step_A)")
    why = name_problem(step)
    if why is not None:
        raise UsageError(f"invalid step name {step!r} (STEP=): {why}; use {NAME_RULE}")
    return step


INTERRUPTED = "INTERRUPTED"


def dead_driver(record: dict[str, Any]) -> str | None:
    """The command a STARTING or STOPPING session waits on, when it died on this host (else None).

    A `start` records its pid and host, a `stop` its ``stopper``; another host's process cannot
    be checked from here, so it is taken as alive.
    """
    import os

    from .procs import alive

    if record.get("state") == "STARTING":
        who, what = {"pid": record.get("pid"), "host": record.get("host")}, "start"
    elif record.get("state") == "STOPPING":
        who, what = record.get("stopper") or {}, "stop"
    else:
        return None
    if not who.get("pid") or who.get("host") != os.uname().nodename or alive(who["pid"]):
        return None
    return f"its `{what}` (process {who['pid']} on {who['host']}) died"


def session_summary(record: dict[str, Any]) -> dict[str, Any]:
    """The public view of a session (what `status --json` and `list --json` print).

    A session whose `start` or `stop` died is shown INTERRUPTED, never STARTING or STOPPING
    forever: `iosea-wf stop` finishes it.
    """
    state, error = record["state"], record.get("error")
    dead = dead_driver(record)
    if dead:
        state = INTERRUPTED
        error = f"{dead}: `iosea-wf stop SESSION={record['name']}` cleans what it left"
    return {
        "session": record["name"],
        "workflow": record["workflow"],
        "owner": record["owner"],
        "state": state,
        "started_at": record["created_at"],
        "ended_at": record.get("ended_at"),
        "error": error,
        "services": [
            {
                "name": s["name"],
                "type": s["type"],
                "state": s["state"],
                "datanode": s["datanode"],
                "url": s["url"],
                "mountpoint": s["mountpoint"],
                "namespace": s["namespace"],
                "flavor": s["flavor"],
                "export_id": s.get("export_id"),
                # The Slurm job that holds the service's resources on its datanode.
                "allocation": s.get("allocation"),
                "error": s.get("error"),
            }
            for s in record["services"]
        ],
    }
