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
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from tinydb import Query, TinyDB
from tinydb.storages import Storage

from .errors import StoreError

SCHEMA_VERSION = 1

# Session states. Each change is recorded before the action it announces.
STARTING = "STARTING"
ACTIVE = "ACTIVE"
STOPPING = "STOPPING"
STOPPED = "STOPPED"
FAILED = "FAILED"
LIVE_STATES = (STARTING, ACTIVE, STOPPING)


class AtomicJSONStorage(Storage):
    """TinyDB storage that rewrites the file through a temp file and rename (never half-written)."""

    def __init__(self, path: str):
        self.path = Path(path)

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
            os.replace(tmp, self.path)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def default_state_dir() -> Path:
    """``$IOSEA_WF_HOME``, else ``$XDG_STATE_HOME/iosea-wf``, else ``~/.local/state/iosea-wf``."""
    if os.environ.get("IOSEA_WF_HOME"):
        return Path(os.environ["IOSEA_WF_HOME"]).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(xdg) / "iosea-wf"


class Transaction:
    """What can be read and written while the store's lock is held."""

    def __init__(self, db: TinyDB):
        self._db = db
        self.sessions = db.table("sessions")
        self.allocations = db.table("allocations")

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
    """The TinyDB store under a state directory."""

    def __init__(self, state_dir: str | os.PathLike | None = None):
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
            db = TinyDB(str(self.db_path), storage=AtomicJSONStorage)
            try:
                yield Transaction(db)
            finally:
                db.close()
                fcntl.flock(lock, fcntl.LOCK_UN)

    def sessions_of(self, owner: str) -> list[dict[str, Any]]:
        """Every session record of one owner, oldest first."""
        with self.transaction(shared=True) as tx:
            found = tx.sessions.search(Query().owner == owner)
        return sorted(found, key=lambda s: s["created_at"])

    def update_session(self, session_id: str, **changes: Any) -> dict[str, Any]:
        """Apply changes to one session record under the lock and return the new record."""
        with self.transaction() as tx:
            found = tx.sessions.get(Query().id == session_id)
            if found is None:
                raise StoreError(f"session {session_id} vanished from the store")
            record = dict(found)
            record.update(changes)
            record["updated_at"] = time.time()
            tx.put_session(record)
        return record

    def update_service(self, session_id: str, service: str, **changes: Any) -> dict[str, Any]:
        """Apply changes to one service of a session under the lock and return the session."""
        with self.transaction() as tx:
            found = tx.sessions.get(Query().id == session_id)
            if found is None:
                raise StoreError(f"session {session_id} vanished from the store")
            record = json.loads(json.dumps(found))
            for svc in record["services"]:
                if svc["name"] == service:
                    svc.update(changes)
            record["updated_at"] = time.time()
            tx.put_session(record)
        return record


def new_session_id() -> str:
    """A new unique session id."""
    return uuid.uuid4().hex
