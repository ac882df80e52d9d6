"""The workflow manager: the design note's rules for each command, with no printing.

Each public function takes a :class:`Context` (who, which site, which store) and returns data
the CLI prints. Progress is reported through an optional callback. Errors are
:class:`~iosea_wf.errors.IoseaError` subclasses carrying their exit code.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import store as st
from .errors import (
    IoseaError,
    OrchestrationError,
    ResourcesUnavailable,
    SessionConflict,
    SessionNotFound,
    UsageError,
)
from .identity import current_user
from .procs import alive
from .site import Site, load_site, site_path

Progress = Callable[[str], None]

SESSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
BUILTIN_VARIABLES = ("SESSION", "USER", "WORKFLOW", "STEP")


@dataclass
class Context:
    """Who runs the command, against which site and which store."""

    site_dir: str | None = None
    state_dir: str | None = None
    user: str = field(default_factory=current_user)
    verbose: bool = False
    # The caller's Slurm token (scontrol token) for work done on their behalf: never logged or stored.
    slurm_jwt: str | None = field(default=None, repr=False)
    # Files the caller read with their own rights and sent (a step's batch script, by the name the
    # WDF gives it): a service never reads a user's files itself.
    sent_files: dict[str, bytes] = field(default_factory=dict, repr=False)
    _site: Site | None = None
    _store: st.Store | None = None

    @property
    def site(self) -> Site:
        """The site inventory, loaded once."""
        if self._site is None:
            self._site = load_site(self.site_dir)
        return self._site

    def site_of(self, session: dict[str, Any]) -> Site:
        """The site a session was started on: its snapshot, so `run` need not read the inventory."""
        if session.get("site_snapshot"):
            return Site.from_dict(session["site_snapshot"])
        return self.site

    @property
    def store(self) -> st.Store:
        """The session store, opened once."""
        if self._store is None:
            self._store = st.Store(self.state_dir)
        return self._store


def _quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------
# validate / show


def wdf_variables(
    user: str, workflow_path: str, session: str | None, given: dict[str, str]
) -> dict[str, str]:
    """The variables a WDF sees: the built-ins, then those given on the command line.

    A value from the command line is data: one holding ``{{``, ``{%`` or ``{#`` is refused, as in
    the WDF itself (STEP is built in too, but only inside a step: see wdf.load).
    """
    from .wdf import SESSION_PLACEHOLDER
    from .wdf.variables import template_opener

    clash = sorted(set(given) & set(BUILTIN_VARIABLES))
    if clash:
        raise UsageError(f"{', '.join(clash)} is built in and cannot be given as a variable")
    for name, value in {"WORKFLOW": workflow_path, "SESSION": session or "", **given}.items():
        opener = template_opener(str(value))
        if opener is not None:
            raise UsageError(
                f"variable {name}: its value contains {opener!r}; a value given on the command line "
                "is data, never a template"
            )
    values = {"USER": user, "WORKFLOW": workflow_path, "SESSION": session or SESSION_PLACEHOLDER}
    values.update(given)
    return values


def validate(
    ctx: Context,
    workflow_path: str,
    variables: dict[str, str],
    session: str | None = None,
    *,
    text: str | None = None,
):
    """Load and validate a WDF against the site; return the Workflow or raise WDFError.

    ``text`` is the WDF as the caller read it (``workflow_path`` then only names it).
    """
    from .wdf import load_wdf

    if session:
        check_session_name(session)
    return load_wdf(
        workflow_path,
        wdf_variables(ctx.user, workflow_path, session, variables),
        ctx.site,
        owner=ctx.user,
        text=text,
    )


def show(ctx: Context, what: str) -> list[dict[str, Any]]:
    """What the site offers: ``locations``, ``flavors`` or ``tiers``."""
    return ctx.site.describe(what)


# ---------------------------------------------------------------------------------------------
# start


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


def _export_identity(user: str, session: str, session_id: str, service: str) -> tuple[str, int]:
    """A file-safe export key and a preferred NFS export id derived from who/what, not a counter.

    The session id is part of the key so two state dirs holding the same user and session name
    still get distinct exports.
    """
    digest = hashlib.sha256(f"{user}\0{session}\0{service}\0{session_id}".encode()).hexdigest()
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{user}.{session}.{service}")
    return f"{safe}.{digest[:12]}", 1000 + int(digest[:8], 16) % 60000


def _needed_resources(site: Site, service) -> dict[str, Any]:
    flavor = site.flavors[service.flavor]
    storage_gb = flavor.storage_gb
    if service.storagesize_bytes is not None:
        storage_gb = max(storage_gb, math.ceil(service.storagesize_bytes / 10**9))
    return {
        "flavor": flavor.name,
        "cores": flavor.cores,
        "memory_mb": flavor.memory_mb,
        "storage_gb": storage_gb,
    }


def _service_modules(workflow, service_name: str) -> set[str]:
    modules: set[str] = set()
    for step in workflow.steps.values():
        if any(s.name == service_name for s in step.services):
            modules.update(step.location)
    return modules


def place_services(site: Site, workflow, used_on: Callable[[str], dict[str, int]]) -> list[tuple]:
    """(service, datanode, resources) for every service, given what each datanode already uses.

    Pure: ``used_on(datanode)`` says what is allocated there; ResourcesUnavailable if one fits
    nowhere. start calls it under the store lock; the property tests call it with nothing used.
    """
    planned: dict[str, dict[str, int]] = {}  # datanode -> extra use planned in this start
    placements = []
    for service in workflow.services.values():
        need = _needed_resources(site, service)
        modules = _service_modules(workflow, service.name)
        # `datanodes` is a count (validated: 1 for the types offered today), not a choice of names.
        candidates = [d for d in site.datanodes.values() if modules <= set(d.modules)]
        if not candidates:
            raise ResourcesUnavailable(
                f"service {service.name}: no datanode serves the module(s) {', '.join(sorted(modules))}"
            )
        best, shortfalls = None, []
        for d in candidates:
            used = used_on(d.name)
            extra = planned.get(d.name, {"cores": 0, "memory_mb": 0, "storage_gb": 0})
            free = {
                "cores": d.cores - used["cores"] - extra["cores"],
                "memory_mb": d.memory_mb - used["memory_mb"] - extra["memory_mb"],
                "storage_gb": d.storage_gb - used["storage_gb"] - extra["storage_gb"],
            }
            missing = [f"{need[k] - free[k]} {unit} more" for k, unit in _UNITS if need[k] > free[k]]
            if missing:
                shortfalls.append(f"{d.name} needs {', '.join(missing)}")
            elif best is None or free["cores"] > best[1]["cores"]:
                best = (d, free)
        if best is None:
            raise ResourcesUnavailable(
                f"service {service.name} (flavor {need['flavor']}: {need['cores']} cores, "
                f"{need['memory_mb']} MB, {need['storage_gb']} GB) fits on no datanode",
                details=shortfalls,
            )
        datanode = best[0]
        extra = planned.setdefault(datanode.name, {"cores": 0, "memory_mb": 0, "storage_gb": 0})
        for k, _unit in _UNITS:
            extra[k] += need[k]
        placements.append((service, datanode, need))
    return placements


def _place_services(tx: st.Transaction, site: Site, workflow, session_id: str, user: str, session: str):
    """Choose a datanode per service and allocate its resources, all or nothing (under the lock)."""
    placements = place_services(site, workflow, tx.used_on)
    for service, datanode, need in placements:
        tx.allocate(
            {
                "datanode": datanode.name,
                "session_id": session_id,
                "owner": user,
                "session": session,
                "service": service.name,
                "cores": need["cores"],
                "memory_mb": need["memory_mb"],
                "storage_gb": need["storage_gb"],
                "allocated_at": time.time(),
            }
        )
    return placements


_UNITS = (("cores", "cores"), ("memory_mb", "MB"), ("storage_gb", "GB"))


def _nfs_url(address: str, path: str, port: int | None, mount_port: int | None) -> str:
    """A libnfs URL: ``nfs://HOST/PATH``, non-default ports as ``?nfsport=N&mountport=M``."""
    url = f"nfs://{address}{path}"
    params = []
    if port and port != 2049:
        params.append(f"nfsport={port}")
    if mount_port:
        params.append(f"mountport={mount_port}")
    return url + ("?" + "&".join(params) if params and port != 2049 else "")


def _service_record(site: Site, user: str, session: str, session_id: str, service, datanode, need) -> dict:
    key, export_id = _export_identity(user, session, session_id, service.name)
    hv = datanode.hostvars
    port, mount_port = hv.get("nfs_ganesha_port"), hv.get("nfs_ganesha_mount_port")
    # The export is of what the namespace resolved to at validation, never of a symlink.
    namespace = os.path.realpath(service.namespace)
    return {
        "name": service.name,
        "type": service.type,
        "state": "PROVISIONING",
        "datanode": datanode.name,
        "address": datanode.address,
        "namespace": namespace,
        "mountpoint": service.mountpoint,
        "flavor": need["flavor"],
        "resources": {k: need[k] for k, _ in _UNITS},
        "export_key": key,
        "export_id": export_id,
        # The export key carries the session id: two state dirs never share a pseudo path.
        "pseudo": f"/iosea/{user}/{key}",
        "port": port,
        "mount_port": mount_port,
        "url": _nfs_url(datanode.address, namespace, port, mount_port),
        "error": None,
    }


def session_record(
    site: Site, workflow, workflow_path: str, user: str, name: str, session_id: str, placements, now: float
) -> dict[str, Any]:
    """The record start stores for a new session (state STARTING), from its placements. Pure."""
    return {
        "id": session_id,
        "name": name,
        "owner": user,
        "workflow": workflow.name,
        "wdf_path": str(Path(workflow_path).resolve()),
        "wdf": workflow.to_dict(),
        "site": str(site.path),
        "site_snapshot": site.to_dict(),
        "state": st.STARTING,
        "pid": os.getpid(),
        "host": os.uname().nodename,
        "created_at": now,
        "updated_at": now,
        "services": [_service_record(site, user, name, session_id, s, d, n) for s, d, n in placements],
        "steps": [],
        "runs": [],
        "error": None,
        "resources_left": True,
    }


def _export_access(session: dict[str, Any]) -> dict[str, str]:
    """Per service, how NFS exports it: RW if any step uses it RW, else RO (no client may write)."""
    from .wdf import Workflow

    access = {s["name"]: "RO" for s in session["services"]}
    for step in Workflow.from_dict(session["wdf"]).steps.values():
        for use in step.services:
            if use.mode == "RW" and use.name in access:
                access[use.name] = "RW"
    return access


def _orchestrator_services(session: dict[str, Any], names: list[str] | None = None) -> list[dict[str, Any]]:
    """The service dicts the session_services playbook receives."""
    access = _export_access(session)
    clients = list(session.get("site_snapshot", {}).get("nfs_clients", []))
    return [
        {
            "name": s["name"],
            "type": s["type"],
            "datanode": s["datanode"],
            "session": session["name"],
            "owner": session["owner"],
            "namespace": s["namespace"],
            "export_key": s["export_key"],
            "export_id": s["export_id"],
            "pseudo": s["pseudo"],
            "access": access[s["name"]],
            "clients": clients,
        }
        for s in session["services"]
        if names is None or s["name"] in names
    ]


def start(
    ctx: Context,
    workflow_path: str | None,
    session: str | None,
    variables: dict[str, str],
    progress: Progress = _quiet,
    *,
    text: str | None = None,
    resolved: str | None = None,
) -> dict[str, Any]:
    """Validate the WDF, record the session and provision every ephemeral service; return the session.

    ``text`` and ``resolved`` are the WDF as the caller read it and its absolute path there.
    """
    if not workflow_path:
        raise UsageError("WORKFLOW= is mandatory (the Workflow Description File, e.g. WORKFLOW=wdf.yaml)")
    name = check_session_name(session)
    workflow = validate(ctx, workflow_path, variables, session=name, text=text)
    site = ctx.site
    session_id = st.new_session_id()
    now = time.time()

    with ctx.store.transaction() as tx:
        existing = tx.session(ctx.user, name, live_only=True)
        if existing:
            raise SessionConflict(
                f"session {name!r} already exists for user {ctx.user} (state {existing['state']}); "
                "stop it first or choose another name"
            )
        wanted = {os.path.realpath(s.namespace): s.name for s in workflow.services.values()}
        for other in tx.live_sessions():
            for svc in other.get("services", []):
                if svc["namespace"] in wanted:
                    raise SessionConflict(
                        f"namespace {svc['namespace']} of service {wanted[svc['namespace']]} "
                        "is already served "
                        f"by session {other['name']!r} of {other['owner']} (service {svc['name']})"
                    )
        placements = _place_services(tx, site, workflow, session_id, ctx.user, name)
        record = session_record(
            site, workflow, resolved or workflow_path, ctx.user, name, session_id, placements, now
        )
        tx.put_session(record)

    if not record["services"]:
        progress(f"session {name}: no ephemeral service to start")
        return ctx.store.update_session(session_id, state=st.ACTIVE, pid=None, resources_left=False)

    progress(f"session {name}: starting {len(record['services'])} service(s)")
    ready: dict[str, dict[str, Any]] = {}

    def on_event(host: str, kind: str, data: dict[str, Any]) -> None:
        if kind == "ready":
            ready[host] = data
            svc = next((s for s in record["services"] if s["name"] == host), None)
            where = f" on {svc['datanode']}: {svc['url']}" if svc else ""
            progress(f"  {host}: ready{where}")
        else:
            progress(f"  {host}: {kind}: {data.get('msg')}")

    ident = f"{name}-start-{int(now)}-{session_id[:6]}"
    ctx.store.update_session(session_id, start_run=ident)
    try:
        result = _run_services(ctx, record, "start", ident, on_event)
    except BaseException:
        # Interrupted: tear down what may exist, then re-raise (Ctrl-C, or an orchestration crash).
        _teardown(ctx, ctx.store.update_session(session_id, state=st.STOPPING), progress, final=st.FAILED)
        raise
    failed = {h: o.message for h, o in result.hosts.items() if not o.ok}
    for svc in record["services"]:
        if svc["name"] not in ready and svc["name"] not in failed:
            failed[svc["name"]] = "did not report ready"
    if failed:
        for svc_name, msg in failed.items():
            if svc_name in {s["name"] for s in record["services"]}:
                ctx.store.update_service(session_id, svc_name, state="FAILED", error=msg)
        error = "; ".join(f"service {n}: {m}" for n, m in failed.items())
        progress(f"session {name}: rolling back")
        record = ctx.store.update_session(session_id, state=st.STOPPING, error=error, runs=[result.artifacts])
        _teardown(ctx, record, progress, final=st.FAILED)
        raise OrchestrationError(
            f"session {name} failed to start; everything it started was torn down",
            details=[f"service {n}: {m}" for n, m in failed.items()],
        )
    for svc_name, info in ready.items():
        changes = {"state": "ACTIVE"}
        if isinstance(info, dict) and info.get("export_id"):
            changes["export_id"] = info["export_id"]
        ctx.store.update_service(session_id, svc_name, **changes)
    return ctx.store.update_session(session_id, state=st.ACTIVE, pid=None, runs=[result.artifacts])


def _run_services(ctx: Context, session: dict[str, Any], action: str, ident: str, on_event=None):
    from .orchestrator import run_playbook

    return run_playbook(
        "session_services",
        site_path=Path(session.get("site") or site_path(ctx.site_dir)),
        state_dir=ctx.store.state_dir,
        ident=ident,
        extravars={"iosea_action": action, "iosea_services": _orchestrator_services(session)},
        on_event=on_event,
        verbose=ctx.verbose,
    )


def _teardown(ctx: Context, session: dict[str, Any], progress: Progress, *, final: str) -> dict[str, Any]:
    """Remove every service of a session (idempotent), release allocations, record ``final``."""
    sid = session["id"]
    if session["services"]:
        ident = f"{session['name']}-stop-{int(time.time())}-{sid[:6]}"
        result = _run_services(ctx, session, "stop", ident)
        failed = {h: o.message for h, o in result.hosts.items() if not o.ok}
    else:
        failed = {}
    with ctx.store.transaction() as tx:
        record = tx.sessions.get(st.Query().id == sid)
        record = dict(record)
        services = []
        for svc in record["services"]:
            svc = dict(svc)
            if svc["name"] in failed or "(playbook)" in failed:
                svc["error"] = failed.get(svc["name"]) or failed.get("(playbook)")
            else:
                svc["state"] = "STOPPED" if svc["state"] != "FAILED" else "FAILED"
                tx.release(sid, svc["name"])
                progress(f"  {svc['name']}: removed")
            services.append(svc)
        record["services"] = services
        record["resources_left"] = bool(failed)
        record["state"] = final if not failed else st.FAILED
        record["pid"] = None
        record["updated_at"] = time.time()
        record["ended_at"] = time.time()
        tx.put_session(record)
    if failed:
        raise OrchestrationError(
            f"session {session['name']}: some services could not be torn down; run `iosea-wf stop` again",
            details=[f"service {n}: {m}" for n, m in failed.items()],
        )
    return record


# ---------------------------------------------------------------------------------------------
# stop / list / status


def find_session(ctx: Context, name: str | None) -> dict[str, Any]:
    """The user's newest session of that name, or SessionNotFound."""
    name = check_session_name(name)
    with ctx.store.transaction(shared=True) as tx:
        record = tx.session(ctx.user, name)
    if record is None:
        raise SessionNotFound(f"user {ctx.user} has no session named {name!r} (see `iosea-wf list --all`)")
    return record


def stop(
    ctx: Context,
    session: str | None,
    *,
    force: bool = False,
    progress: Progress = _quiet,
    poll: float = 1.0,
) -> dict[str, Any]:
    """Wait for the session's jobs (or cancel them with ``force``), then tear every service down."""
    from . import slurm, steps

    name = check_session_name(session)
    with ctx.store.transaction() as tx:
        # Checked and marked STOPPING in one transaction: a `run` after this is refused.
        record = tx.session(ctx.user, name)
        if record is None:
            raise SessionNotFound(
                f"user {ctx.user} has no session named {name!r} (see `iosea-wf list --all`)"
            )
        record = dict(record)
        state = record["state"]
        if state == st.STOPPED or (state == st.FAILED and not record.get("resources_left")):
            raise SessionConflict(f"session {record['name']!r} is already {state}: nothing to stop")
        same_host = record.get("host") == os.uname().nodename
        if state == st.STARTING and same_host and alive(record.get("pid")) and not force:
            raise SessionConflict(
                f"session {record['name']!r} is still starting (process {record['pid']}); "
                "wait for it, or use --force to tear it down anyway"
            )
        record["state"] = st.STOPPING
        record["updated_at"] = time.time()
        tx.put_session(record)
    if state == st.STARTING and record.get("start_run"):
        from .orchestrator import end_orphaned_run

        if end_orphaned_run(ctx.store.state_dir, record["start_run"]):
            progress(f"session {record['name']}: ended the provisioning its dead start left running")
    said, cancelled = None, set()
    while True:
        # Re-read each time: an access records its job id from its own process, a `run` in
        # flight its job ids from its own.
        record = steps.refresh(ctx, _session_by_id(ctx, record["id"]))
        if steps.end_abandoned(ctx, record):
            continue
        active = steps.active_jobs(record)
        if force and set(active) - cancelled:
            ids = sorted(set(active) - cancelled)
            progress(f"session {record['name']}: cancelling {len(ids)} job(s): {' '.join(ids)}")
            slurm.cancel(ids)
            cancelled.update(ids)
        waiting = active + [f"access (pid {a['pid']})" for a in steps.starting_accesses(record)]
        waiting += [f"submission of {i['name']}#{i['instance']}" for i in steps.submitting(record)]
        if not waiting:
            break
        if said != waiting:
            progress(f"session {record['name']}: waiting for job(s) {' '.join(waiting)} to end")
            said = waiting
        time.sleep(poll)
    progress(f"session {record['name']}: stopping {len(record['services'])} service(s)")
    record = ctx.store.update_session(record["id"], state=st.STOPPING)
    return _teardown(ctx, record, progress, final=st.STOPPED)


def _session_by_id(ctx: Context, session_id: str) -> dict[str, Any]:
    with ctx.store.transaction(shared=True) as tx:
        record = tx.sessions.get(st.Query().id == session_id)
    if record is None:
        raise st.StoreError(f"session {session_id} vanished from the store")
    return dict(record)


def list_sessions(ctx: Context, *, include_ended: bool = False) -> list[dict[str, Any]]:
    """The user's sessions (live ones, or all with ``include_ended``) as summaries."""
    rows = []
    for s in ctx.store.sessions_of(ctx.user):
        if not include_ended and s["state"] not in st.LIVE_STATES and not s.get("resources_left"):
            continue
        rows.append(session_summary(s))
    return rows


def session_summary(record: dict[str, Any]) -> dict[str, Any]:
    """The public view of a session (what `status --json` and `list --json` print)."""
    return {
        "session": record["name"],
        "workflow": record["workflow"],
        "owner": record["owner"],
        "state": record["state"],
        "started_at": record["created_at"],
        "ended_at": record.get("ended_at"),
        "error": record.get("error"),
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
                "error": s.get("error"),
            }
            for s in record["services"]
        ],
    }


def status(ctx: Context, session: str | None) -> dict[str, Any]:
    """The session, its services, its step instances and data movers with states from Slurm."""
    from . import steps

    record = find_session(ctx, session)
    if steps.active_jobs(record):
        record = steps.refresh(ctx, record)
    summary = session_summary(record)
    # The id tells apart sessions of a reused name (it is part of their tier directories).
    summary["id"] = record["id"]
    summary["steps"] = [steps.view(i) for i in record.get("steps", [])]
    summary["accesses"] = [
        {
            "job_id": a.get("job_id"),
            "since": a["since"],
            "partition": a.get("partition"),
            "state": a.get("state") or a.get("live_state") or ("ENDED" if a.get("ended_at") else "STARTING"),
        }
        for a in record.get("accesses", [])
        if not a.get("ended_at") or steps.active_jobs({"accesses": [a]})
    ]
    return summary


def run(ctx: Context, session: str | None, step: str | None, cwd: str | None = None) -> dict[str, Any]:
    """Submit a new instance of a step (movers, step, movers chained in Slurm); return its view."""
    from . import steps

    step = steps.check_step_name(step)
    record = find_session(ctx, session)
    if record["state"] != st.ACTIVE:
        raise SessionConflict(
            f"session {record['name']!r} is {record['state']}, not ACTIVE: cannot run a step"
        )
    return steps.view(steps.submit(ctx, record, step, cwd))


def cancel(
    ctx: Context, session: str | None, step: str | None = None, instance: int | None = None
) -> list[str]:
    """Cancel what `run` started and has not finished (one step's instance, or the whole session)."""
    from . import steps

    record = find_session(ctx, session)
    if record["state"] not in (st.ACTIVE, st.STOPPING):
        raise SessionConflict(f"session {record['name']!r} is {record['state']}: nothing runs in it")
    return steps.cancel(ctx, record, step, instance)


def access(
    ctx: Context,
    session: str | None,
    command: list[str],
    *,
    nodes: int | None = None,
    cores: int | None = None,
    time_limit: str | None = None,
    partition: str | None = None,
    immediate: bool = False,
    progress: Progress = _quiet,
) -> int:
    """Open an interactive Slurm allocation with every service attached; return the command's exit code."""
    from . import access as interactive

    record = find_session(ctx, session)
    if record["state"] != st.ACTIVE:
        raise SessionConflict(f"session {record['name']!r} is {record['state']}, not ACTIVE: no access")
    return interactive.open_allocation(
        ctx,
        record,
        command,
        nodes=nodes,
        cores=cores,
        time_limit=time_limit,
        partition=partition,
        immediate=immediate,
        progress=progress,
    )


def follow(
    ctx: Context,
    session: str | None,
    step: str,
    instance: int,
    on_update: Callable[[dict[str, Any]], None],
    poll: float = 0.1,
    max_poll: float = 1.0,
    fast_for: float = 5.0,
) -> dict[str, Any]:
    """Poll a step instance until every job of it has ended; call ``on_update`` with each view.

    Polls every ``poll`` seconds for the first ``fast_for`` seconds (a short step is seen ending
    as soon as a user polling by hand would see it), then every ``max_poll`` seconds, so a long
    step costs slurmctld one bounded status call a second.
    """
    from . import steps
    from .errors import WorkFailed

    slow_after = time.monotonic() + fast_for
    while True:
        record = steps.refresh(ctx, find_session(ctx, session))
        inst = steps.find_instance(record, step, instance)
        on_update(steps.view(inst))
        if steps.instance_done(inst):
            break
        time.sleep(poll if time.monotonic() < slow_after else max_poll)
    if not steps.instance_succeeded(inst):
        view = steps.view(inst)
        bad = [
            f"step {step}: {view['state']}"
            + (f" (exit code {view['exit_code']})" if view["exit_code"] else "")
        ]
        bad += [
            f"data mover {m['name']}: {m['state']}" for m in view["datamovers"] if m["state"] != "COMPLETED"
        ]
        raise WorkFailed(
            f"step {step} (instance {instance}) of session {record['name']} did not complete", details=bad
        )
    return steps.view(inst)


__all__ = [
    "Context",
    "IoseaError",
    "list_sessions",
    "show",
    "start",
    "status",
    "stop",
    "validate",
]
