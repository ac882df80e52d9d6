"""Who is calling: the one place that decides who the user is.

In-process (no Workflow Manager service configured), the caller is the Unix user running the
command. Through the site's Workflow Manager service, the caller is whoever a MUNGE credential
proves, never a name written in the request: the CLI has munged encode a digest of the request
(method, path, query and body) as the credential's payload, and the service has munged decode it,
takes the UID munged vouches for, and checks that the payload is the digest of the request it
came with (a credential lifted from one request cannot be used for another). munged itself
refuses a credential decoded twice (a replay) or past its time-to-live. On the Unix socket the
kernel's peer credentials must name the same UID: a credential someone else made is refused there
even before it expires.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import socket
import struct
import subprocess
from dataclasses import dataclass

from .errors import Unauthenticated

CREDENTIAL_HEADER = "X-Iosea-Munge"
# The caller's Slurm token travels beside its proof; it proves nothing to the service itself.
SLURM_JWT_HEADER = "X-Iosea-Slurm-Jwt"
# Short enough that a credential seen in a log is useless soon, long enough for a slow request.
CREDENTIAL_TTL = 60
_PAYLOAD_PREFIX = "iosea-wf-request-v1 "

# unmunge's exit statuses for credentials that are valid MUNGE but must not be accepted
# (munge.h: EMUNGE_CRED_EXPIRED, EMUNGE_CRED_REWOUND, EMUNGE_CRED_REPLAYED).
_REFUSED = {15: "expired", 16: "rewound (its time is in the future)", 17: "replayed (already used once)"}


@dataclass(frozen=True)
class Caller:
    """A user whose identity was proven: name, uid and gid."""

    user: str
    uid: int
    gid: int


def current_user() -> str:
    """The name of the Unix user running this process."""
    return user_name(os.geteuid())


def user_name(uid: int) -> str:
    """The account name of a uid (``uid<N>`` when it has none)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


def request_digest(method: str, path: str, query: bytes, body: bytes) -> str:
    """The payload a request's credential must carry: a digest of everything that says what it asks."""
    h = hashlib.sha256()
    h.update(method.upper().encode() + b"\n" + path.encode() + b"\n" + query + b"\n")
    h.update(body)
    return _PAYLOAD_PREFIX + h.hexdigest()


def make_credential(payload: str, ttl: int = CREDENTIAL_TTL) -> str:
    """A MUNGE credential of this process's user carrying ``payload`` (client side)."""
    try:
        done = subprocess.run(
            ["munge", f"--ttl={ttl}"], input=payload.encode(), capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unauthenticated(f"cannot get a MUNGE credential to prove who you are: {exc}") from None
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip() or f"munge exit status {done.returncode}"
        raise Unauthenticated(f"cannot get a MUNGE credential to prove who you are: {why}")
    return done.stdout.decode().strip()


def verify_credential(credential: str | None, payload: str, peer_uid: int | None = None) -> Caller:
    """The caller a MUNGE credential proves for the request whose digest is ``payload`` (service side).

    Raises :class:`Unauthenticated` when there is no credential, when munged does not accept it
    (invalid, expired, replayed), when it was made for another request, or when ``peer_uid`` (the
    Unix socket's peer) is not the user the credential names.
    """
    if not credential:
        raise Unauthenticated(f"the request carries no MUNGE credential ({CREDENTIAL_HEADER} header)")
    try:
        done = subprocess.run(
            ["unmunge", "--numeric", "--keys=UID,GID"],
            input=credential.encode(),
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unauthenticated(f"the service cannot check MUNGE credentials: {exc}") from None
    if done.returncode in _REFUSED:
        raise Unauthenticated(f"the request's MUNGE credential is {_REFUSED[done.returncode]}")
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip().removeprefix("unmunge: Error: ")
        raise Unauthenticated(f"the request's MUNGE credential is not valid: {why or done.returncode}")
    head, _, body = done.stdout.partition(b"\n\n")
    meta = dict(
        (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in head.decode().splitlines())
    )
    try:
        uid, gid = int(meta["UID"]), int(meta["GID"])
    except (KeyError, ValueError):
        raise Unauthenticated("the request's MUNGE credential names no user") from None
    if body.decode(errors="replace") != payload:
        raise Unauthenticated("the request's MUNGE credential was made for another request")
    if peer_uid is not None and peer_uid != uid:
        raise Unauthenticated(
            f"the request's MUNGE credential is of {user_name(uid)} but was sent by {user_name(peer_uid)}"
        )
    return Caller(user_name(uid), uid, gid)


def peer_uid(sock: socket.socket | None) -> int | None:
    """The uid of the process at the other end of a Unix socket (None for any other socket)."""
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    return uid
