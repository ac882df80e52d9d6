"""Session sharing: who besides its owner may use a session, and for what.

A session's owner shares it with another user, read-only (``ro``: ``status`` and ``access``,
every service mounted read-only) or read-write (``rw``: also ``run``, whose jobs are the user's
own, and ``cancel`` of their own runs), by name (``share USER=bob``) or with a one-time token
(``share --token``, redeemed by ``join``). Stopping, sharing, unsharing and cancelling someone
else's run stay the owner's. A user names a session shared with them ``OWNER/NAME``.

Shares live in the session's record (``shares``: user -> mode, since, expiry, how), so they end
with it; tokens are kept as their SHA-256 only (``share_tokens``), with their mode, expiry and who
redeemed them. Who the caller is comes from the Context (:mod:`iosea_wf.identity` decided it);
nothing here reads a user name from a request as proof. Every write goes through
:meth:`Store.modify_session`, which re-reads the record under the store's lock.

In-process each user's sessions live in their own state directory, which nobody else uses: the
same rules hold there, but a share only matters where several users use one store, that is
through the site's Workflow Manager service.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from typing import Any

from .errors import Forbidden, SessionConflict, SessionNotFound, UsageError
from .sessions import check_session_name

RO, RW = "ro", "rw"
MODES = (RO, RW)
# What a command needs of the caller on a session.
READ = "read"  # status, access, following a run
RUN = "run"  # run, cancel of one's own runs
OWNER = "owner"  # stop, share, unshare, cancel of others' runs

DEFAULT_TOKEN_LIFETIME_S = 24 * 3600
# A share or token lives at most this long: a forgotten token must not open a session for good.
MAX_LIFETIME_S = 30 * 24 * 3600
TOKEN_PREFIX = "iwfs_"
_TOKEN = re.compile(r"^iwfs_[A-Za-z0-9_-]{20,128}$")
# A Unix account name as useradd accepts it (and nothing that could pass for a path).
_USER = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?$")


def parse_duration(text: str | None, what: str = "--expires") -> int:
    """Seconds of a share's lifetime written ``90s``, ``30m``, ``12h`` or ``7d`` (UsageError otherwise)."""
    from .durations import parse_duration as seconds_of

    seconds = seconds_of(text, what)
    check_lifetime(seconds, what)
    return seconds


def check_lifetime(seconds: int | None, what: str = "--expires") -> int | None:
    """Refuse a lifetime that is not positive or longer than 30 days (UsageError)."""
    if seconds is not None and not 0 < seconds <= MAX_LIFETIME_S:
        raise UsageError(f"{what}: a share lasts 1 s to 30 days (30d), not {seconds} s")
    return seconds


def check_mode(mode: str | None) -> str:
    """``ro`` (the default) or ``rw``, else UsageError."""
    mode = mode or RO
    if mode not in MODES:
        raise UsageError(f"--mode: {mode!r} is not a share mode: choose ro or rw")
    return mode


def check_user_name(name: str | None, what: str = "USER=") -> str:
    """A user name as written on the command line (never a path, never empty), else UsageError."""
    if not name:
        raise UsageError(f"{what} is mandatory (the user to share the session with, e.g. USER=bob)")
    if not _USER.match(name):
        raise UsageError(f"{what}: {name!r} is not a user name")
    return name


def split_ref(ref: str | None) -> tuple[str | None, str]:
    """(owner or None, name) of ``NAME`` or ``OWNER/NAME`` (SESSION=), each checked."""
    if ref and "/" in ref:
        owner, _, name = ref.partition("/")
        if not _USER.match(owner):
            raise UsageError(
                f"invalid session name {ref!r}: a session another user shares is named OWNER/NAME, "
                "OWNER a user name"
            )
        return owner, check_session_name(name)
    return None, check_session_name(ref)


def join_ref(owner: str | None, name: str) -> str:
    """``OWNER/NAME`` (or ``NAME`` without an owner): how the API's ``owner`` query names a session."""
    return f"{owner}/{name}" if owner else name


def active_share(record: dict[str, Any] | None, user: str, now: float | None = None) -> dict[str, Any] | None:
    """The share ``user`` holds on a session now (None: none, or it expired)."""
    if record is None:
        return None
    share = (record.get("shares") or {}).get(user)
    now = time.time() if now is None else now
    if share is None or (share.get("expires_at") is not None and now >= share["expires_at"]):
        return None
    return share


def mode_for(record: dict[str, Any], user: str) -> str | None:
    """The share mode ``user`` uses a session with: None for its owner (or no share)."""
    if record["owner"] == user:
        return None
    share = active_share(record, user)
    return share["mode"] if share else None


def resolve(tx, user: str, ref: str | None, need: str = OWNER, what: str = "use") -> dict[str, Any]:
    """The session ``ref`` names for ``user``, if they may ``what`` it (``need``: READ, RUN or OWNER).

    A session of another owner that is not shared with ``user`` is answered as one that does not
    exist (SessionNotFound, exit 4); one shared, but not for this, is Forbidden (exit 12).
    """
    owner, name = split_ref(ref)
    if owner is None or owner == user:
        record = tx.session(user, name)
        if record is None:
            raise SessionNotFound(f"user {user} has no session named {name!r} (see `iosea-wf list --all`)")
        return record
    record = tx.session(owner, name)
    if record is None:
        raise SessionNotFound(f"no session {owner}/{name} is shared with user {user} (see `iosea-wf list`)")
    check(record, user, need, what)
    return record


def check(record: dict[str, Any], user: str, need: str, what: str) -> None:
    """Raise as :func:`resolve` does unless ``user`` may ``what`` this session (found already).

    Also called again under the lock of a write that acts on a share (a `run`'s instance is
    recorded only if the share still allows it then).
    """
    owner, name = record["owner"], record["name"]
    if owner == user:
        return
    share = active_share(record, user)
    if share is None:
        raise SessionNotFound(f"no session {owner}/{name} is shared with user {user} (see `iosea-wf list`)")
    if need == OWNER:
        raise Forbidden(f"only {owner}, its owner, may {what} session {owner}/{name}")
    if need == RUN and share["mode"] != RW:
        raise Forbidden(
            f"session {owner}/{name} is shared with {user} read-only: {what} needs a read-write share "
            f"(its owner gives one with `iosea-wf share SESSION={name} USER={user} --mode rw`)"
        )


def with_access_of(ctx, ref: str | None, token: str) -> dict[str, Any] | None:
    """The session ``ref`` names if the caller opened its interactive access ``token``, shared now or not.

    An access opened under a share that ended since is still recorded to its end (its job id,
    when it ended): what a user started ends as Slurm ends it, and shows so to the owner.
    """
    owner, name = split_ref(ref)
    with ctx.store.transaction(shared=True) as tx:
        record = tx.session(owner or ctx.user, name)
    mine = record is not None and any(
        a.get("token") == token and a.get("user") == ctx.user for a in record.get("accesses", [])
    )
    return dict(record) if mine else None


def owned(ctx, ref: str | None, what: str) -> dict[str, Any]:
    """The caller's own session ``ref`` names, for a command only its owner may run (``what``)."""
    with ctx.store.transaction(shared=True) as tx:
        return dict(resolve(tx, ctx.user, ref, OWNER, what))


def _live(record: dict[str, Any], what: str) -> None:
    from . import store as st

    if record["state"] not in (st.STARTING, st.ACTIVE):
        raise SessionConflict(
            f"session {record['name']!r} is {record['state']}: only a live session can be {what}"
        )


def _expiry(now: float, seconds: int | None) -> float | None:
    return now + check_lifetime(seconds) if seconds is not None else None


def share(ctx, ref: str | None, user: str | None, mode: str | None = RO, expires_s: int | None = None):
    """Share the caller's session with ``user``, ``ro`` or ``rw``, for ``expires_s`` (else until unshare)."""
    import pwd

    from . import store as st

    mode, user = check_mode(mode), check_user_name(user)
    record = owned(ctx, ref, "share")
    if user == ctx.user:
        raise UsageError(f"session {record['name']!r} is yours: it needs no share with {user}")
    try:
        pwd.getpwnam(user)
    except KeyError:
        raise UsageError(f"user {user!r} is unknown on this host: nobody to share with") from None
    _live(record, "shared")
    now = time.time()
    grant = {"mode": mode, "since": now, "expires_at": _expiry(now, expires_s), "via": "user"}

    def change(current: dict[str, Any]) -> None:
        current.setdefault("shares", {})[user] = grant

    ctx.store.modify_session(record["id"], change, expect=(st.STARTING, st.ACTIVE))
    return {"session": record["name"], "owner": record["owner"], "user": user, **grant}


def unshare(ctx, ref: str | None, user: str | None) -> dict[str, Any]:
    """End ``user``'s share of the caller's session; what they started runs on as Slurm runs it."""
    user = check_user_name(user)
    record = owned(ctx, ref, "unshare")
    had: dict[str, Any] = {}

    def change(current: dict[str, Any]) -> None:
        had.update((current.get("shares") or {}).pop(user, None) or {})

    ctx.store.modify_session(record["id"], change)
    return {"session": record["name"], "owner": record["owner"], "user": user, "was_shared": bool(had)}


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(ctx, ref: str | None, mode: str | None = RO, expires_s: int | None = None) -> dict[str, Any]:
    """A one-time token that shares the caller's session with whoever redeems it (``join``).

    Only its SHA-256 is stored. It can be redeemed until ``expires_s`` (default 24 h) from now,
    and the share it gives ends then too.
    """
    from . import store as st

    mode = check_mode(mode)
    record = owned(ctx, ref, "share")
    _live(record, "shared")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    now = time.time()
    expires_at = _expiry(now, DEFAULT_TOKEN_LIFETIME_S if expires_s is None else expires_s)
    entry = {"sha256": _digest(token), "mode": mode, "created_at": now, "expires_at": expires_at}

    def change(current: dict[str, Any]) -> None:
        current["share_tokens"] = [*current.get("share_tokens", []), entry]

    ctx.store.modify_session(record["id"], change, expect=(st.STARTING, st.ACTIVE))
    return {
        "token": token,
        "session": record["name"],
        "owner": record["owner"],
        "mode": mode,
        "expires_at": expires_at,
    }


def _token_entry(record: dict[str, Any], digest: str) -> dict[str, Any] | None:
    return next(
        (t for t in record.get("share_tokens", []) if hmac.compare_digest(t.get("sha256", ""), digest)), None
    )


def join(ctx, token: str | None) -> dict[str, Any]:
    """Redeem a share token, once: the caller gets its session shared with them (Forbidden if not valid)."""
    from . import store as st

    token = (token or "").strip()
    if not _TOKEN.match(token):
        raise UsageError(
            f"not a share token (one starts with {TOKEN_PREFIX!r}; `iosea-wf share --token` makes one)"
        )
    digest = _digest(token)
    with ctx.store.transaction(shared=True) as tx:
        found = next((s for s in tx.live_sessions() if _token_entry(s, digest)), None)
    if found is None:
        raise Forbidden("this share token is unknown, or the session it shares has ended")
    if found["owner"] == ctx.user:
        raise UsageError(f"this token shares your own session {found['name']!r}: give it to another user")
    now = time.time()
    grant: dict[str, Any] = {}

    def change(current: dict[str, Any]) -> None:
        entry = _token_entry(current, digest)
        if entry is None:  # pragma: no cover - tokens are never removed from a record
            raise Forbidden("this share token is unknown, or the session it shares has ended")
        if entry.get("redeemed_by"):
            used = _when(entry["redeemed_at"])
            raise Forbidden(f"this share token was already used, at {used}: a token works once")
        if now >= entry["expires_at"]:
            raise Forbidden(f"this share token expired at {_when(entry['expires_at'])}")
        entry.update(redeemed_by=ctx.user, redeemed_at=now)
        grant.update(mode=entry["mode"], since=now, expires_at=entry["expires_at"], via="token")
        current.setdefault("shares", {})[ctx.user] = dict(grant)

    try:
        ctx.store.modify_session(found["id"], change, expect=(st.STARTING, st.ACTIVE))
    except st.StateChanged:
        raise Forbidden("this share token is unknown, or the session it shares has ended") from None
    return {"session": found["name"], "owner": found["owner"], "user": ctx.user, **grant}


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts))


def shared_with(ctx, *, include_ended: bool = False) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(session, share) of every session other users share with the caller now (live ones, or all)."""
    from . import store as st

    now, found = time.time(), []
    with ctx.store.transaction(shared=True) as tx:
        # Searched, not listed: only the records that match are copied out of the service's cache.
        named = st.Query().shares.test(lambda shares: isinstance(shares, dict) and ctx.user in shares)
        for record in tx.sessions.search(named):
            share = active_share(record, ctx.user, now) if record["owner"] != ctx.user else None
            if share is None:
                continue
            if include_ended or record["state"] in st.LIVE_STATES or record.get("resources_left"):
                found.append((dict(record), share))
    return sorted(found, key=lambda pair: pair[0]["created_at"])


def shares_view(record: dict[str, Any]) -> dict[str, Any]:
    """What the owner's `status` shows of a session's shares: who has which mode, tokens not yet used."""
    now = time.time()
    shares = [
        {
            "user": user,
            "mode": s["mode"],
            "since": s["since"],
            "expires_at": s.get("expires_at"),
            "via": s["via"],
        }
        for user, s in sorted((record.get("shares") or {}).items())
        if active_share(record, user, now)
    ]
    tokens = [
        {"mode": t["mode"], "expires_at": t["expires_at"]}
        for t in record.get("share_tokens", [])
        if not t.get("redeemed_by") and now < t["expires_at"]
    ]
    return {"shares": shares, "share_tokens": tokens}
