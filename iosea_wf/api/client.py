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
import http.client
import ipaddress
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlencode, urlsplit

from .. import errors, identity
from ..errors import IoseaError, ServiceUnreachable, SiteError, Unauthenticated, UsageError
from ..sessions import check_session_name, check_step_name, session_summary  # noqa: F401 (`ops` API)
from .settings import parse_url

NDJSON = "application/x-ndjson"


@dataclass(frozen=True)
class RemoteSite:
    """What the CLI prints of the service's site: its inventory path there."""

    path: Path


# A service that does not answer at all is seen at connect; start and stop may take minutes, so
# nothing bounds the wait for an answer once connected.
CONNECT_TIMEOUT = 5.0


class _UnixConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a Unix socket."""

    def __init__(self, path: str):
        super().__init__("iosea-wm", timeout=CONNECT_TIMEOUT)
        self._path = path

    def connect(self) -> None:
        """Connect to the socket (bounded), then wait for answers without a bound."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(self._path)
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class _TcpConnection(http.client.HTTPConnection):
    """Plain HTTP/1.1 over TCP (the site's network): connect bounded, answers unbounded."""

    def connect(self) -> None:
        """Connect (bounded by the connection's timeout), then wait for answers without a bound."""
        super().connect()
        self.sock.settimeout(None)


class ServiceContext:
    """A connection to the site's Workflow Manager, standing where a manager Context stands in-process.

    The standard library's http.client, one connection per request: importing httpx (with its
    command-line and TLS machinery) cost about 0.1 s of every command.
    """

    def __init__(self, url: str, *, verbose: bool = False):
        self.url = url
        self.user = identity.current_user()
        self.verbose = verbose
        self.site: RemoteSite | None = None
        self._socket_path, self._base = parse_url(url)

    def _connection(self) -> http.client.HTTPConnection:
        if self._socket_path:
            return _UnixConnection(self._socket_path)
        parts = urlsplit(self._base)
        return _TcpConnection(parts.hostname, parts.port, timeout=CONNECT_TIMEOUT)

    def _check_token_channel(self) -> None:
        """Refuse to send a Slurm token over plain TCP beyond this host (SiteError): it is a credential."""
        if self._socket_path:
            return
        host = urlsplit(self._base).hostname or ""
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise SiteError(
                f"the Workflow Manager at {self.url} is reached over plain TCP: this command must send "
                "your Slurm token, which is never sent in clear over the network (the service has no "
                "TLS yet); use its Unix socket on the host it runs on"
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
        token_lifespan: int = 120,
        doing: tuple[str, str] | None = None,
    ) -> Any:
        """One authenticated request; return its JSON result or raise the error it answered.

        ``doing``: what the request changes and the session it is about (``("the start of
        session s1", "s1")``), for the message of an interrupted client.
        """
        if slurm_token:
            self._check_token_channel()
        content = json.dumps(body).encode() if body is not None else b""
        query = urlencode(params).encode() if params else b""
        target = path + ("?" + query.decode() if query else "")
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn = self._connection()
        sent = "nothing"  # how much of the request the service may have: an interrupt says so
        try:
            # Connected first: a service that is not there is told as such (exit 10) even when
            # the credential could not be made either (munged down too).
            try:
                conn.connect()
            except OSError as exc:
                raise ServiceUnreachable(
                    f"the Workflow Manager at {self.url} cannot be reached: {_why(exc)}"
                ) from None
            # The service digests the request as it decodes it: the path percent-decoded, the query raw.
            payload = identity.request_digest(method, unquote(path), query, content)
            headers[identity.CREDENTIAL_HEADER] = identity.make_credential(payload)
            if slurm_token:
                from .. import slurm

                token = slurm.user_token(token_lifespan)
                if token:
                    headers[identity.SLURM_JWT_HEADER] = token
            try:
                sent = "part"
                conn.request(method, target, body=content if body is not None else None, headers=headers)
                sent = "all"
                response = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                raise ServiceUnreachable(
                    f"the Workflow Manager at {self.url} cannot be reached: {_why(exc)}"
                ) from None
            try:
                if response.getheader("content-type", "").startswith(NDJSON):
                    return self._events(response, on_event)
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                raise ServiceUnreachable(
                    f"the Workflow Manager at {self.url} went away during the request ({_why(exc)}); "
                    "see `iosea-wf status` for what it did"
                ) from None
        except KeyboardInterrupt as exc:
            # Ctrl-C or SIGTERM of the CLI: the service carries a change on to its end (or rolls
            # it back) whoever listens; only this client stops waiting. A request that changes
            # nothing (doing None) leaves nothing to say.
            if doing and not getattr(exc, "note", ""):
                exc.note = _left_to_service(self.url, sent, doing)  # type: ignore[attr-defined]
            raise
        finally:
            conn.close()
        return _result(response.status, data)

    def _events(self, response: http.client.HTTPResponse, on_event) -> Any:
        while True:
            line = response.readline()
            if not line:
                break
            if not line.strip():
                continue
            event = json.loads(line)
            if "result" in event:
                return event["result"]
            if "error" in event:
                raise rebuild_error(event["error"])
            if on_event:
                on_event(event)
        # http.client's readline of a chunked body ends quietly where the connection broke.
        raise ServiceUnreachable(
            f"the Workflow Manager at {self.url} went away during the request (its answer ended "
            "without a result); see `iosea-wf status` for what it did"
        )


def _left_to_service(url: str, sent: str, doing: tuple[str, str] | None) -> str:
    """What an interrupted client tells of its request: not sent, perhaps sent, or the service's now."""
    what, session = doing or ("the request", None)
    if sent == "nothing":
        return f"nothing was sent to the Workflow Manager at {url}: {what} was not asked for"
    follow = f"`iosea-wf status SESSION={session}`" if session else "`iosea-wf status`"
    if sent == "part":
        return f"{what} may not have reached the Workflow Manager at {url}: {follow} shows whether it did"
    return (
        f"stopped waiting; the Workflow Manager at {url} goes on with {what} whoever listens: "
        f"follow it with {follow}"
    )


def _why(exc: BaseException) -> str:
    """What went wrong with the connection, in words (some of http.client's exceptions have none)."""
    return str(exc) or type(exc).__name__


def _result(status: int, raw: bytes) -> Any:
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if status < 400 and data is not None:
        return data
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        raise rebuild_error(data["error"])
    if status == 401:
        raise Unauthenticated("the Workflow Manager refused the request as unauthenticated")
    text = raw.decode(errors="replace")[:200]
    raise IoseaError(f"the Workflow Manager answered HTTP {status}: {text}")


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


def _quiet(_: str) -> None:
    pass


def _p(text: str) -> str:
    return quote(text, safe="")


def _session(session: str | None) -> tuple[str, dict[str, str] | None]:
    """The API path of a session (``NAME`` or ``OWNER/NAME``, checked here first) and its query."""
    from ..sharing import split_ref

    owner, name = split_ref(session)
    return f"/v1/sessions/{name}", ({"owner": owner} if owner else None)


def _wdf_body(ctx: ServiceContext, workflow: str | None, session: str | None, variables, *, check_name: bool):
    """The WDF as the caller reads it, after the checks the manager makes before reading it."""
    from ..manager import wdf_variables
    from ..wdf.loader import read_text
    from ..wdf.problems import Problems

    if workflow is None:
        return {"workflow": None, "variables": variables, "session": session}
    if check_name or session:
        check_session_name(session)
    wdf_variables(ctx.user, workflow, session, variables)  # refuses built-in names
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


def start(
    ctx: ServiceContext, workflow_path, session, variables, progress=_quiet, *, wait_resources=None
) -> dict[str, Any]:
    """Start a session through the service, its progress printed as it comes.

    With the caller's Slurm token: each service's allocation is the caller's own job.
    """
    body = _wdf_body(ctx, workflow_path, session, variables, check_name=True)
    body["wait_resources"] = wait_resources
    return ctx.call(
        "POST",
        "/v1/sessions",
        body=body,
        slurm_token=True,
        on_event=lambda e: progress(e.get("progress", "")),
        doing=(f"the start of session {session}", session),
        # The token cancels the allocations of a start refused after its wait: it must outlive it.
        token_lifespan=120 + int(wait_resources or 0),
    )


def stop(ctx: ServiceContext, session, *, force: bool = False, progress=_quiet) -> dict[str, Any]:
    """Stop a session through the service."""
    path, owner = _session(session)
    return ctx.call(
        "POST",
        f"{path}/stop",
        params=owner,
        body={"force": force},
        slurm_token=True,
        on_event=lambda e: progress(e.get("progress", "")),
        doing=(f"the stop of session {session}", session),
    )


def list_sessions(ctx: ServiceContext, *, include_ended: bool = False) -> list[dict[str, Any]]:
    """The caller's sessions."""
    params = {"all": "true"} if include_ended else None
    return ctx.call("GET", "/v1/sessions", params=params)["sessions"]


def status(ctx: ServiceContext, session) -> dict[str, Any]:
    """One of the caller's sessions."""
    path, owner = _session(session)
    return ctx.call("GET", path, params=owner)


def run(ctx: ServiceContext, session, step, cwd: str | None = None) -> dict[str, Any]:
    """Submit a step: its batch script is read here, with the caller's rights, and sent."""
    from .. import jobs

    step = check_step_name(step)
    path, owner = _session(session)
    cwd = cwd or os.getcwd()
    base = f"{path}/steps/{_p(step)}"
    script_name = ctx.call("GET", base, params=owner)["script"]
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
    return ctx.call(
        "POST",
        f"{base}/runs",
        params=owner,
        body={"cwd": cwd, "script": sent},
        slurm_token=True,
        doing=(f"the submission of step {step}", session),
    )


def follow(ctx: ServiceContext, session, step: str, instance: int, on_update) -> dict[str, Any]:
    """Follow a step run to its end, each update passed to ``on_update``."""
    path, owner = _session(session)
    return ctx.call(
        "GET",
        f"{path}/steps/{_p(step)}/runs/{int(instance)}/follow",
        params=owner,
        on_event=lambda e: on_update(e["update"]) if "update" in e else None,
    )


def cancel(ctx: ServiceContext, session, step: str | None = None, instance: int | None = None) -> list[str]:
    """Cancel what `run` started in a session."""
    path, owner = _session(session)
    if step is not None:
        check_step_name(step)
    body = {"step": step, "instance": instance}
    doing = (f"the cancel in session {session}", session)
    answer = ctx.call("POST", f"{path}/cancel", params=owner, body=body, slurm_token=True, doing=doing)
    return answer["cancelled"]


def access(ctx: ServiceContext, session, command: list[str], **options: Any) -> int:
    """Open the interactive allocation here, as the caller, and record it through the service."""
    import tempfile

    from .. import access as interactive
    from ..manager import Context

    path, owner = _session(session)
    record = ctx.call("POST", f"{path}/access", params=owner, slurm_token=True)
    mine: list[dict[str, Any]] = []

    def update(change: Callable[[list[dict[str, Any]]], None], require_active: bool = False) -> None:
        # The service itself refuses a new access to a session that is no longer ACTIVE.
        change(mine)
        for entry in mine:
            ctx.call(
                "PUT",
                f"{path}/accesses/{_p(entry['token'])}",
                params=owner,
                body=entry,
                doing=(f"the record of an access to session {session}", session),
            )

    with tempfile.TemporaryDirectory(prefix="iosea-wf-access-") as scratch:
        local = Context(state_dir=scratch, user=ctx.user, verbose=ctx.verbose)
        return interactive.open_allocation(local, record, command, update_accesses=update, **options)


def share(ctx: ServiceContext, session, user, mode=None, expires_s=None) -> dict[str, Any]:
    """Share one of the caller's sessions with a user."""
    path, owner = _session(session)
    body = {"user": user, "mode": mode or "ro", "expires_s": expires_s}
    return ctx.call("POST", f"{path}/shares", params=owner, body=body)


def unshare(ctx: ServiceContext, session, user) -> dict[str, Any]:
    """End a user's share of one of the caller's sessions."""
    from ..sharing import check_user_name

    path, owner = _session(session)
    return ctx.call("DELETE", f"{path}/shares/{_p(check_user_name(user))}", params=owner)


def share_token(ctx: ServiceContext, session, mode=None, expires_s=None) -> dict[str, Any]:
    """A one-time token sharing one of the caller's sessions."""
    path, owner = _session(session)
    body = {"user": None, "mode": mode or "ro", "expires_s": expires_s}
    return ctx.call("POST", f"{path}/shares", params=owner, body=body)


def join(ctx: ServiceContext, token) -> dict[str, Any]:
    """Redeem a share token."""
    return ctx.call("POST", "/v1/joins", body={"token": token})
