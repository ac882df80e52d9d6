"""Run the Workflow Manager service: uvicorn on a Unix socket (and optionally TCP).

The Unix socket is open to every user (mode 0666): who may do what is decided per request from
the caller's MUNGE credential, and on that socket also from the kernel's peer credentials, which
:class:`PeerCredentialsProtocol` reads from the connection and puts in each request's ASGI scope.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import sys
from pathlib import Path

from uvicorn.protocols.http.h11_impl import H11Protocol

from .. import identity
from ..errors import IoseaError, UsageError
from . import auth


class PeerCredentialsProtocol(H11Protocol):
    """uvicorn's h11 protocol that puts the Unix socket peer's uid in every request's scope."""

    def connection_made(self, transport) -> None:  # type: ignore[override]
        """Read SO_PEERCRED once per connection and wrap the app to pass it on."""
        super().connection_made(transport)
        uid = identity.peer_uid(transport.get_extra_info("socket"))
        app = self.app

        async def with_peer(scope, receive, send):
            scope[auth.PEER_UID] = uid
            await app(scope, receive, send)

        self.app = with_peer


def bind_unix(path: Path) -> socket.socket:
    """A listening Unix socket at ``path`` (a stale one is replaced; a live one is an error)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise UsageError(f"{path} exists and is not a socket: choose another --socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # left by a service that died
        else:
            raise IoseaError(f"a Workflow Manager already listens on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o666)
    sock.listen(128)
    return sock


def bind_tcp(address: str) -> socket.socket:
    """A listening TCP socket for ``HOST:PORT``."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--tcp expects HOST:PORT, got {address!r}")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), int(port)))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {address}: {exc.strerror}") from None
    sock.listen(128)
    return sock


def serve(
    site_dir: str | None,
    state_dir: str | Path,
    socket_path: Path,
    tcp: str | None = None,
    *,
    verbose: bool = False,
    ready=None,
) -> int:
    """Load the site, open the store, listen and serve until SIGTERM or SIGINT; return 0."""
    import uvicorn

    from .app import Service, create_app

    service = Service(site_dir, state_dir, verbose=verbose)
    config = uvicorn.Config(
        create_app(service),
        http=PeerCredentialsProtocol,
        lifespan="off",
        log_level="info",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)

    def stop(_signum, _frame) -> None:
        server.should_exit = True

    # From before the socket is bound, SIGINT/SIGTERM ask the server to stop: one that comes
    # before uvicorn installs its own handlers makes it shut down as soon as it starts, and the
    # one uvicorn re-raises once shut down lands here too, so serve() removes its socket and
    # returns 0 (the console script's early handler would exit at once, 143, socket left).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    sockets = [bind_unix(socket_path)]
    try:
        if tcp:
            sockets.append(bind_tcp(tcp))
        print(
            f"iosea-wf serve: site {service.site.path}, store {service.store.state_dir}, "
            f"listening on unix://{socket_path}" + (f" and http://{tcp}" if tcp else ""),
            file=sys.stderr,
            flush=True,
        )
        watching = service.watch_allocations()
        if ready:
            ready()
        server.run(sockets=sockets)
        watching.set()
    finally:
        for s in sockets:
            s.close()
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
    return 0
