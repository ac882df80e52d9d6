"""Limits on what one request may make the service hold: its body's size.

A request body is a WDF and at most one batch script (base64) in JSON; anything far larger is
refused (HTTP 413) before the service reads it into memory, declared (``Content-Length``) or
streamed (chunked).
"""

from __future__ import annotations

import json

from ..errors import UsageError

MAX_BODY_BYTES = 8 << 20


class BodyLimit:
    """ASGI middleware: refuse with 413 a request whose body exceeds ``limit`` bytes."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        """Pass the request on, counting its body; answer 413 as soon as it is too large."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        seen, refused = 0, False

        async def counted():
            # Past the limit: answer 413 now, and tell the app the client is gone (FastAPI would
            # turn an exception raised while it reads the body into its own 400).
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    refused = True
                    await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def unless_refused(message):
            if not refused:
                await send(message)

        await self.app(scope, counted, unless_refused)

    async def _refuse(self, send) -> None:
        exc = UsageError(f"the request is larger than the service accepts ({self.limit >> 20} MiB)")
        body = json.dumps(
            {"error": {"type": type(exc).__name__, "exit_code": exc.exit_code, "message": exc.message,
                       "details": []}}
        ).encode()  # fmt: skip
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
