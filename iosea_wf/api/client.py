"""The CLI's side of the Workflow Manager service: the manager's functions, answered over HTTP.

Each function here has the signature of its namesake in :mod:`iosea_wf.manager` and takes a
:class:`ServiceContext` instead of a Context, so the CLI prints the same output either way. What
the caller alone may read (the WDF, a step's batch script) is read here with the caller's rights
and sent as text. Every request carries a MUNGE credential bound to it; those that submit or
cancel Slurm jobs also carry a short-lived Slurm token of the caller, when Slurm issues one.
Errors come back as the same :class:`IoseaError` class and exit code as in-process.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from .. import errors, identity, manager
from ..errors import IoseaError, ServiceUnreachable, Unauthenticated, UsageError
from .settings import parse_url

NDJSON = "application/x-ndjson"
session_summary = manager.session_summary


@dataclass(frozen=True)
class RemoteSite:
    """What the CLI prints of the service's site: its inventory path there."""

    path: Path


class ServiceContext:
    """A connection to the site's Workflow Manager, standing where a manager Context stands in-process."""

    def __init__(self, url: str, *, verbose: bool = False):
        self.url = url
        self.user = identity.current_user()
        self.verbose = verbose
        self.site: RemoteSite | None = None
        socket_path, self._base = parse_url(url)
        # Plain HTTP (a local socket, or http:// on the site's network): no TLS, so no certificate
        # store to load (about 0.1 s of every command otherwise).
        transport = httpx.HTTPTransport(uds=socket_path, verify=False)
        self._http = httpx.Client(
            transport=transport,
            base_url=self._base,
            # start and stop may take minutes; a service that does not answer at all is seen at connect.
            timeout=httpx.Timeout(connect=5.0, read=None, write=30.0, pool=5.0),
        )

    def call(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        slurm_token: bool = False,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> Any:
        """One authenticated request; return its JSON result or raise the error it answered."""
        content = json.dumps(body).encode() if body is not None else b""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        request = self._http.build_request(method, path, content=content, params=params, headers=headers)
        payload = identity.request_digest(request.method, request.url.path, request.url.query, content)
        request.headers[identity.CREDENTIAL_HEADER] = identity.make_credential(payload)
        if slurm_token:
            from .. import slurm

            token = slurm.user_token()
            if token:
                request.headers[identity.SLURM_JWT_HEADER] = token
        try:
            response = self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise ServiceUnreachable(f"the Workflow Manager at {self.url} cannot be reached: {exc}") from None
        try:
            if response.headers.get("content-type", "").startswith(NDJSON):
                return self._events(response, on_event)
            response.read()
        except httpx.TransportError as exc:
            raise ServiceUnreachable(
                f"the Workflow Manager at {self.url} went away during the request ({exc}); "
                "see `iosea-wf status` for what it did"
            ) from None
        finally:
            response.close()
        return _result(response)

    def _events(self, response: httpx.Response, on_event) -> Any:
        for line in response.iter_lines():
            if not line.strip():
                continue
            event = json.loads(line)
            if "result" in event:
                return event["result"]
            if "error" in event:
                raise rebuild_error(event["error"])
            if on_event:
                on_event(event)
        raise ServiceUnreachable(f"the Workflow Manager at {self.url} ended its answer without a result")


def _result(response: httpx.Response) -> Any:
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.status_code < 400 and data is not None:
        return data
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        raise rebuild_error(data["error"])
    if response.status_code == 401:
        raise Unauthenticated("the Workflow Manager refused the request as unauthenticated")
    raise IoseaError(f"the Workflow Manager answered HTTP {response.status_code}: {response.text[:200]}")


def _error_classes() -> dict[str, type[IoseaError]]:
    found: dict[str, type[IoseaError]] = {}
    todo = [IoseaError]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.__name__, cls)
        todo.extend(cls.__subclasses__())
    return found


def rebuild_error(err: dict[str, Any]) -> IoseaError:
    """The IoseaError the service reported, as the same class with the same message and exit code."""
    cls = _error_classes().get(str(err.get("type")), IoseaError)
    exc = cls.__new__(cls)
    IoseaError.__init__(exc, str(err.get("message", "")), details=list(err.get("details") or []))
    if isinstance(exc, errors.WDFError):
        exc.problems = list(exc.details)
    code = err.get("exit_code")
    if isinstance(code, int) and code != exc.exit_code:
        exc.exit_code = code
    return exc


def _p(text: str) -> str:
    return quote(text, safe="")


def _wdf_body(ctx: ServiceContext, workflow: str | None, session: str | None, variables, *, check_name: bool):
    """The WDF as the caller reads it, after the checks the manager makes before reading it."""
    from ..wdf.loader import read_text
    from ..wdf.problems import Problems

    if workflow is None:
        return {"workflow": None, "variables": variables, "session": session}
    if check_name or session:
        manager.check_session_name(session)
    manager.wdf_variables(ctx.user, workflow, session, variables)  # refuses built-in names
    text = read_text(Path(workflow), Problems(workflow))
    return {
        "workflow": workflow,
        "resolved": str(Path(workflow).resolve()),
        "text": text,
        "variables": variables,
        "session": session,
    }


# ---------------------------------------------------------------------------------------------
# the manager's functions, through the service


def validate(ctx: ServiceContext, workflow_path: str, variables: dict[str, str], session: str | None = None):
    """Validate a WDF against the service's site; return the Workflow."""
    from ..wdf import Workflow

    body = _wdf_body(ctx, workflow_path, session, variables, check_name=False)
    answer = ctx.call("POST", "/v1/validate", body=body)
    ctx.site = RemoteSite(Path(answer["site"]))
    return Workflow.from_dict(answer["workflow"])


def show(ctx: ServiceContext, what: str) -> list[dict[str, Any]]:
    """What the service's site offers."""
    answer = ctx.call("GET", f"/v1/site/{_p(what)}")
    ctx.site = RemoteSite(Path(answer["site"]))
    return answer["rows"]


def start(ctx: ServiceContext, workflow_path, session, variables, progress=manager._quiet) -> dict[str, Any]:
    """Start a session through the service, its progress printed as it comes."""
    body = _wdf_body(ctx, workflow_path, session, variables, check_name=True)
    return ctx.call("POST", "/v1/sessions", body=body, on_event=lambda e: progress(e.get("progress", "")))


def stop(ctx: ServiceContext, session, *, force: bool = False, progress=manager._quiet) -> dict[str, Any]:
    """Stop a session through the service."""
    name = manager.check_session_name(session)
    return ctx.call(
        "POST",
        f"/v1/sessions/{name}/stop",
        body={"force": force},
        slurm_token=True,
        on_event=lambda e: progress(e.get("progress", "")),
    )


def list_sessions(ctx: ServiceContext, *, include_ended: bool = False) -> list[dict[str, Any]]:
    """The caller's sessions."""
    params = {"all": "true"} if include_ended else None
    return ctx.call("GET", "/v1/sessions", params=params)["sessions"]


def status(ctx: ServiceContext, session) -> dict[str, Any]:
    """One of the caller's sessions."""
    name = manager.check_session_name(session)
    return ctx.call("GET", f"/v1/sessions/{name}")


def run(ctx: ServiceContext, session, step, cwd: str | None = None) -> dict[str, Any]:
    """Submit a step: its batch script is read here, with the caller's rights, and sent."""
    from .. import jobs, steps

    step = steps.check_step_name(step)
    name = manager.check_session_name(session)
    cwd = cwd or os.getcwd()
    base = f"/v1/sessions/{name}/steps/{_p(step)}"
    script_name = ctx.call("GET", base)["script"]
    sent = None
    if script_name is not None:
        script = Path(cwd, script_name)
        if not script.is_file():
            raise UsageError(f"the step's batch script {script} does not exist")
        try:
            data = script.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read the step's batch script {script}: {exc.strerror}") from None
        # Checked here too, so a refusal names the user's file, not the copy the service runs.
        jobs.check_directives(jobs._directives(script), str(script))
        sent = {"name": script_name, "content_b64": base64.b64encode(data).decode()}
    return ctx.call("POST", f"{base}/runs", body={"cwd": cwd, "script": sent}, slurm_token=True)


def follow(ctx: ServiceContext, session, step: str, instance: int, on_update) -> dict[str, Any]:
    """Follow a step run to its end, each update passed to ``on_update``."""
    name = manager.check_session_name(session)
    return ctx.call(
        "GET",
        f"/v1/sessions/{name}/steps/{_p(step)}/runs/{int(instance)}/follow",
        on_event=lambda e: on_update(e["update"]) if "update" in e else None,
    )


def cancel(ctx: ServiceContext, session, step: str | None = None, instance: int | None = None) -> list[str]:
    """Cancel what `run` started in a session."""
    name = manager.check_session_name(session)
    body = {"step": step, "instance": instance}
    return ctx.call("POST", f"/v1/sessions/{name}/cancel", body=body, slurm_token=True)["cancelled"]


def access(ctx: ServiceContext, session, command: list[str], **options: Any) -> int:
    """Open the interactive allocation here, as the caller, and record it through the service."""
    from .. import access as interactive

    name = manager.check_session_name(session)
    record = ctx.call("POST", f"/v1/sessions/{name}/access", slurm_token=True)
    mine: list[dict[str, Any]] = []

    def update(change: Callable[[list[dict[str, Any]]], None], require_active: bool = False) -> None:
        # The service itself refuses a new access to a session that is no longer ACTIVE.
        change(mine)
        for entry in mine:
            ctx.call("PUT", f"/v1/sessions/{name}/accesses/{_p(entry['token'])}", body=entry)

    with tempfile.TemporaryDirectory(prefix="iosea-wf-access-") as scratch:
        local = manager.Context(state_dir=scratch, user=ctx.user, verbose=ctx.verbose)
        return interactive.open_allocation(local, record, command, update_accesses=update, **options)
