"""The Workflow Manager's HTTP/JSON API: one route per CLI command, each running the manager.

Every route first has :mod:`.auth` prove who calls, then runs the same :mod:`iosea_wf.manager`
function the CLI runs in-process, with a Context naming that user, the service's one store and its
site. Errors are :class:`IoseaError` turned into ``{"error": {"exit_code", "message", "details",
"type"}}`` with an HTTP status, which the client raises again as the same class. Commands that
report progress (start, stop, run --wait) answer with NDJSON lines (``{"progress": ...}``,
``{"update": ...}``, then ``{"result": ...}`` or ``{"error": ...}``) once they have something to say;
an error before that is a plain JSON error with its status.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from .. import errors, identity, manager, sharing
from .. import store as st
from ..errors import (
    EXIT_CONFLICT,
    EXIT_FAILURE,
    EXIT_FORBIDDEN,
    EXIT_NOT_FOUND,
    EXIT_ORCHESTRATION,
    EXIT_RESOURCES,
    EXIT_SLURM,
    EXIT_UNAUTHENTICATED,
    EXIT_USAGE,
    IoseaError,
    SessionConflict,
    SessionNotFound,
    SlurmError,
    UsageError,
)
from ..site import Site, load_site
from . import auth
from .limits import BodyLimit

API = "/v1"
# Whether steps.submit makes a caller's jobs the caller's (sbatch --uid/--gid with their Slurm
# token): it does (slurm.acting_for), and refuses, exit 8, a request that brings no token.
SUBMITS_AS_CALLER = True
NDJSON = "application/x-ndjson"
# uvicorn configures this logger (stderr, INFO): the service's own lines go with uvicorn's.
log = logging.getLogger("uvicorn.error")

# The HTTP status of each exit code (any other: 500).
HTTP_STATUS = {
    EXIT_USAGE: 400,
    EXIT_UNAUTHENTICATED: 401,
    EXIT_FORBIDDEN: 403,
    EXIT_NOT_FOUND: 404,
    EXIT_CONFLICT: 409,
    EXIT_RESOURCES: 409,
    EXIT_ORCHESTRATION: 502,
    EXIT_SLURM: 502,
    EXIT_FAILURE: 422,
}


class Service:
    """What the service holds for every request: its site (read once) and its one store."""

    def __init__(self, site_dir: str | None, state_dir: str | Path, *, verbose: bool = False):
        self.site: Site = load_site(site_dir)
        # Long-lived: reads and writes reuse the parsed store while its file is unchanged; ended
        # sessions move to the archive after the site's iosea_store_keep_days.
        self.store = st.Store(state_dir, keep_days=self.site.store_keep_days)
        self.verbose = verbose

    def context(self, caller: identity.Caller, slurm_jwt: str | None = None) -> manager.Context:
        """A manager Context acting for a proven caller."""
        return manager.Context(
            site_dir=str(self.site.path),
            state_dir=str(self.store.state_dir),
            user=caller.user,
            verbose=self.verbose,
            slurm_jwt=slurm_jwt,
            _site=self.site,
            _store=self.store,
        )

    def watch_allocations(self) -> threading.Event:
        """Start the thread that tears down services whose Slurm allocation ended; set the Event to end it.

        One squeue every few seconds for every live session (allocations.watch): the service, not
        a Slurm epilog, keeps each export no longer than its allocation, so the site's slurm.conf
        is left as it is.
        """
        from .. import allocations

        done = threading.Event()

        def ctx_for(owner: str) -> manager.Context:
            return self.context(identity.Caller(user=owner, uid=-1, gid=-1))

        threading.Thread(
            target=allocations.watch,
            args=(ctx_for, self.store, done),
            name="iosea-wm-allocations",
            daemon=True,
        ).start()
        return done


def error_body(exc: IoseaError) -> dict[str, Any]:
    """The JSON form of an error, enough for the client to raise it again (the CLI's --json form too)."""
    return errors.error_body(exc)


def _error_response(exc: IoseaError) -> JSONResponse:
    return JSONResponse(error_body(exc), status_code=HTTP_STATUS.get(exc.exit_code, 500))


def _internal(exc: BaseException) -> IoseaError:
    log.exception("internal error", exc_info=exc)
    return IoseaError(f"internal error of the Workflow Manager service: {exc!r} (see its log)")


class _ClientGone(Exception):
    """Raised in read-only streamed work (``run --wait``) once its client has gone away."""


async def _streamed(work: Callable[[Callable[[dict[str, Any]], None]], Any], *, abandon: str | None = None):
    """Run ``work(emit)`` in a thread; answer plainly if it ends before emitting, else stream NDJSON.

    Work that changes things (start, stop) always runs to its end, whoever listens. Read-only work
    named by ``abandon`` stops at its next event once its client has gone. Waiting for events
    holds no worker of the server's thread pool (40 threads): a hundred `run --wait` at once
    must not keep `status` waiting.
    """
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    gone = threading.Event()

    def put(event: dict[str, Any] | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the service is exiting
            loop.call_soon_threadsafe(events.put_nowait, event)

    def emit(event: dict[str, Any]) -> None:
        if abandon and gone.is_set():
            raise _ClientGone
        put(event)

    def runner() -> None:
        try:
            put({"result": work(emit)})
        except _ClientGone:
            log.info("%s: abandoned, its client went away", abandon)
        except IoseaError as exc:
            put(error_body(exc))
        except BaseException as exc:  # the thread must always end its stream
            put(error_body(_internal(exc)))
        finally:
            put(None)

    threading.Thread(target=runner, name="iosea-wm-work", daemon=True).start()
    first = await events.get()
    if first is not None and "result" in first:
        return JSONResponse(first["result"])
    if first is not None and "error" in first:
        err = first["error"]
        return JSONResponse(first, status_code=HTTP_STATUS.get(err["exit_code"], 500))

    async def lines() -> AsyncIterator[bytes]:
        try:
            event = first
            while event is not None:
                yield _line(event)
                event = await events.get()
        finally:
            # Closed early when the client disconnected (starlette cancels the stream).
            gone.set()

    return StreamingResponse(lines(), media_type=NDJSON)


def _line(event: dict[str, Any]) -> bytes:
    return (json.dumps(event, default=str) + "\n").encode()


# ---------------------------------------------------------------------------------------------
# request bodies


class WorkflowText(BaseModel):
    """A WDF as the caller read it, with what the command line gave."""

    workflow: str | None = Field(None, description="the WDF's path as the user gave it (WORKFLOW=)")
    resolved: str | None = Field(None, description="its absolute path on the caller's host")
    text: str | None = Field(None, description="its text, read with the caller's rights")
    variables: dict[str, str] = Field(default_factory=dict, description="WDF variables (NAME=value)")
    session: str | None = Field(None, description="the session name (SESSION=)")
    wait_resources: float | None = Field(
        None, ge=0, description="start: seconds its Slurm allocations may wait for the datanodes' resources"
    )


class StopRequest(BaseModel):
    """Options of `stop`."""

    force: bool = False


class SentFile(BaseModel):
    """A file the caller read and sent: its name as the WDF gives it, its content in base64."""

    name: str
    content_b64: str


class RunRequest(BaseModel):
    """A step run: the caller's working directory and the step's batch script as read there."""

    cwd: str
    script: SentFile | None = None


class CancelRequest(BaseModel):
    """What `cancel` targets: a step (and instance), or the whole session."""

    step: str | None = None
    instance: int | None = None


class ShareRequest(BaseModel):
    """A share of the caller's session with a user, or (without ``user``) a one-time token."""

    user: str | None = Field(None, description="the user to share with; none: make a token")
    mode: str = Field(sharing.RO, description="ro or rw")
    expires_s: int | None = Field(None, description="seconds the share (or token) lasts")


class JoinRequest(BaseModel):
    """A share token to redeem (in the body: a URL would put it in the service's logs)."""

    token: str


class AccessEntry(BaseModel):
    """The record of one interactive access, as the caller's `access` keeps it up to date."""

    token: str
    job_name: str | None = None
    since: float | None = None
    pid: int | None = None
    job_id: str | None = None
    state: str | None = None
    partition: str | None = None
    ended_at: float | None = None


# ---------------------------------------------------------------------------------------------
# the application


async def _context(request: Request) -> manager.Context:
    """The Context of a request: its proven caller, acting on the service's site and store."""
    service: Service = request.app.state.service
    caller = await auth.caller(request)
    # Who asked what, for the site's audit (uvicorn's access log does not know the caller).
    log.info("%s (uid %d): %s %s", caller.user, caller.uid, request.method, request.url.path)
    return service.context(caller, auth.slurm_jwt(request))


Ctx = Annotated[manager.Context, Depends(_context)]


def _session_ref(name: str, owner: str | None = None) -> str:
    """The session a request names: ``NAME`` in the path, ``?owner=OWNER`` for one shared with the caller."""
    return sharing.join_ref(owner, name)


# Every route on /v1/sessions/{name}/... takes it: `SESSION=OWNER/NAME` on the command line.
Ref = Annotated[str, Depends(_session_ref)]


def create_app(service: Service) -> FastAPI:
    """The FastAPI application of one service."""
    app = FastAPI(
        title="iosea-wf Workflow Manager",
        version="1",
        description="Sessions, ephemeral services and steps of HPC workflows, for every user of the site. "
        "Every request carries a MUNGE credential of its caller (X-Iosea-Munge) whose payload is "
        "the digest of the request.",
        openapi_url=f"{API}/openapi.json",
        docs_url=f"{API}/docs",
        redoc_url=None,
    )

    app.add_middleware(BodyLimit)

    @app.exception_handler(IoseaError)
    async def _on_error(_: Request, exc: IoseaError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(Exception)
    async def _on_bug(_: Request, exc: Exception) -> JSONResponse:
        return _error_response(_internal(exc))

    @app.exception_handler(RequestValidationError)
    async def _on_bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors()]
        return _error_response(UsageError("malformed request to the Workflow Manager", details=details))

    app.state.service = service

    @app.get(f"{API}/whoami", summary="who the service takes the caller for")
    def whoami(ctx: Ctx) -> dict[str, Any]:
        return {"user": ctx.user}

    @app.get(f"{API}/sessions", summary="the caller's sessions (list)")
    def list_sessions(ctx: Ctx, all: bool = False) -> dict[str, Any]:
        return {"sessions": manager.list_sessions(ctx, include_ended=all)}

    @app.get(f"{API}/sessions/{{name}}", summary="one of the caller's sessions (status)")
    def status(ctx: Ctx, name: Ref) -> dict[str, Any]:
        return manager.status(ctx, name)

    @app.post(f"{API}/validate", summary="validate a WDF against the site (validate)")
    def validate(ctx: Ctx, body: WorkflowText) -> dict[str, Any]:
        wf = manager.validate(ctx, body.workflow or "", body.variables, session=body.session, text=body.text)
        return {"workflow": wf.to_dict(), "site": str(ctx.site.path)}

    @app.get(f"{API}/site/{{what}}", summary="what the site offers (show)")
    def show(ctx: Ctx, what: str) -> dict[str, Any]:
        if what not in ("locations", "flavors", "tiers"):
            raise UsageError(f"cannot show {what!r}: choose locations, flavors or tiers")
        return {"rows": manager.show(ctx, what), "site": str(ctx.site.path)}

    @app.post(f"{API}/sessions", summary="start a session (start); streams progress")
    async def start(ctx: Ctx, body: WorkflowText):
        return await _streamed(
            lambda emit: manager.start(
                ctx,
                body.workflow,
                body.session,
                body.variables,
                progress=lambda line: emit({"progress": line}),
                text=body.text,
                resolved=body.resolved,
                wait_resources=body.wait_resources,
            )
        )

    @app.post(f"{API}/sessions/{{name}}/stop", summary="stop a session (stop); streams progress")
    async def stop(ctx: Ctx, name: Ref, body: StopRequest):
        return await _streamed(
            lambda emit: manager.stop(
                ctx, name, force=body.force, progress=lambda line: emit({"progress": line})
            )
        )

    @app.get(f"{API}/sessions/{{name}}/steps/{{step}}", summary="the batch script a step's run needs")
    def step_script(ctx: Ctx, name: Ref, step: str) -> dict[str, Any]:
        return {"script": _step_script(ctx, name, step)}

    @app.post(f"{API}/sessions/{{name}}/steps/{{step}}/runs", summary="run a step (run)")
    def run(ctx: Ctx, name: Ref, step: str, body: RunRequest) -> dict[str, Any]:
        wanted = _step_script(ctx, name, step)
        if ctx.user != identity.current_user() and not SUBMITS_AS_CALLER:
            # Jobs submitted here would run as the service's user, not the caller's.
            raise SlurmError(
                f"this Workflow Manager cannot yet submit jobs as {ctx.user}: run steps in-process"
            )
        if wanted is not None and (body.script is None or body.script.name != wanted):
            # Never fall back to reading it here: the service would read a user's file as itself.
            raise UsageError(f"the step's batch script {wanted} was not sent with the request")
        if body.script is not None:
            try:
                ctx.sent_files[body.script.name] = base64.b64decode(body.script.content_b64, validate=True)
            except (binascii.Error, ValueError):
                raise UsageError("the step's batch script was not sent as base64") from None
        return manager.run(ctx, name, step, cwd=body.cwd)

    @app.get(
        f"{API}/sessions/{{name}}/steps/{{step}}/runs/{{instance}}/follow",
        summary="follow a step run to its end (run --wait); streams updates",
    )
    async def follow(ctx: Ctx, name: Ref, step: str, instance: int):
        return await _streamed(
            lambda emit: manager.follow(ctx, name, step, instance, lambda view: emit({"update": view})),
            abandon=f"{ctx.user}'s follow of {name} {step}#{instance}",
        )

    @app.post(f"{API}/sessions/{{name}}/cancel", summary="cancel what `run` started (cancel)")
    def cancel(ctx: Ctx, name: Ref, body: CancelRequest) -> dict[str, Any]:
        return {"cancelled": manager.cancel(ctx, name, body.step, body.instance)}

    @app.post(f"{API}/sessions/{{name}}/access", summary="check an interactive access may open (access)")
    def access_check(ctx: Ctx, name: Ref) -> dict[str, Any]:
        record = manager.find_session(ctx, name, sharing.READ, "access")
        if record["state"] != st.ACTIVE:
            raise SessionConflict(f"session {record['name']!r} is {record['state']}, not ACTIVE: no access")
        # The caller's CLI attaches the services: read-only ones for a read-only share. Who else
        # holds a share, and the tokens' digests, are the owner's to see only (`status`).
        sent = {k: v for k, v in record.items() if k not in ("shares", "share_tokens")}
        return {**sent, "shared_mode": sharing.mode_for(record, ctx.user)}

    @app.put(f"{API}/sessions/{{name}}/accesses/{{token}}", summary="record an interactive access (access)")
    def access_record(ctx: Ctx, request: Request, name: Ref, token: str, body: AccessEntry) -> dict[str, Any]:
        from ..access import _update_accesses

        if body.token != token:
            raise UsageError("the access entry's token is not the one in the path")
        if request.scope.get(auth.PEER_UID) is None:
            # From another host (TCP): its salloc's pid means nothing here, so `stop` must not
            # wait on it; it waits on the job once the job id is recorded.
            body.pid = None
        try:
            record = manager.find_session(ctx, name, sharing.READ, "access")
        except SessionNotFound:
            record = sharing.with_access_of(ctx, name, token)
            if record is None:
                raise
        known = any(a.get("token") == token for a in record.get("accesses", []))

        def change(accesses: list[dict[str, Any]]) -> None:
            mine = next((a for a in accesses if a.get("token") == token), None)
            if mine is None:
                accesses.append(mine := {"user": ctx.user})
            elif mine.get("user", record["owner"]) != ctx.user:
                # In a shared session, an access is changed only by whoever opened it.
                raise SessionNotFound(f"session {name} has no access {token} of user {ctx.user}")
            mine.update(body.model_dump(exclude_unset=True))

        # A new access is recorded only while the session is ACTIVE, as in-process.
        _update_accesses(ctx, record["id"], change, require_active=not known)
        return body.model_dump()

    @app.post(f"{API}/sessions/{{name}}/shares", summary="share the session, or make a token (share)")
    def share(ctx: Ctx, name: Ref, body: ShareRequest) -> dict[str, Any]:
        if body.user is None:
            return manager.share_token(ctx, name, body.mode, body.expires_s)
        return manager.share(ctx, name, body.user, body.mode, body.expires_s)

    @app.delete(f"{API}/sessions/{{name}}/shares/{{user}}", summary="end a user's share (unshare)")
    def unshare(ctx: Ctx, name: Ref, user: str) -> dict[str, Any]:
        return manager.unshare(ctx, name, user)

    @app.post(f"{API}/joins", summary="redeem a one-time share token (join)")
    def join(ctx: Ctx, body: JoinRequest) -> dict[str, Any]:
        return manager.join(ctx, body.token)

    return app


def _step_script(ctx: manager.Context, name: str, step: str) -> str | None:
    """The batch script a run of ``step`` executes (None for --wrap), after run's own checks."""
    from .. import jobs, steps
    from ..wdf import Workflow

    step = steps.check_step_name(step)
    record = manager.find_session(ctx, name, sharing.RUN, "run a step of")
    if record["state"] != st.ACTIVE:
        raise SessionConflict(
            f"session {record['name']!r} is {record['state']}, not ACTIVE: cannot run a step"
        )
    wdf = Workflow.from_dict(record["wdf"])
    if step not in wdf.steps:
        raise SessionNotFound(
            f"step {step!r} is not in the WDF of session {record['name']} "
            f"(steps: {', '.join(wdf.steps) or 'none'})"
        )
    _options, script_and_args, wrap = jobs.parse_sbatch(wdf.steps[step].command)
    return None if wrap is not None else script_and_args[0]
