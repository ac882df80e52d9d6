"""Who calls the service: a FastAPI dependency that has identity.py check the request's proof.

The proof is the request's MUNGE credential, whose payload must be the digest of this very request
(method, path, query, body), and on the Unix socket the kernel's peer credentials, which the
server's connection protocol puts in the ASGI scope under :data:`PEER_UID`. Nothing the request
says about a user name is ever read.
"""

from __future__ import annotations

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from .. import identity

PEER_UID = "iosea.peer_uid"


async def caller(request: Request) -> identity.Caller:
    """The proven caller of a request, or Unauthenticated (HTTP 401)."""
    body = await request.body()
    digest = identity.request_digest(
        request.method, request.scope["path"], request.scope.get("query_string", b""), body
    )
    return await run_in_threadpool(
        identity.verify_credential,
        request.headers.get(identity.CREDENTIAL_HEADER),
        digest,
        request.scope.get(PEER_UID),
    )


def slurm_jwt(request: Request) -> str | None:
    """The caller's Slurm token, when the CLI sent one (kept in memory for this request only)."""
    return request.headers.get(identity.SLURM_JWT_HEADER) or None
