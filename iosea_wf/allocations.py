"""Datanode resources held in Slurm: one allocation per ephemeral service, for the session's life.

Each service of a session holds a Slurm job on its datanode, named ``iosea.SESSION.svc.SERVICE``,
sized by its flavor (cores, memory), submitted as the session's owner (with their token through the
service), whose only content is ``sleep infinity``. Slurm, not our store, then decides whether a
datanode has room, and any other job sent to the datanodes partition sees those resources taken.

The export lives as long as its allocation: a start whose allocation Slurm does not run in time is
refused (ResourcesUnavailable); a service whose allocation ended (scancel by an administrator, time
limit, node failure) is torn down and recorded LOST by :func:`reap`, which the site's Workflow Manager
service calls for every live session every few seconds (:func:`watch`) and `status` calls for its own.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import slurm
from . import store as st
from .errors import ResourcesUnavailable

log = logging.getLogger("iosea_wf.allocations")

# How long a start waits for Slurm to run its allocations, from their submission. Slurm schedules
# one within about a second here; with the rollback that follows a refusal, the whole refused
# start ends within 10 s.
PENDING_LIMIT_S = 6.0
# How often the Workflow Manager service asks Slurm (one squeue) about the allocations it watches.
WATCH_EVERY_S = 3.0


def job_name(session: str, service: str) -> str:
    """The name of a service's allocation (``stop`` finds one nobody recorded by it)."""
    return f"iosea.{session}.svc.{service}"


def is_allocation_name(session: dict[str, Any], name: str) -> bool:
    """True when ``name`` is the allocation name of one of the session's services."""
    return any(name == job_name(session["name"], s["name"]) for s in session.get("services", []))


def recorded(session: dict[str, Any]) -> list[str]:
    """Job ids of the session's allocations, ended or not."""
    return [s["allocation"] for s in session.get("services", []) if s.get("allocation")]


def unended(session: dict[str, Any]) -> list[str]:
    """Job ids of the session's allocations not known to have ended."""
    return [
        s["allocation"]
        for s in session.get("services", [])
        if s.get("allocation") and s.get("allocation_state") not in slurm.TERMINAL_STATES
    ]


def hold(ctx, record: dict[str, Any], progress: Callable[[str], None]) -> float:
    """Submit an allocation per service of a STARTING session, each id recorded as sbatch returns it.

    Returns when the first was submitted (the start of the wait for them to run).
    """
    from .procs import deferred_interrupts

    site = ctx.site_of(record)
    who = slurm.acting_for(record["owner"], ctx.slurm_jwt)
    slurm.require_controller()  # exit 8 within seconds, not after sbatch's ~18 s of retries
    since = time.monotonic()
    for svc in record["services"]:
        res = svc["resources"]
        # Signals wait while an allocation Slurm accepted is recorded (under the lock): no
        # allocation of ours is ever untracked. One a kill -9 leaves unrecorded carries its name.
        with deferred_interrupts():
            job_id = slurm.submit_allocation(
                job_name(record["name"], svc["name"]),
                site.datanodes_partition,
                svc["datanode"],
                res["cores"],
                res["memory_mb"],
                who,
            )
            ctx.store.update_service(record["id"], svc["name"], allocation=job_id, allocation_state="PENDING")
        svc.update(allocation=job_id, allocation_state="PENDING")
    progress(
        f"session {record['name']}: Slurm allocation(s) "
        + ", ".join(f"{s['allocation']} ({s['name']} on {s['datanode']})" for s in record["services"])
    )
    return since


def wait_running(
    ctx,
    record: dict[str, Any],
    since: float,
    wait_s: float | None,
    progress: Callable[[str], None],
    keep_going: Callable[[], bool],
    poll: float = 0.2,
) -> None:
    """Return once every allocation of the session runs; ResourcesUnavailable when Slurm does not run them.

    ``wait_s``: how long they may stay pending (default :data:`PENDING_LIMIT_S`), from ``since``.
    """
    limit = PENDING_LIMIT_S if wait_s is None else wait_s
    deadline = since + limit
    by_id = {s["allocation"]: s for s in record["services"] if s.get("allocation")}
    said = False
    while True:
        states = slurm.job_states(list(by_id))
        pending = []
        for job_id, svc in by_id.items():
            js = states[job_id]
            if js.state in slurm.RUNNING_STATES:
                continue
            if js.terminal or js.state == slurm.UNKNOWN:
                raise ResourcesUnavailable(
                    f"session {record['name']}: the Slurm allocation {job_id} of service {svc['name']} "
                    f"on {svc['datanode']} ended before it ran: {js.state}"
                    + (f" ({js.reason})" if js.reason else "")
                )
            pending.append((svc, js))
        if not pending:
            return
        if not keep_going():
            return  # another command took the session over: it tears down
        if time.monotonic() >= deadline:
            raise ResourcesUnavailable(
                f"session {record['name']}: Slurm has no room for its services "
                f"(allocation(s) still pending after {limit:.0f} s)",
                details=[
                    f"service {svc['name']}: allocation {svc['allocation']} on {svc['datanode']} "
                    f"({svc['resources']['cores']} cores, {svc['resources']['memory_mb']} MB) "
                    f"is {js.state} ({js.reason or 'no reason given'})"
                    for svc, js in pending
                ]
                + ["`iosea-wf start --wait-resources DURATION` waits longer"],
            )
        if wait_s is not None and not said:
            svc, js = pending[0]
            progress(
                f"session {record['name']}: waiting up to {wait_s:.0f} s for Slurm to run its "
                f"allocation(s) (service {svc['name']} on {svc['datanode']}: {js.state} "
                f"{js.reason or ''})".rstrip()
            )
            said = True
        time.sleep(poll)


def release(ctx, record: dict[str, Any], names: set[str] | None = None) -> list[str]:
    """Cancel the unended allocations of the session (or of the services ``names``); return their ids.

    Those recorded, and those of the owner that carry their names (a start cut short between sbatch
    and its record).
    """
    mine = [s for s in record.get("services", []) if names is None or s["name"] in names]
    ids = [
        s["allocation"]
        for s in mine
        if s.get("allocation") and s.get("allocation_state") not in slurm.TERMINAL_STATES
    ]
    wanted = {job_name(record["name"], s["name"]) for s in mine}
    if wanted and slurm.controller_up():
        ids += [
            job_id
            for job_id, name, state in slurm.user_jobs(record["owner"])
            if name in wanted and state not in slurm.TERMINAL_STATES and job_id not in ids
        ]
    if ids:
        slurm.cancel(ids, slurm.acting_for(record["owner"], ctx.slurm_jwt))
    return ids


def ended(record: dict[str, Any], states: dict[str, slurm.JobState]) -> dict[str, str]:
    """{service: why} for the ACTIVE services of an ACTIVE session whose allocation has ended."""
    if record.get("state") != st.ACTIVE:
        return {}
    gone = {}
    for svc in record.get("services", []):
        js = states.get(svc.get("allocation") or "")
        if svc["state"] == "ACTIVE" and js is not None and js.terminal:
            gone[svc["name"]] = f"its Slurm allocation {svc['allocation']} ended: {js.state}"
    return gone


def watched(record: dict[str, Any]) -> list[str]:
    """Allocation ids of the ACTIVE services of an ACTIVE session (what can end under it)."""
    if record.get("state") != st.ACTIVE:
        return []
    return [
        s["allocation"] for s in record.get("services", []) if s["state"] == "ACTIVE" and s.get("allocation")
    ]


def reap(ctx, record: dict[str, Any], states: dict[str, slurm.JobState] | None = None) -> dict[str, Any]:
    """Tear down the services of ``record`` whose allocation ended, recorded LOST with why; return it.

    The services are claimed under the lock (ACTIVE -> LOST) before their exports are removed, so a
    service reaped by the Workflow Manager's watch and by a `status` at once is torn down once.
    """
    ids = watched(record)
    if not ids:
        return record
    if states is None:
        if not slurm.controller_up():
            return record
        states = slurm.job_states(ids)
    gone = ended(record, states)
    if not gone:
        return record
    with ctx.store.transaction() as tx:
        found = tx.sessions.get(st.Query().id == record["id"])
        if found is None:
            return record
        current = json.loads(json.dumps(found))
        claimed = ended(current, states)
        for svc in current["services"]:
            if svc["name"] in claimed:
                svc.update(
                    state="LOST", error=claimed[svc["name"]], allocation_state=states[svc["allocation"]].state
                )
        if claimed:
            current["updated_at"] = time.time()
            tx.put_session(current)
    if not claimed:
        return current
    log.info("session %s of %s: %s", current["name"], current["owner"], "; ".join(claimed.values()))
    failed = _remove_exports(ctx, current, set(claimed))
    with ctx.store.transaction() as tx:
        found = tx.sessions.get(st.Query().id == record["id"])
        current = json.loads(json.dumps(found))
        for svc in current["services"]:
            if svc["name"] in claimed and svc["name"] in failed:
                svc["error"] = (
                    f"{claimed[svc['name']]}; its export could not be removed: {failed[svc['name']]}"
                )
            elif svc["name"] in claimed:
                svc["export_removed"] = True
                tx.release(current["id"], svc["name"])
        tx.put_session(current)
    return current


def _remove_exports(ctx, record: dict[str, Any], names: set[str]) -> dict[str, str]:
    """Remove the exports of some services of a session (the stop playbook); {service: why} of failures."""
    from .manager import _orchestrator_services
    from .orchestrator import run_playbook
    from .site import site_path

    ident = f"{record['name']}-lost-{int(time.time())}-{record['id'][:6]}"
    try:
        result = run_playbook(
            "session_services",
            site_path=Path(record.get("site") or site_path(ctx.site_dir)),
            state_dir=ctx.store.state_dir,
            ident=ident,
            extravars={
                "iosea_action": "stop",
                "iosea_services": _orchestrator_services(record, sorted(names)),
            },
            verbose=ctx.verbose,
        )
    except Exception as exc:  # the next `stop` removes it: the watch must go on
        return {n: str(exc) for n in names}
    return {h: o.message for h, o in result.hosts.items() if not o.ok}


def watch_once(ctx_for: Callable[[str], Any], store: st.Store) -> int:
    """One round of the watch: one squeue for every live session's allocations; how many were reaped."""
    with store.transaction(shared=True) as tx:
        live = [dict(s) for s in tx.live_sessions() if watched(s)]
    ids = [j for s in live for j in watched(s)]
    if not ids or not slurm.controller_up():
        return 0
    states = slurm.job_states(ids)
    reaped = 0
    for record in live:
        if ended(record, states):
            reap(ctx_for(record["owner"]), record, states)
            reaped += 1
    return reaped


def watch(
    ctx_for: Callable[[str], Any], store: st.Store, stop: threading.Event, every: float = WATCH_EVERY_S
):
    """Until ``stop`` is set, :func:`watch_once` every ``every`` seconds (a failed round is logged)."""
    while not stop.wait(every):
        try:
            watch_once(ctx_for, store)
        except Exception:  # one bad round (Slurm, the store) must not end the watch
            log.exception("watching the sessions' Slurm allocations")
