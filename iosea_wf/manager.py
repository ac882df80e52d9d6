"""The workflow manager: the design note's rules for each command, with no printing.

Each public function takes a :class:`Context` (who, which site, which store) and returns data
the CLI prints. Progress is reported through an optional callback. Errors are
:class:`~iosea_wf.errors.IoseaError` subclasses carrying their exit code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import sharing
from . import store as st
from .errors import (
    IoseaError,
    OrchestrationError,
    ResourcesUnavailable,
    SessionConflict,
    SessionNotFound,
    SlurmUnreachable,
    UsageError,
)
from .identity import current_user
from .permissions import resolve
from .procs import alive
from .sessions import SESSION_NAME, check_session_name, session_summary  # noqa: F401 (the manager's API)
from .site import Site, load_site, site_path

Progress = Callable[[str], None]

# How long a `stop --force` waits for a live `start` it took over to end its provisioning.
STARTER_GIVE_UP_S = 30.0

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
            # Ended sessions are archived by a command that has read the site anyway (a `start`):
            # a `status` never loads the inventory for it.
            self._store = st.Store(
                self.state_dir, keep_days=lambda: self._site.store_keep_days if self._site else None
            )
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


def place_services(
    site: Site, workflow, used_on: Callable[[str], dict[str, int]], unusable: dict[str, str] | None = None
) -> list[tuple]:
    """(service, datanode, resources) for every service, given what each datanode already uses.

    Pure: ``used_on(datanode)`` says what is allocated there, ``unusable`` which datanodes take no
    new service and why (drained or down in Slurm); ResourcesUnavailable if one fits nowhere.
    start calls it under the store lock; the property tests call it with nothing used.
    """
    unusable = unusable or {}
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
            if d.name in unusable:
                shortfalls.append(f"{d.name} takes no new service: {unusable[d.name]}")
                continue
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


def _place_services(
    tx: st.Transaction, site: Site, workflow, session_id: str, user: str, session: str, unusable: dict
):
    """Choose a datanode per service and allocate its resources, all or nothing (under the lock)."""
    placements = place_services(site, workflow, tx.used_on, unusable)
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
    namespace = resolve(user, service.namespace)[0]
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
    wait_resources: float | None = None,
) -> dict[str, Any]:
    """Validate the WDF, record the session and provision every ephemeral service; return the session.

    ``text`` and ``resolved`` are the WDF as the caller read it and its absolute path there.
    Each service holds a Slurm allocation on its datanode (iosea_wf/allocations.py): the session is
    ACTIVE once Slurm runs them all, refused (ResourcesUnavailable) when it does not within
    ``wait_resources`` seconds (by default allocations.PENDING_LIMIT_S).
    """
    if not workflow_path:
        raise UsageError("WORKFLOW= is mandatory (the Workflow Description File, e.g. WORKFLOW=wdf.yaml)")
    name = check_session_name(session)
    workflow = validate(ctx, workflow_path, variables, session=name, text=text)
    site = ctx.site
    session_id = st.new_session_id()
    now = time.time()
    # Asked before the store's lock is taken: a datanode drained or down in Slurm gets no service.
    unusable = {}
    if workflow.services:
        from . import slurm

        unusable = slurm.unusable_nodes(sorted(site.datanodes))
        # The services' allocations are the caller's jobs: refused before anything is written
        # when root acts for a user without their token.
        slurm.acting_for(ctx.user, ctx.slurm_jwt)

    with ctx.store.transaction() as tx:
        existing = tx.session(ctx.user, name, live_only=True)
        if existing:
            raise SessionConflict(
                f"session {name!r} already exists for user {ctx.user} (state {existing['state']}); "
                "stop it first or choose another name"
            )
        wanted = {resolve(ctx.user, s.namespace)[0]: s.name for s in workflow.services.values()}
        for other in tx.live_sessions():
            for svc in other.get("services", []):
                if svc["namespace"] in wanted:
                    raise SessionConflict(
                        f"namespace {svc['namespace']} of service {wanted[svc['namespace']]} "
                        "is already served "
                        f"by session {other['name']!r} of {other['owner']} (service {svc['name']})"
                    )
        placements = _place_services(tx, site, workflow, session_id, ctx.user, name, unusable)
        record = session_record(
            site, workflow, resolved or workflow_path, ctx.user, name, session_id, placements, now
        )
        tx.put_session(record)

    if not record["services"]:
        progress(f"session {name}: no ephemeral service to start")
        try:
            return ctx.store.update_session(
                session_id, expect=(st.STARTING,), state=st.ACTIVE, pid=None, resources_left=False
            )
        except st.StateChanged as exc:
            raise _taken_over(exc.record) from None

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

    def still_starting() -> bool:
        # A `stop --force` took the session over: its teardown must not race this provisioning.
        with ctx.store.transaction(shared=True) as tx:
            current = tx.sessions.get(st.Query().id == session_id)
        return current is not None and current["state"] == st.STARTING

    ident = f"{name}-start-{int(now)}-{session_id[:6]}"
    from . import allocations

    try:
        ctx.store.update_session(session_id, start_run=ident)
        # Submitted first: Slurm schedules them while the exports are provisioned.
        since = allocations.hold(ctx, record, progress)
        result = _run_services(ctx, record, "start", ident, on_event, keep_going=still_starting)
        if result.ok:
            allocations.wait_running(ctx, record, since, wait_resources, progress, still_starting)
    except BaseException as exc:
        # Interrupted (Ctrl-C, SIGTERM), refused by Slurm or an orchestration crash: roll back what may exist.
        if isinstance(exc, IoseaError):
            ctx.store.update_session(session_id, error=exc.message)
        _roll_back(ctx, session_id, progress, exc)
        raise
    from .errors import Interrupted

    try:
        return _finish_start(ctx, record, result, ready, progress, still_starting)
    except Interrupted as exc:
        if not exc.note:
            _roll_back(ctx, session_id, progress, exc)
        raise


def _finish_start(ctx: Context, record, result, ready, progress: Progress, still_starting) -> dict[str, Any]:
    """Record the outcome of a start's playbook: ACTIVE, or FAILED after a rollback."""
    from .procs import deferred_interrupts

    session_id, name = record["id"], record["name"]
    if not still_starting():
        ctx.store.update_session(session_id, pid=None)
        raise _taken_over(_session_by_id(ctx, session_id))
    failed = {h: o.message for h, o in result.hosts.items() if not o.ok}
    for svc in record["services"]:
        if svc["name"] not in ready and svc["name"] not in failed:
            failed[svc["name"]] = "did not report ready"
    try:
        if failed:
            for svc_name, msg in failed.items():
                if svc_name in {s["name"] for s in record["services"]}:
                    ctx.store.update_service(
                        session_id, svc_name, expect=(st.STARTING,), state="FAILED", error=msg
                    )
            error = "; ".join(f"service {n}: {m}" for n, m in failed.items())
            progress(f"session {name}: rolling back")
            record = ctx.store.update_session(
                session_id, expect=(st.STARTING,), state=st.STOPPING, error=error, runs=[result.artifacts]
            )
            _teardown(ctx, record, progress, final=st.FAILED)
            raise OrchestrationError(
                f"session {name} failed to start; everything it started was torn down",
                details=[f"service {n}: {m}" for n, m in failed.items()],
            )
        try:
            # One write, whole: an interrupt now takes effect once the session is ACTIVE.
            with deferred_interrupts():
                return _activate(ctx, session_id, ready, result.artifacts)
        except KeyboardInterrupt as exc:
            exc.note = f"session {name} had started before the interrupt: it is ACTIVE"  # type: ignore[attr-defined]
            raise
    except st.StateChanged as exc:
        # A `stop --force` came between the playbook's end and these writes: it tears down.
        ctx.store.update_session(session_id, pid=None)
        raise _taken_over(exc.record) from None


def _activate(ctx: Context, session_id: str, ready: dict[str, Any], artifacts: str) -> dict[str, Any]:
    """Services ready, session ACTIVE, in one transaction that finds it still STARTING."""
    with ctx.store.transaction() as tx:
        found = tx.sessions.get(st.Query().id == session_id)
        if found is None or found["state"] != st.STARTING:
            raise st.StateChanged(dict(found or {"name": session_id, "state": "gone"}))
        current = json.loads(json.dumps(found))
        for svc in current["services"]:
            info = ready.get(svc["name"])
            if info is not None:
                svc["state"] = "ACTIVE"
                if isinstance(info, dict) and info.get("export_id"):
                    svc["export_id"] = info["export_id"]
        current.update(state=st.ACTIVE, pid=None, runs=[artifacts], updated_at=time.time())
        tx.put_session(current)
    return current


def _taken_over(record: dict[str, Any]) -> SessionConflict:
    """The error of a `start` whose session another command (`stop --force`) took over."""
    return SessionConflict(
        f"session {record['name']!r} was stopped by another command while it started "
        f"(now {record['state']}): it never became ACTIVE"
    )


def _roll_back(ctx: Context, session_id: str, progress: Progress, exc: BaseException) -> None:
    """Tear down what an interrupted `start` may have provisioned, unless a `stop` took over.

    Sets ``exc.note`` (an Interrupted) to what was done. A second interrupt during the rollback
    leaves the session FAILED with its resources recorded: `iosea-wf stop` finishes it.
    """
    from .errors import Interrupted

    # Interrupted at the terminal, the command must end within 2 s, and a teardown with exports
    # takes longer: it goes on in a child of its own session, which a second Ctrl-C never reaches.
    child = _detach() if isinstance(exc, Interrupted) else None
    if child is _CHILD:
        # The parent recorded this process as the stopper: tear down, then end here, whatever
        # happens (a failed or interrupted teardown leaves the session FAILED for `stop`).
        try:
            _teardown(ctx, _session_by_id(ctx, session_id), _quiet, final=st.FAILED)
        finally:
            os._exit(0)
    written = False
    try:
        record = ctx.store.update_session(
            session_id,
            expect=(st.STARTING,),
            state=st.STOPPING,
            pid=None,
            stopper={"pid": child.pid if child else os.getpid(), "host": os.uname().nodename},
        )
        written = True
    except st.StateChanged as changed:
        ctx.store.update_session(session_id, pid=None)
        if isinstance(exc, Interrupted) and changed.record["state"] == st.STOPPING:
            exc.note = f"session {changed.record['name']} did not start: another command is stopping it"
        return
    finally:
        if child:
            child.go(record_written=written)
    name = record["name"]
    if child:
        exc.note = (  # type: ignore[attr-defined]
            f"session {name} did not start: process {child.pid} tears down what it had started "
            f"(`iosea-wf status SESSION={name}` shows it; `stop` finishes it should that process die)"
        )
        return
    try:
        _teardown(ctx, record, progress, final=st.FAILED)
    except BaseException as again:
        ctx.store.update_session(
            session_id, state=st.FAILED, pid=None, resources_left=True, error="start interrupted"
        )
        cut = "was interrupted" if isinstance(again, Interrupted) else f"failed ({again})"
        note = (
            f"session {name} did not start; its rollback {cut}: "
            f"`iosea-wf stop SESSION={name}` removes what is left"
        )
        if isinstance(again, Interrupted):
            again.note = note
            raise
        if isinstance(exc, Interrupted):
            # The user's interrupt stays what is reported (exit 130/143), with what is left.
            exc.note = note
            return
        raise
    if isinstance(exc, Interrupted):
        exc.note = f"session {name} did not start: everything it had started was torn down (FAILED)"


class _Detached:
    """The parent's handle on a forked child that waits for its go (see :func:`_detach`)."""

    def __init__(self, pid: int, write_fd: int):
        self.pid = pid
        self._fd = write_fd

    def go(self, record_written: bool) -> None:
        """Let the child run on (it owns the rollback now), or end it."""
        with contextlib.suppress(OSError):
            if record_written:
                os.write(self._fd, b"go")
            os.close(self._fd)


def _detach() -> _Detached | None:
    """Fork; the parent gets a handle, the child :data:`_CHILD` once the parent said go.

    The child leaves the terminal's session (setsid), ignores SIGINT, writes nothing to the
    terminal and exits when its caller returns to the CLI (os._exit: none of the parent's exit
    work runs twice). Where fork is unavailable or not wanted (a service thread), None in place.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(read_fd)
        return _Detached(pid, write_fd)
    os.close(write_fd)
    try:
        os.setsid()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        if os.read(read_fd, 2) != b"go":
            os._exit(0)
    except BaseException:
        os._exit(1)
    return _CHILD


_CHILD = _Detached(0, -1)  # what _detach returns in the child


def _run_services(
    ctx: Context, session: dict[str, Any], action: str, ident: str, on_event=None, keep_going=None
):
    from .orchestrator import run_playbook

    return run_playbook(
        "session_services",
        site_path=Path(session.get("site") or site_path(ctx.site_dir)),
        state_dir=ctx.store.state_dir,
        ident=ident,
        extravars={"iosea_action": action, "iosea_services": _orchestrator_services(session)},
        on_event=on_event,
        verbose=ctx.verbose,
        keep_going=keep_going,
    )


def _teardown(
    ctx: Context, session: dict[str, Any], progress: Progress, *, final: str, untouched_raises: bool = False
) -> dict[str, Any]:
    """Remove every service of a session (idempotent), release allocations, record ``final``.

    ``untouched_raises``: cut before any service was touched, raise and record nothing (the
    caller gives the session back as it was).
    """
    sid = session["id"]
    begun = None
    try:
        failed: dict[str, str] = {}
        if session["services"]:
            ident = f"{session['name']}-stop-{int(time.time())}-{sid[:6]}"
            begun = time.time()
            # From here on an export may be gone: no service is shown ACTIVE until the end is known.
            with ctx.store.transaction() as tx:
                current = dict(tx.sessions.get(st.Query().id == sid))
                current["services"] = [
                    {**v, "state": "STOPPING"} if v["state"] not in ("FAILED", "STOPPED") else v
                    for v in current["services"]
                ]
                current["teardown_started"] = begun
                tx.put_session(current)
            result = _run_services(ctx, session, "stop", ident)
            failed = {h: o.message for h, o in result.hosts.items() if not o.ok}
        # Cut here, the services are gone but their allocations may not be: FAILED as well.
        cancelled, alloc_error = _release_allocations(ctx, sid, failed)
    except BaseException as exc:
        if untouched_raises and (begun is None or _session_by_id(ctx, sid).get("teardown_started") != begun):
            raise
        # Interrupted (or crashed) half-way: a state the next `stop` finishes, never a live one.
        ctx.store.update_session(
            sid,
            state=st.FAILED,
            pid=None,
            stopper=None,
            resources_left=True,
            error="interrupted while its services were torn down: run `iosea-wf stop` again",
        )
        if hasattr(exc, "note"):
            exc.note = (
                f"session {session['name']}: its teardown was cut short (FAILED, some services "
                f"may remain): `iosea-wf stop SESSION={session['name']}` finishes it"
            )
        raise
    from .procs import deferred_interrupts

    # The outcome is written whole: an interrupt now takes effect once it is recorded.
    with deferred_interrupts(), ctx.store.transaction() as tx:
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
            if svc.get("allocation") in cancelled:
                svc["allocation_state"] = "CANCELLED"
            services.append(svc)
        record["services"] = services
        record["resources_left"] = bool(failed) or bool(alloc_error)
        if alloc_error:
            record["error"] = alloc_error
        record["state"] = final if not failed and not alloc_error else st.FAILED
        record["pid"] = None
        record["stopper"] = None
        record["updated_at"] = time.time()
        record["ended_at"] = time.time()
        tx.put_session(record)
    if failed:
        raise OrchestrationError(
            f"session {session['name']}: some services could not be torn down; run `iosea-wf stop` again",
            details=[f"service {n}: {m}" for n, m in failed.items()],
        )
    return record


def _release_allocations(ctx: Context, sid: str, failed: dict[str, str]) -> tuple[list[str], str | None]:
    """Cancel the Slurm allocations of the services torn down; (their ids, why some could not be)."""
    from . import allocations
    from .errors import SlurmError

    if "(playbook)" in failed:
        return [], None
    current = _session_by_id(ctx, sid)
    removed = {s["name"] for s in current["services"] if s["name"] not in failed}
    try:
        return allocations.release(ctx, current, removed), None
    except SlurmError as exc:
        return [], (
            f"its Slurm allocation(s) could not be cancelled ({exc.message}): "
            f"`iosea-wf stop SESSION={current['name']} --force` cancels them"
        )


# ---------------------------------------------------------------------------------------------
# stop / list / status


def find_session(
    ctx: Context, name: str | None, need: str = sharing.OWNER, what: str = "use"
) -> dict[str, Any]:
    """The newest session ``name`` (``NAME`` or ``OWNER/NAME``) names for the caller, if they may ``what`` it.

    ``need``: what the command asks of a session another user shares (sharing.READ, RUN or
    OWNER). Not shared with the caller: SessionNotFound; shared, but not for this: Forbidden.
    """
    with ctx.store.transaction(shared=True) as tx:
        record = sharing.resolve(tx, ctx.user, name, need, what)
    return _revive(ctx, record)


def _revive(ctx: Context, record: dict[str, Any]) -> dict[str, Any]:
    """A session whose `stop` died while it only waited (nothing torn down) is ACTIVE again."""
    from .sessions import dead_driver

    def dead_waiter(r: dict[str, Any]) -> bool:
        return (
            r["state"] == st.STOPPING
            and r.get("stop_from") == st.ACTIVE
            and not r.get("teardown_started")
            and dead_driver(r) is not None
        )

    if not dead_waiter(record):
        return record
    with ctx.store.transaction() as tx:
        # Checked again under the lock: another `stop` may have taken the session meanwhile.
        current = dict(tx.sessions.get(st.Query().id == record["id"]))
        if dead_waiter(current):
            current.update(state=st.ACTIVE, stopper=None, updated_at=time.time())
            tx.put_session(current)
    return current


def stop(
    ctx: Context,
    session: str | None,
    *,
    force: bool = False,
    progress: Progress = _quiet,
    poll: float = 1.0,
) -> dict[str, Any]:
    """Wait for the session's jobs (or cancel them with ``force``), then tear every service down.

    With ``force``, a session that already ended still has its leftover jobs cancelled.
    """
    owner, name = sharing.split_ref(session)
    if owner not in (None, ctx.user):
        sharing.owned(ctx, session, "stop")  # another's session: refused (exit 4, or 12 if shared)
    with ctx.store.transaction() as tx:
        # Checked and marked STOPPING in one transaction: a `run` after this is refused.
        record = tx.session(ctx.user, name)
        if record is None:
            raise SessionNotFound(
                f"user {ctx.user} has no session named {name!r} (see `iosea-wf list --all`)"
            )
        record = dict(record)
        state = record["state"]
        ended = state == st.STOPPED or (state == st.FAILED and not record.get("resources_left"))
        if ended and not force:
            raise SessionConflict(f"session {record['name']!r} is already {state}: nothing to stop")
        same_host = record.get("host") == os.uname().nodename
        if state == st.STARTING and same_host and alive(record.get("pid")) and not force:
            raise SessionConflict(
                f"session {record['name']!r} is still starting (process {record['pid']}); "
                "wait for it, or use --force to tear it down anyway"
            )
        starter_alive = state == st.STARTING and same_host and alive(record.get("pid"))
        if not ended:
            _mark_stopping(record, state)
            tx.put_session(record)
    if ended:
        # Nothing to tear down; but a job a `run` racing the stop left behind still goes.
        gone = _cancel_leftovers(ctx, record, progress)
        if not gone:
            raise SessionConflict(f"session {record['name']!r} is already {state}: nothing to stop")
        return _session_by_id(ctx, record["id"])
    tearing_down = False  # until then an interrupted stop gives the session back untouched
    try:
        if starter_alive:
            _wait_for_starter(ctx, record, progress, poll)
        if state == st.STARTING and record.get("start_run"):
            from .orchestrator import end_orphaned_run

            if end_orphaned_run(ctx.store.state_dir, record["start_run"]):
                progress(f"session {record['name']}: ended the provisioning its dead start left running")
        record, cancelled = _wait_for_jobs(ctx, record, force, progress, poll)
        progress(f"session {record['name']}: stopping {len(record['services'])} service(s)")
        record = ctx.store.update_session(record["id"], state=st.STOPPING)
        tearing_down = True
        return _teardown(ctx, record, progress, final=st.STOPPED, untouched_raises=True)
    except BaseException as exc:
        from .errors import Interrupted

        # Cut before its teardown marked a single service (the window is a few ms): untouched too.
        if not tearing_down or _session_by_id(ctx, record["id"]).get("teardown_started") == record.get(
            "teardown_started"
        ):
            _give_back(ctx, record, exc)
        elif isinstance(exc, Interrupted) and not exc.note:
            exc.note = f"session {record['name']}: `iosea-wf stop SESSION={record['name']}` finishes it"
        raise


def _mark_stopping(record: dict[str, Any], state: str) -> None:
    """Make ``record`` STOPPING by this process, remembering what an interrupted wait gives back."""
    if state != st.STOPPING:
        record["stop_from"] = state
    record["state"] = st.STOPPING
    record["stopper"] = {"pid": os.getpid(), "host": os.uname().nodename}
    record["updated_at"] = time.time()


def _cancel_leftovers(ctx: Context, record: dict[str, Any], progress: Progress) -> list[str]:
    """Cancel the unfinished jobs of an ended session, recorded or not; return their ids."""
    from . import allocations, slurm, steps

    record = steps.refresh(ctx, record)
    ids = steps.active_jobs(record) + allocations.unended(record)
    if ids:
        # A shared user's run racing the stop may be among them: theirs, not the owner's, in Slurm.
        steps.cancel_jobs(ctx, record, ids, slurm.acting_for(ctx.user, ctx.slurm_jwt))
    ids += steps.cancel_unrecorded(ctx, record)
    if ids:
        progress(f"session {record['name']}: cancelled job(s) {' '.join(ids)} left after it ended")
    return ids


def _wait_for_starter(ctx: Context, record: dict[str, Any], progress: Progress, poll: float) -> None:
    """Wait until a live `start` this stop took over lets go (it ends its provisioning on seeing STOPPING)."""
    progress(f"session {record['name']}: waiting for its start (process {record['pid']}) to give way")
    # It ends its playbook within about a second of seeing STOPPING; a start stuck elsewhere (or
    # a service whose start thread died) must not keep the stop waiting forever.
    deadline = time.monotonic() + STARTER_GIVE_UP_S
    while time.monotonic() < deadline:
        current = _session_by_id(ctx, record["id"])
        if not current.get("pid") or not alive(current["pid"]):
            return
        time.sleep(min(poll, 0.2))
    progress(f"session {record['name']}: its start did not give way in {STARTER_GIVE_UP_S:.0f}s: going on")


def _wait_for_jobs(
    ctx: Context, record: dict[str, Any], force: bool, progress: Progress, poll: float
) -> tuple[dict[str, Any], set[str]]:
    """Wait for the session's jobs to end (cancelling them with ``force``); return (record, cancelled)."""
    from . import slurm, steps

    said, cancelled, sid = None, set(), record["id"]
    # Jobs just cancelled (or about to end) leave Slurm within a second: look again soon at first,
    # then every ``poll`` seconds, so a long wait costs slurmctld one call a second.
    pause = 0.1
    while True:
        # Re-read each time: an access records its job id from its own process, a `run` in
        # flight its job ids from its own.
        record = _unless_unreachable(
            record, lambda: steps.refresh(ctx, _session_by_id(ctx, sid), strict=True)
        )
        if steps.end_abandoned(ctx, record):
            continue
        active = steps.active_jobs(record)
        if force and set(active) - cancelled:
            ids = sorted(set(active) - cancelled)
            progress(f"session {record['name']}: cancelling {len(ids)} job(s): {' '.join(ids)}")
            # The owner's jobs with the owner's token; a shared user's (not the owner's in Slurm)
            # by this process, on the owner's word (steps.cancel_jobs).
            who = slurm.acting_for(ctx.user, ctx.slurm_jwt)
            _unless_unreachable(
                record, lambda ids=ids, who=who, r=record: steps.cancel_jobs(ctx, r, ids, who)
            )
            cancelled.update(ids)
        waiting = active + [f"access (pid {a['pid']})" for a in steps.starting_accesses(record)]
        waiting += [f"submission of {i['name']}#{i['instance']}" for i in steps.submitting(record)]
        if not waiting:
            # Jobs of this session that no record holds (a `run` cut short before it could record
            # them): nobody follows them, so even a stop without --force ends them.
            strays = steps.cancel_unrecorded(ctx, record)
            if strays:
                progress(f"session {record['name']}: cancelled unrecorded job(s) {' '.join(strays)}")
                continue
            break
        if said != waiting:
            progress(f"session {record['name']}: waiting for job(s) {' '.join(waiting)} to end")
            said = waiting
        time.sleep(min(pause, poll))
        pause *= 2
    return record, cancelled


def _give_back(ctx: Context, record: dict[str, Any], exc: BaseException) -> None:
    """A stop interrupted before any teardown: the session goes back to the state it was stopped from."""
    from .errors import Interrupted

    back = record.get("stop_from") or st.ACTIVE
    changes: dict[str, Any] = {"state": back, "stopper": None}
    if back != st.ACTIVE:
        changes.update(state=st.FAILED, resources_left=True, pid=None)
    try:
        ctx.store.update_session(record["id"], expect=(st.STOPPING,), **changes)
    except st.StateChanged:
        return
    if isinstance(exc, Interrupted):
        exc.note = (
            f"session {record['name']} was not stopped: nothing was torn down (it is {changes['state']})"
        )


def _unless_unreachable(record: dict[str, Any], call: Callable[[], Any]) -> Any:
    """``call()`` of a stop; with Slurm unreachable, stop exits 8 saying nothing was stopped.

    Its jobs can then be neither waited for nor cancelled, so nothing is torn down; the stop's
    handler gives the session back the state this stop found it in (``_give_back``).
    """
    try:
        return call()
    except SlurmUnreachable as exc:
        raise SlurmUnreachable(
            f"session {record['name']}: {exc.message}; its jobs can be neither waited for nor cancelled, "
            "so nothing was stopped: run `iosea-wf stop` again once Slurm answers"
        ) from None


def _session_by_id(ctx: Context, session_id: str) -> dict[str, Any]:
    with ctx.store.transaction(shared=True) as tx:
        record = tx.sessions.get(st.Query().id == session_id)
    if record is None:
        raise st.StoreError(f"session {session_id} vanished from the store")
    return dict(record)


def list_sessions(ctx: Context, *, include_ended: bool = False) -> list[dict[str, Any]]:
    """The user's sessions (live ones, or all with ``include_ended``) as summaries."""
    rows = []
    for s in ctx.store.sessions_of(ctx.user, archived=include_ended):
        if not include_ended and s["state"] not in st.LIVE_STATES and not s.get("resources_left"):
            continue
        rows.append({**session_summary(s), "shared_mode": None})
    for s, share in sharing.shared_with(ctx, include_ended=include_ended):
        rows.append({**session_summary(s), "shared_mode": share["mode"]})
    return rows


def status(ctx: Context, session: str | None) -> dict[str, Any]:
    """The session, its services, its step instances and data movers with states from Slurm.

    Honest states: an ACTIVE service whose server does not answer is shown LOST, with why (one
    bounded probe per server); with Slurm unreachable, unfinished jobs keep their last known state,
    ``slurm_reachable`` is False and ``warnings`` says so.
    """
    from . import allocations, service_types, steps

    record = find_session(ctx, session, sharing.READ, "see")
    warnings, reachable = [], True
    if allocations.watched(record):
        # A service whose Slurm allocation ended is torn down and shown LOST, with why.
        with contextlib.suppress(SlurmUnreachable):
            record = allocations.reap(ctx, record)
    if steps.active_jobs(record):
        try:
            record = steps.refresh(ctx, record, strict=True)
        except SlurmUnreachable as exc:
            reachable = False
            warnings.append(f"{exc.message}: the states of unfinished jobs are the last known ones")
    summary = session_summary(record)
    summary["slurm_reachable"] = reachable
    summary["warnings"] = warnings
    lost = service_types.lost([s for s in record["services"] if s["state"] == "ACTIVE"])
    for svc in summary["services"]:
        if svc["name"] in lost:
            svc.update(state="LOST", error=lost[svc["name"]])
    # The id tells apart sessions of a reused name (it is part of their tier directories).
    summary["id"] = record["id"]
    summary["shared_mode"] = sharing.mode_for(record, ctx.user)
    if record["owner"] == ctx.user:
        summary.update(sharing.shares_view(record))
    summary["steps"] = [steps.view(i) for i in record.get("steps", [])]
    summary["accesses"] = [
        {
            "job_id": a.get("job_id"),
            "since": a["since"],
            "partition": a.get("partition"),
            "state": a.get("state") or a.get("live_state") or ("ENDED" if a.get("ended_at") else "STARTING"),
            "user": a.get("user") or record["owner"],
        }
        for a in record.get("accesses", [])
        if not a.get("ended_at") or steps.active_jobs({"accesses": [a]})
    ]
    return summary


def run(ctx: Context, session: str | None, step: str | None, cwd: str | None = None) -> dict[str, Any]:
    """Submit a new instance of a step (movers, step, movers chained in Slurm); return its view."""
    from . import steps

    step = steps.check_step_name(step)
    record = find_session(ctx, session, sharing.RUN, "run a step of")
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

    if step is not None:
        steps.check_step_name(step)
    # In any state: a `run` racing a `stop` may have left a job running in an ended session.
    record = find_session(ctx, session, sharing.RUN, "cancel runs of")
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

    record = find_session(ctx, session, sharing.READ, "access")
    if record["state"] != st.ACTIVE:
        raise SessionConflict(f"session {record['name']!r} is {record['state']}, not ACTIVE: no access")
    from .steps import require_active_services

    require_active_services(record, record["services"], "open an access")
    # A read-only share mounts every service read-only, whatever the WDF says.
    record = dict(record, shared_mode=sharing.mode_for(record, ctx.user))
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
        record, unreachable = find_session(ctx, session, sharing.READ, "follow runs of"), None
        try:
            record = steps.refresh(ctx, record, strict=True)
        except SlurmUnreachable as exc:
            unreachable = exc.message
        inst = steps.find_instance(record, step, instance)
        # Each view says whether Slurm answered, so a follower is told it sees last known states.
        on_update({**steps.view(inst), "slurm_reachable": unreachable is None, "slurm_error": unreachable})
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


# ---------------------------------------------------------------------------------------------
# share / unshare / join (the rules are in sharing.py)


def share(
    ctx: Context, session: str | None, user: str | None, mode: str | None = None, expires_s: int | None = None
) -> dict[str, Any]:
    """Share the caller's session with a user, ``ro`` or ``rw`` (see :mod:`iosea_wf.sharing`)."""
    return sharing.share(ctx, session, user, mode, expires_s)


def unshare(ctx: Context, session: str | None, user: str | None) -> dict[str, Any]:
    """End a user's share of the caller's session."""
    return sharing.unshare(ctx, session, user)


def share_token(
    ctx: Context, session: str | None, mode: str | None = None, expires_s: int | None = None
) -> dict[str, Any]:
    """A one-time token sharing the caller's session with whoever redeems it."""
    return sharing.new_token(ctx, session, mode, expires_s)


def join(ctx: Context, token: str | None) -> dict[str, Any]:
    """Redeem a share token (once)."""
    return sharing.join(ctx, token)


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
