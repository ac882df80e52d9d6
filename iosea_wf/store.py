"""The session store: TinyDB behind one interface, safe for several processes at once.

Everything iosea-wf remembers lives here: sessions (keyed by owner and name) with their services
and steps, and the datanode allocations of ephemeral services. Every read-modify-write happens
inside :meth:`Store.transaction`, which holds an exclusive ``flock`` for its whole duration, and
every write replaces the database file atomically (temp file + rename), so concurrent commands
never lose a record and a crash never leaves a half-written file.

A later site-wide service will own one store for all users: it will provide the same methods.
"""

from __future__ import annotations

import fcntl
import json
import marshal
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from tinydb import Query, TinyDB
from tinydb.storages import Storage
from tinydb.table import Document

from .errors import SessionConflict, StoreError

SCHEMA_VERSION = 1

# Session states. Each change is recorded before the action it announces.
STARTING = "STARTING"
ACTIVE = "ACTIVE"
STOPPING = "STOPPING"
STOPPED = "STOPPED"
FAILED = "FAILED"
LIVE_STATES = (STARTING, ACTIVE, STOPPING)


class StateChanged(SessionConflict):
    """Raised when a state change finds the session in another state than it expects (exit 5)."""

    def __init__(self, record: dict[str, Any]):
        super().__init__(f"session {record['name']!r} became {record['state']} meanwhile (another command)")
        self.record = dict(record)


class AtomicJSONStorage(Storage):
    """TinyDB storage that rewrites the file through a temp file and rename (never half-written)."""

    def __init__(self, path: str, before_replace=None):
        self.path = Path(path)
        self._before_replace = before_replace

    def read(self) -> dict[str, Any] | None:
        """Return the whole database, or None for a new one."""
        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        except OSError as exc:  # a directory, unreadable, I/O error: no traceback, exit 9
            raise StoreError(f"cannot read the session store {self.path}: {exc.strerror}") from None
        if not data.strip():
            return None
        try:
            return json.loads(data)
        except ValueError as exc:
            raise StoreError(f"the session store {self.path} is corrupt: {exc}") from None

    def write(self, data: dict[str, Any]) -> None:
        """Replace the database file atomically."""
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".store-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, separators=(",", ":"))
                fh.flush()
                os.fsync(fh.fileno())
            if self._before_replace:
                self._before_replace()
            os.replace(tmp, self.path)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


class _CachedStorage(Storage):
    """Read-only TinyDB storage over tables already parsed (a shared transaction of a cached Store)."""

    def __init__(self, tables: dict[str, Any] | None):
        # A new top level: TinyDB never sees (nor could replace) the cache's own dict.
        self._tables = dict(tables) if tables is not None else None

    def read(self) -> dict[str, Any] | None:
        """The cached tables, as parsed from the file."""
        return self._tables

    def write(self, data: dict[str, Any]) -> None:
        """Refused: a shared transaction only reads (a bug of the caller, never of a user)."""
        raise StoreError("the session store was written inside a shared (read-only) transaction")


class _Detached(Document):
    """A record handed out of the cache: a deep copy, so a caller's change never reaches the cache."""

    def __init__(self, value, doc_id: int):
        # A marshal round trip: a deep copy of JSON data, about 5x faster than copy.deepcopy here.
        super().__init__(marshal.loads(marshal.dumps(value)), doc_id)


def default_state_dir() -> Path:
    """``$IOSEA_WF_HOME``, else ``$XDG_STATE_HOME/iosea-wf``, else ``~/.local/state/iosea-wf``."""
    if os.environ.get("IOSEA_WF_HOME"):
        return Path(os.environ["IOSEA_WF_HOME"]).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(xdg) / "iosea-wf"


class Transaction:
    """What can be read and written while the store's lock is held."""

    def __init__(self, db: TinyDB, *, detached: bool = False):
        self._db = db
        self.sessions = db.table("sessions")
        self.allocations = db.table("allocations")
        if detached:
            for table in (self.sessions, self.allocations):
                table.document_class = _Detached

    def session(self, owner: str, name: str, *, live_only: bool = False) -> dict[str, Any] | None:
        """The newest session of that owner and name (optionally only a live one)."""
        q = Query()
        found = self.sessions.search((q.owner == owner) & (q.name == name))
        if live_only:
            found = [s for s in found if s["state"] in LIVE_STATES or s.get("resources_left")]
        return max(found, key=lambda s: s["created_at"], default=None)

    def put_session(self, record: dict[str, Any]) -> None:
        """Insert or replace a session record (matched by its id)."""
        record["schema_version"] = SCHEMA_VERSION
        q = Query()
        self.sessions.upsert(record, q.id == record["id"])

    def live_sessions(self) -> list[dict[str, Any]]:
        """Every session of every owner that may still hold resources."""
        return [s for s in self.sessions.all() if s["state"] in LIVE_STATES or s.get("resources_left")]

    def used_on(self, datanode: str) -> dict[str, int]:
        """Cores, memory and storage already allocated on a datanode."""
        used = {"cores": 0, "memory_mb": 0, "storage_gb": 0}
        for a in self.allocations.search(Query().datanode == datanode):
            for k in used:
                used[k] += a[k]
        return used

    def allocate(self, allocation: dict[str, Any]) -> None:
        """Record resources reserved for one service."""
        allocation["schema_version"] = SCHEMA_VERSION
        self.allocations.insert(allocation)

    def release(self, session_id: str, service: str | None = None) -> int:
        """Free the allocations of a session (or of one of its services); return how many."""
        q = Query()
        cond = q.session_id == session_id
        if service is not None:
            cond = cond & (q.service == service)
        return len(self.allocations.remove(cond))


class Store:
    """The TinyDB store under a state directory.

    With ``cache`` (a long-lived process: the site's Workflow Manager service), shared
    transactions read the tables parsed by an earlier one while the file is unchanged, instead of
    parsing every session of every user again (about 0.13 s for 1,000 sessions). Unchanged means
    the same file (inode, mtime, ctime, size: every write renames a new file into place) and the
    same write generation, a token each writer of this module puts in the lock file, under the
    exclusive lock, before it renames (a new file may reuse a freed inode within one clock tick).
    Records come out of the cache as deep copies.
    """

    def __init__(self, state_dir: str | os.PathLike | None = None, *, cache: bool = False):
        self._cache_enabled = cache
        self._cache: tuple[tuple, dict[str, Any] | None] | None = None
        self.state_dir = Path(state_dir).expanduser() if state_dir else default_state_dir()
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StoreError(f"cannot use the state directory {self.state_dir}: {exc.strerror}") from None
        self.db_path = self.state_dir / "iosea-wf.json"
        self.lock_path = self.state_dir / "iosea-wf.lock"

    @contextmanager
    def transaction(self, *, shared: bool = False) -> Iterator[Transaction]:
        """Hold the store lock (exclusive, or shared for reads) and yield the tables."""
        with open(self.lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            try:
                if shared and self._cache_enabled:
                    db = TinyDB(storage=_CachedStorage, tables=self._cached_tables(lock.fileno()))
                    detached = True
                else:
                    db = TinyDB(
                        str(self.db_path),
                        storage=AtomicJSONStorage,
                        before_replace=lambda: _new_generation(lock.fileno()),
                    )
                    detached = False
                try:
                    yield Transaction(db, detached=detached)
                finally:
                    db.close()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _cached_tables(self, lock_fd: int) -> dict[str, Any] | None:
        """The parsed file, from the cache while it is unchanged (called under the lock)."""
        try:
            info = os.stat(self.db_path)
            key: tuple = (info.st_ino, info.st_mtime_ns, info.st_ctime_ns, info.st_size)
        except FileNotFoundError:
            key = ("missing",)
        key += (os.pread(lock_fd, 64, 0),)
        cached = self._cache
        if cached is not None and cached[0] == key:
            return cached[1]
        tables = AtomicJSONStorage(str(self.db_path)).read()
        self._cache = (key, tables)
        return tables

    def sessions_of(self, owner: str) -> list[dict[str, Any]]:
        """Every session record of one owner, oldest first."""
        with self.transaction(shared=True) as tx:
            found = tx.sessions.search(Query().owner == owner)
        return sorted(found, key=lambda s: s["created_at"])

    def update_session(
        self, session_id: str, *, expect: tuple[str, ...] | None = None, **changes: Any
    ) -> dict[str, Any]:
        """Apply changes to one session record under the lock and return the new record.

        ``expect``: the states the change is meant for; in any other (another command changed it
        meanwhile) nothing is written and :class:`StateChanged` says what it became.
        """
        with self.transaction() as tx:
            found = tx.sessions.get(Query().id == session_id)
            if found is None:
                raise StoreError(f"session {session_id} vanished from the store")
            _check_state(found, expect)
            record = dict(found)
            record.update(changes)
            record["updated_at"] = time.time()
            tx.put_session(record)
        return record

    def modify_session(
        self,
        session_id: str,
        change: Callable[[dict[str, Any]], Any],
        *,
        expect: tuple[str, ...] | None = None,
    ) -> dict[str, Any]:
        """Apply ``change(record)`` to a copy of one session under the lock; store and return it.

        For changes that depend on what the record holds now (a share list, a token redeemed
        once): ``change`` sees the current record and may raise to write nothing. ``expect`` as
        for :meth:`update_session`.
        """
        with self.transaction() as tx:
            found = tx.sessions.get(Query().id == session_id)
            if found is None:
                raise StoreError(f"session {session_id} vanished from the store")
            _check_state(found, expect)
            record = json.loads(json.dumps(found))
            change(record)
            record["updated_at"] = time.time()
            tx.put_session(record)
        return record

    def update_service(
        self, session_id: str, service: str, *, expect: tuple[str, ...] | None = None, **changes: Any
    ) -> dict[str, Any]:
        """Apply changes to one service of a session under the lock and return the session."""

        def change(record: dict[str, Any]) -> None:
            for svc in record["services"]:
                if svc["name"] == service:
                    svc.update(changes)

        return self.modify_session(session_id, change, expect=expect)


def _check_state(record: dict[str, Any], expect: tuple[str, ...] | None) -> None:
    if expect is not None and record["state"] not in expect:
        raise StateChanged(record)


def _new_generation(lock_fd: int) -> None:
    """Put a new write generation in the lock file (its writer holds the exclusive lock)."""
    os.ftruncate(lock_fd, 0)
    os.write(lock_fd, uuid.uuid4().hex.encode())


def new_session_id() -> str:
    """A new unique session id."""
    return uuid.uuid4().hex
