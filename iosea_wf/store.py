"""The session store: TinyDB behind one interface, safe for several processes at once.

Everything iosea-wf remembers lives here: sessions (keyed by owner and name) with their services
and steps, and the datanode allocations of ephemeral services. Every read-modify-write happens
inside :meth:`Store.transaction`, which holds an exclusive ``flock`` for its whole duration, and
every write replaces the database file atomically (temp file + rename), so concurrent commands
never lose a record and a crash never leaves a half-written file.

TinyDB rewrites its whole file on every write, so the live file stays small: sessions that may
hold resources and recently ended ones. An ended session (STOPPED, or FAILED with nothing left)
untouched for the site's ``iosea_store_keep_days`` moves to the archive, one JSON file per owner
per month of its creation (``archive/OWNER/YYYY-MM.json``). A move writes an intent file, then
the archive files durably, then the live file without the moved records, then removes the
intent: interrupted at any moment, the next writer finishes it (nothing is ever only in a file
not yet durable). Reads by owner and name, by id, and ``sessions_of`` (``list --all``) see the
archive; name uniqueness, namespaces and datanode accounting look at the live file only. A write
of an archived session brings it back to the live file.

Schema 2 (this one) is the live file of schema 1 plus a ``meta`` table and the archive; a file of
schema 1 is migrated by the first writer that opens it.
"""

from __future__ import annotations

import fcntl
import hashlib
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
from urllib.parse import quote

from tinydb import Query, TinyDB
from tinydb.storages import Storage
from tinydb.table import Document, Table

from .errors import SessionConflict, StoreError

SCHEMA_VERSION = 2

# Session states. Each change is recorded before the action it announces.
STARTING = "STARTING"
ACTIVE = "ACTIVE"
STOPPING = "STOPPING"
STOPPED = "STOPPED"
FAILED = "FAILED"
LIVE_STATES = (STARTING, ACTIVE, STOPPING)

# The site's iosea_store_keep_days when it says nothing (site.py documents it).
DEFAULT_KEEP_DAYS = 7
# A long-lived store looks for sessions to archive at most this often (seconds).
ARCHIVE_EVERY_S = 60.0

ARCHIVE_DIR = "archive"
# How many parsed archive files a store keeps (a user's `list --all` reads all of theirs).
ARCHIVE_FILES_CACHED = 256
INTENT_FILE = "moving.json"

# Tests only: called with the name of each step of an archive move ("intent", "archive", "live"),
# after that step, to simulate a crash there.
_crash_hook: Callable[[str], None] | None = None


def _step_done(name: str) -> None:
    if _crash_hook is not None:
        _crash_hook(name)


class StateChanged(SessionConflict):
    """Raised when a state change finds the session in another state than it expects (exit 5)."""

    def __init__(self, record: dict[str, Any]):
        super().__init__(f"session {record['name']!r} became {record['state']} meanwhile (another command)")
        self.record = dict(record)


def _read_json(path: Path, what: str = "session store") -> Any:
    """The parsed file, None when it is missing or empty; StoreError when unreadable or corrupt."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None
    except OSError as exc:  # a directory, unreadable, I/O error: no traceback, exit 9
        raise StoreError(f"cannot read the {what} {path}: {exc.strerror}") from None
    if not data.strip():
        return None
    try:
        return json.loads(data)
    except ValueError as exc:
        raise StoreError(f"the {what} {path} is corrupt: {exc}") from None


def _write_atomic(path: Path, data: Any, *, before_replace=None, sync_dir: bool = False) -> None:
    """Replace ``path`` with ``data`` as JSON: temp file, fsync, rename (never half-written).

    One ``json.dumps`` and one write: about 10x faster than ``json.dump`` to a file object.
    ``sync_dir``: also fsync the directory, so that the rename itself is durable.
    """
    text = data if isinstance(data, bytes) else json.dumps(data, separators=(",", ":")).encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".store-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if before_replace:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync_dir:
        _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _as_stored(value: Any) -> Any:
    """``value`` as the file will hold it (a deep copy; tuples become lists, keys strings)."""
    return json.loads(json.dumps(value))


def _copy(value: Any) -> Any:
    # A marshal round trip: a deep copy of JSON data, about 5x faster than copy.deepcopy here.
    return marshal.loads(marshal.dumps(value))


class AtomicJSONStorage(Storage):
    """TinyDB storage of one JSON file, rewritten through a temp file and rename."""

    def __init__(self, path: str, before_replace=None):
        self.path = Path(path)
        self._before_replace = before_replace

    def read(self) -> dict[str, Any] | None:
        """Return the whole database, or None for a new one."""
        return _read_json(self.path)

    def write(self, data: dict[str, Any]) -> None:
        """Replace the database file atomically."""
        _write_atomic(self.path, data, before_replace=self._before_replace)


class _TransactionStorage(Storage):
    """TinyDB storage over tables parsed once for a whole transaction; written once, at its end."""

    def __init__(self, tables: dict[str, Any], read_only: bool):
        self.tables = tables
        self.read_only = read_only
        self.dirty = False
        self.in_place = False

    def read(self) -> dict[str, Any]:
        """The tables of this transaction (TinyDB changes them in place, then calls write)."""
        return self.tables

    def write(self, data: dict[str, Any]) -> None:
        """Keep the change for the end of the transaction; refused in a shared (read-only) one."""
        if self.read_only:
            raise StoreError("the session store was written inside a shared (read-only) transaction")
        self.tables = data
        self.dirty = True


class _Detached(Document):
    """A record handed out of a transaction: a deep copy, so a caller's change never reaches the tables."""

    def __init__(self, value, doc_id: int):
        super().__init__(_copy(value), doc_id)


# Every session keeps the site it was started on (``site_snapshot``, ~6 KB, 80% of a record), and
# most are the same: a file holds each snapshot once, in its ``snapshots`` table, and a record
# {"$ref": KEY} in its place. Records come out of the store whole.
SNAPSHOT_FIELD = "site_snapshot"


def _snapshot_key(snapshot: Any) -> str:
    return hashlib.sha256(json.dumps(snapshot, sort_keys=True).encode()).hexdigest()[:24]


def _shrink(record: dict[str, Any], snapshots: dict[str, Any]) -> dict[str, Any]:
    """``record`` as stored (JSON types), its site snapshot put into ``snapshots`` once."""
    snapshot = record.get(SNAPSHOT_FIELD)
    if not isinstance(snapshot, dict) or "$ref" in snapshot:
        return _as_stored(record)
    key = _snapshot_key(snapshot)
    if key not in snapshots:
        snapshots[key] = _as_stored(snapshot)
    return _as_stored({**record, SNAPSHOT_FIELD: {"$ref": key}})


def _whole(record: dict[str, Any], snapshots: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of a stored record, with its site snapshot back in place."""
    record = _copy(record)
    _expand(record, snapshots)
    return record


def _expand(record: dict[str, Any], snapshots: dict[str, Any]) -> None:
    ref = record.get(SNAPSHOT_FIELD)
    if isinstance(ref, dict) and "$ref" in ref:
        found = snapshots.get(ref["$ref"])
        record[SNAPSHOT_FIELD] = _copy(found) if found is not None else None


def _referenced(sessions: dict[str, Any]) -> set[str]:
    refs = set()
    for r in sessions.values():
        ref = r.get(SNAPSHOT_FIELD)
        if isinstance(ref, dict) and "$ref" in ref:
            refs.add(ref["$ref"])
    return refs


class _SessionsTable(Table):
    """The live sessions table; a get by id that misses asks the archive (``Query().id == X``)."""

    document_class = _Detached
    archive_lookup: Callable[[str], dict[str, Any] | None] | None = None

    # TinyDB's own updates change a document in place, where the store's cache of each record's
    # JSON text cannot see it: after one, the whole file is encoded again.
    def update(self, *args, **kwargs):  # noqa: D102 (TinyDB's)
        self._storage.in_place = True
        return super().update(*args, **kwargs)

    def update_multiple(self, *args, **kwargs):  # noqa: D102 (TinyDB's)
        self._storage.in_place = True
        return super().update_multiple(*args, **kwargs)

    def upsert(self, *args, **kwargs):  # noqa: D102 (TinyDB's)
        self._storage.in_place = True
        return super().upsert(*args, **kwargs)

    def get(self, cond=None, doc_id=None, doc_ids=None):  # noqa: D102 (TinyDB's)
        found = super().get(cond, doc_id, doc_ids)
        if found is None and self.archive_lookup is not None and cond is not None:
            key = getattr(cond, "_hash", None)
            if isinstance(key, tuple) and len(key) == 3 and key[:2] == ("==", ("id",)):
                return self.archive_lookup(key[2])
        return found


class _DB(TinyDB):
    table_class = _SessionsTable


def default_state_dir() -> Path:
    """``$IOSEA_WF_HOME``, else ``$XDG_STATE_HOME/iosea-wf``, else ``~/.local/state/iosea-wf``."""
    if os.environ.get("IOSEA_WF_HOME"):
        return Path(os.environ["IOSEA_WF_HOME"]).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(xdg) / "iosea-wf"


def _holds_resources(record: dict[str, Any]) -> bool:
    return record["state"] in LIVE_STATES or bool(record.get("resources_left"))


class Transaction:
    """What can be read and written while the store's lock is held."""

    def __init__(self, store: Store, db: TinyDB, storage: _TransactionStorage):
        self._store = store
        self._storage = storage
        self._tables = tables = storage.tables
        self._doc_ids: dict[str, str] | None = None
        self.sessions = db.table("sessions")
        self.allocations = db.table("allocations")
        self.allocations.document_class = _Detached

        class _Whole(_Detached):
            def __init__(self, value, doc_id: int):
                super().__init__(value, doc_id)
                _expand(self, tables.get("snapshots") or {})

        self.sessions.document_class = _Whole
        self.sessions.archive_lookup = self._archived_by_id
        # Archived sessions this transaction handed out: {id: archive file} (a write restores them).
        self.from_archive: dict[str, Path] = {}
        self.restored: dict[str, Path] = {}
        self.moved = 0

    def _archived_by_id(self, session_id: str) -> dict[str, Any] | None:
        found = self._store._archived_by_id(session_id)
        if found is None:
            return None
        path, record = found
        self.from_archive[session_id] = path
        return Document(record, 0)

    def session(self, owner: str, name: str, *, live_only: bool = False) -> dict[str, Any] | None:
        """The newest session of that owner and name (optionally only a live one).

        Not in the live file (and not ``live_only``): the newest archived one. A live record of a
        name is always newer than its archived ones (moves keep the oldest of a name first).
        """
        q = Query()
        found = self.sessions.search((q.owner == owner) & (q.name == name))
        if live_only:
            found = [s for s in found if _holds_resources(s)]
        if found or live_only:
            return max(found, key=lambda s: s["created_at"], default=None)
        archived = self._store._archived_by_name(owner, name)
        if archived is None:
            return None
        path, record = archived
        self.from_archive[record["id"]] = path
        return Document(record, 0)

    def session_by_id(self, session_id: str) -> dict[str, Any] | None:
        """The session of that id, live or archived."""
        return self.sessions.get(Query().id == session_id)

    def put_session(self, record: dict[str, Any]) -> None:
        """Insert or replace a session record (matched by its id); an archived one comes back live."""
        if self._storage.read_only:
            raise StoreError("the session store was written inside a shared (read-only) transaction")
        record["schema_version"] = SCHEMA_VERSION
        stored = _shrink(record, self._tables.setdefault("snapshots", {}))
        # Put in place of the old document (a new object), not updated in it: the store keeps
        # the JSON text of every unchanged record and encodes only the new one (_encode).
        table = self._tables.setdefault("sessions", {})
        doc_id = (self._doc_ids or {}).get(record["id"])
        if doc_id is None or table.get(doc_id, {}).get("id") != record["id"]:
            # Not known, or TinyDB's own operations moved things since: looked up again.
            self._doc_ids = {doc["id"]: doc_id for doc_id, doc in table.items()}
            doc_id = self._doc_ids.get(record["id"])
        if doc_id is None:
            doc_id = str(max(map(int, table), default=0) + 1)
            self._doc_ids[record["id"]] = doc_id
        table[doc_id] = stored
        self.sessions.clear_cache()
        self.sessions._next_id = None  # TinyDB's next id for an insert: counted again
        self._storage.dirty = True
        if record["id"] in self.from_archive:
            self.restored[record["id"]] = self.from_archive[record["id"]]

    def add_sessions(self, records: list[dict[str, Any]]) -> None:
        """Insert new session records (ids the store does not hold) at once: bulk loads, benchmarks."""
        snapshots = self._tables.setdefault("snapshots", {})
        for record in records:
            record["schema_version"] = SCHEMA_VERSION
        self.sessions.insert_multiple([_shrink(r, snapshots) for r in records])

    def live_sessions(self) -> list[dict[str, Any]]:
        """Every session of every owner that may still hold resources (the live file only)."""
        return [s for s in self.sessions.all() if _holds_resources(s)]

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
        self.allocations.insert(_as_stored(allocation))

    def release(self, session_id: str, service: str | None = None) -> int:
        """Free the allocations of a session (or of one of its services); return how many."""
        q = Query()
        cond = q.session_id == session_id
        if service is not None:
            cond = cond & (q.service == service)
        return len(self.allocations.remove(cond))


KeepDays = float | Callable[[], float | None] | None


class Store:
    """The TinyDB store under a state directory.

    The parsed live file is kept between transactions while the file is unchanged, so a
    long-lived process (the site's Workflow Manager service) never parses it again for a read,
    nor for a write (it writes what it holds). Unchanged means the same file (inode, mtime, ctime,
    size: every write renames a new file into place) and the same write generation, a token each
    writer of this module puts in the lock file, under the exclusive lock, before it renames (a
    new file may reuse a freed inode within one clock tick). Records come out as deep copies.

    ``keep_days``: the site's ``iosea_store_keep_days``, or a function giving it (None: this
    process does not archive, e.g. an in-process command that never read the site).
    """

    def __init__(
        self, state_dir: str | os.PathLike | None = None, *, cache: bool = True, keep_days: KeepDays = None
    ):
        # ``cache`` is kept for callers of the earlier interface: every store caches now.
        del cache
        self._cache: tuple[tuple, dict[str, Any]] | None = None
        # The JSON text of each live session record as last written: {doc id: (record, text)}.
        self._encoded: dict[str, tuple[dict[str, Any], str]] = {}
        self._archive_cache: dict[Path, tuple[tuple, dict[str, Any]]] = {}
        # Where archived sessions were last seen: {id: archive file}.
        self._archived_at: dict[str, Path] = {}
        self._keep_days = keep_days
        self._next_archive = 0.0
        self.state_dir = Path(state_dir).expanduser() if state_dir else default_state_dir()
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StoreError(f"cannot use the state directory {self.state_dir}: {exc.strerror}") from None
        self.db_path = self.state_dir / "iosea-wf.json"
        self.lock_path = self.state_dir / "iosea-wf.lock"
        self.archive_dir = self.state_dir / ARCHIVE_DIR
        self.intent_path = self.archive_dir / INTENT_FILE

    # --- transactions ---------------------------------------------------------------------

    @contextmanager
    def transaction(self, *, shared: bool = False) -> Iterator[Transaction]:
        """Hold the store lock (exclusive, or shared for reads) and yield the tables."""
        with self._transaction(shared=shared) as tx:
            yield tx

    @contextmanager
    def _transaction(self, *, shared: bool, archive_at: float | None = None) -> Iterator[Transaction]:
        """``archive_at``: archive what is due at that time now, even with nothing else to write."""
        # Not O_APPEND: the write generation is written in place at offset 0 (Linux's pwrite
        # appends on an O_APPEND descriptor, whatever the offset).
        lock = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            try:
                tables = self._tables(lock)
                if shared:
                    with self._db(_TransactionStorage(tables, read_only=True)) as tx:
                        yield tx
                    return
                changed = self._migrate(tables)
                if os.path.exists(self.intent_path):
                    changed |= self._finish_move(tables)
                storage = _TransactionStorage(tables, read_only=False)
                try:
                    with self._db(storage) as tx:
                        yield tx
                        if storage.dirty or changed or archive_at is not None:
                            self._commit(storage.tables, tx, lock, archive_at)
                except BaseException:
                    # The tables were changed in place: the file, not the cache, is the truth now.
                    self._cache = None
                    raise
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        finally:
            os.close(lock)

    @contextmanager
    def _db(self, storage: _TransactionStorage) -> Iterator[Transaction]:
        db = _DB(storage=lambda: storage)
        try:
            yield Transaction(self, db, storage)
        finally:
            db.close()

    def _file_key(self, lock_fd: int) -> tuple:
        try:
            info = os.stat(self.db_path)
            key: tuple = (info.st_ino, info.st_mtime_ns, info.st_ctime_ns, info.st_size)
        except FileNotFoundError:
            key = ("missing",)
        return key + (os.pread(lock_fd, 64, 0),)

    def _tables(self, lock_fd: int) -> dict[str, Any]:
        """The parsed live file, from the cache while it is unchanged (called under the lock)."""
        key = self._file_key(lock_fd)
        cached = self._cache
        if cached is not None and cached[0] == key:
            return cached[1]
        tables = _read_json(self.db_path)
        if tables is None:
            tables = {}
        elif not isinstance(tables, dict):
            raise StoreError(f"the session store {self.db_path} is corrupt: not a JSON object")
        version = _file_version(tables)
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the session store {self.db_path} has schema version {version}, newer than this "
                f"iosea-wf reads ({SCHEMA_VERSION}): use the iosea-wf that wrote it"
            )
        self._cache = (key, tables)
        return tables

    def _commit(
        self, tables: dict[str, Any], tx: Transaction, lock_fd: int, archive_at: float | None
    ) -> None:
        """Write the live file once (after archiving what is due), then tidy the archive."""
        moved = self._archive_due(tables, archive_at)
        tx.moved = len(moved)
        snapshots = tables.get("snapshots", {})
        used = _referenced(tables.get("sessions", {}))
        if set(snapshots) - used:
            tables["snapshots"] = {k: v for k, v in snapshots.items() if k in used}
        text = self._encode(tables, full=tx._storage.in_place)
        _write_atomic(self.db_path, text, before_replace=lambda: _new_generation(lock_fd))
        self._cache = (self._file_key(lock_fd), tables)
        _step_done("live")
        if moved:
            with suppress(FileNotFoundError):
                os.unlink(self.intent_path)
        # A restored session's archived copy is stale now (were this cut short, the live copy wins).
        for session_id, path in tx.restored.items():
            self._drop_archived(path, session_id)

    def _encode(self, tables: dict[str, Any], *, full: bool) -> bytes:
        """The live file's JSON text: each session record's own text kept while it is the same object.

        A record is replaced, never changed in place, by the store's writes (``full``: one was
        changed in place), so an unchanged record is the same object as when it was encoded:
        a write encodes its one record, not the whole file (~7 ms for 220 records here).
        """
        sessions = tables.get("sessions", {})
        known = {} if full else self._encoded
        encoded, parts = {}, []
        for doc_id, doc in sessions.items():
            hit = known.get(doc_id)
            text = hit[1] if hit is not None and hit[0] is doc else json.dumps(doc, separators=(",", ":"))
            encoded[doc_id] = (doc, text)
            parts.append(f"{json.dumps(doc_id)}:{text}")
        self._encoded = encoded
        rest = json.dumps({k: v for k, v in tables.items() if k != "sessions"}, separators=(",", ":"))
        body = '"sessions":{' + ",".join(parts) + "}"
        return (rest[:-1] + ("," if rest != "{}" else "") + body + "}").encode()

    @staticmethod
    def _migrate(tables: dict[str, Any]) -> bool:
        """Bring a live file of an earlier schema to this one (in place); True when it changed."""
        if not tables:  # a new store: nothing to write until something is
            tables["meta"] = {"1": {"schema_version": SCHEMA_VERSION}}
            return False
        if _file_version(tables) == SCHEMA_VERSION:
            return False
        # Schema 1 -> 2: the same records, each site snapshot once in the snapshots table, and a
        # meta table (the archive is new).
        snapshots = tables.setdefault("snapshots", {})
        sessions = tables.get("sessions", {})
        for doc_id, record in list(sessions.items()):
            sessions[doc_id] = _shrink(record, snapshots)
        for name in ("sessions", "allocations"):
            for record in tables.get(name, {}).values():
                record["schema_version"] = SCHEMA_VERSION
        tables["meta"] = {"1": {"schema_version": SCHEMA_VERSION}}
        return True

    # --- the archive ----------------------------------------------------------------------

    def keep_days(self) -> float | None:
        """How many days an ended session stays in the live file (None: this process does not archive)."""
        keep = self._keep_days() if callable(self._keep_days) else self._keep_days
        return None if keep is None else float(keep)

    def archive_ended(self, *, now: float | None = None) -> int:
        """Move every ended session older than ``keep_days`` (at ``now``) to the archive; return how many."""
        with self._transaction(shared=False, archive_at=time.time() if now is None else now) as tx:
            pass
        return tx.moved

    def _archive_due(self, tables: dict[str, Any], at: float | None) -> dict[str, list[str]]:
        """Archive what is due into the archive files (before the live file is written).

        Takes the moved records out of ``tables``; returns {id: [owner, month]} of them. Looked
        for at most every ARCHIVE_EVERY_S, unless asked for ``at`` a time.
        """
        if at is None and time.monotonic() < self._next_archive:
            return {}
        now = time.time() if at is None else at
        keep = self.keep_days()
        if keep is None:
            return {}
        self._next_archive = time.monotonic() + ARCHIVE_EVERY_S
        sessions = tables.get("sessions", {})
        due = _archivable(sessions, now - keep * 86400)
        if not due:
            return {}
        moving = {sessions[d]["id"]: [sessions[d]["owner"], _month(sessions[d])] for d in due}
        try:
            self.archive_dir.mkdir(mode=0o700, exist_ok=True)
            _write_atomic(
                self.intent_path, {"schema_version": SCHEMA_VERSION, "moving": moving}, sync_dir=True
            )
            _step_done("intent")
            self._put_archived([sessions[d] for d in due], tables.get("snapshots", {}))
        except OSError:
            # No room for the archive (say): the sessions stay live; the intent, if written, is
            # finished by a later writer.
            return {}
        tables["sessions"] = {k: v for k, v in sessions.items() if k not in due}
        return moving

    def _finish_move(self, tables: dict[str, Any]) -> bool:
        """Finish a move that was cut short (its intent file is there): True when ``tables`` changed."""
        intent = _read_json(self.intent_path, "archive intent") or {}
        moving = intent.get("moving") or {}
        sessions = tables.get("sessions", {})
        left = {k: v for k, v in sessions.items() if v.get("id") in moving}
        if left:
            # Written again from the live copies (the same records): the archive files may or
            # may not have been written before the cut.
            try:
                self._put_archived(list(left.values()), tables.get("snapshots", {}))
            except OSError:
                return False
            tables["sessions"] = {k: v for k, v in sessions.items() if k not in left}
            _step_done("finish")
        with suppress(FileNotFoundError):
            os.unlink(self.intent_path)
        return bool(left)

    def _owner_dir(self, owner: str) -> Path:
        return self.archive_dir / quote(owner, safe="").replace(".", "%2E")

    def _archive_path(self, owner: str, month: str) -> Path:
        return self._owner_dir(owner) / f"{month}.json"

    def _put_archived(self, records: list[dict[str, Any]], snapshots: dict[str, Any]) -> None:
        """Add live records to their archive files, durably (by id: doing it twice is harmless).

        An archive file holds the site snapshots its records refer to (``snapshots``: the live ones).
        """
        by_file: dict[Path, list[dict[str, Any]]] = {}
        for r in records:
            by_file.setdefault(self._archive_path(r["owner"], _month(r)), []).append(r)
        for path, group in sorted(by_file.items()):
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            data = self._archive_file(path)
            data = {
                "schema_version": SCHEMA_VERSION,
                "sessions": dict(data.get("sessions", {})),
                "snapshots": dict(data.get("snapshots", {})),
            }
            for r in group:
                data["sessions"][r["id"]] = r
                self._archived_at[r["id"]] = path
            for key in _referenced({r["id"]: r for r in group}):
                if key not in data["snapshots"] and key in snapshots:
                    data["snapshots"][key] = snapshots[key]
            _write_atomic(path, data, sync_dir=True)
            self._archive_cache[path] = (_stat_key(path), data)
            _step_done("archive")

    def _drop_archived(self, path: Path, session_id: str) -> None:
        data = self._archive_file(path)
        if session_id not in data.get("sessions", {}):
            return
        data = {**data, "sessions": {k: v for k, v in data["sessions"].items() if k != session_id}}
        with suppress(OSError):
            _write_atomic(path, data, sync_dir=True)
            self._archive_cache[path] = (_stat_key(path), data)
        self._archived_at.pop(session_id, None)

    def _archive_file(self, path: Path) -> dict[str, Any]:
        """One archive file, parsed (cached while its inode, times and size are unchanged)."""
        key = _stat_key(path)
        cached = self._archive_cache.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        data = _read_json(path, "session archive") or {}
        if len(self._archive_cache) >= ARCHIVE_FILES_CACHED:
            self._archive_cache.clear()  # a long-lived store never holds the whole archive
        self._archive_cache[path] = (key, data)
        return data

    def _owner_files(self, owner: str) -> list[Path]:
        """The owner's archive files, newest month first."""
        try:
            names = os.listdir(self._owner_dir(owner))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [self._owner_dir(owner) / n for n in sorted(names, reverse=True) if n.endswith(".json")]

    def _archived_of(self, owner: str) -> list[dict[str, Any]]:
        """Whole copies of the owner's archived records."""
        found = []
        for path in self._owner_files(owner):
            data = self._archive_file(path)
            for r in data.get("sessions", {}).values():
                self._archived_at[r["id"]] = path
                found.append(_whole(r, data.get("snapshots", {})))
        return found

    def _archived_by_name(self, owner: str, name: str) -> tuple[Path, dict[str, Any]] | None:
        # Files are per month of creation: the newest month holding the name holds its newest.
        for path in self._owner_files(owner):
            data = self._archive_file(path)
            matches = [r for r in data.get("sessions", {}).values() if r["name"] == name]
            if matches:
                record = max(matches, key=lambda r: r["created_at"])
                self._archived_at[record["id"]] = path
                return path, _whole(record, data.get("snapshots", {}))
        return None

    def _archived_by_id(self, session_id: str) -> tuple[Path, dict[str, Any]] | None:
        hinted = self._archived_at.get(session_id)
        paths = [hinted] if hinted else []
        # Never seen by this process: every archive file (slow, but only for an id it never listed).
        paths += sorted(self.archive_dir.glob("*/*.json"), reverse=True) if not hinted else []
        for path in paths:
            data = self._archive_file(path)
            record = data.get("sessions", {}).get(session_id)
            if record is not None:
                return path, _whole(record, data.get("snapshots", {}))
        return None

    # --- the interface the manager uses ---------------------------------------------------

    def sessions_of(self, owner: str, *, archived: bool = True) -> list[dict[str, Any]]:
        """Every session record of one owner (archived ones too unless ``archived=False``), oldest first."""
        with self.transaction(shared=True) as tx:
            found = tx.sessions.search(Query().owner == owner)
            if archived:
                live = {s["id"] for s in found}
                found += [r for r in self._archived_of(owner) if r["id"] not in live]
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
            record = dict(found)  # a deep copy already (_Detached)
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


def _file_version(tables: dict[str, Any]) -> int:
    meta = (tables.get("meta") or {}).get("1") or {}
    return int(meta.get("schema_version", 1))


def _stat_key(path: Path) -> tuple:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return ("missing",)
    return (info.st_ino, info.st_mtime_ns, info.st_ctime_ns, info.st_size)


def _month(record: dict[str, Any]) -> str:
    """The archive file of a session: the UTC month it was created in."""
    return time.strftime("%Y-%m", time.gmtime(record["created_at"]))


def _archivable(sessions: dict[str, dict[str, Any]], cutoff: float) -> set[str]:
    """Doc ids of the ended sessions untouched since ``cutoff`` that may leave the live file.

    Ended: STOPPED or FAILED, holding nothing, no job of theirs still unfinished, no `run` in
    flight. Of sessions sharing an owner and name only the oldest go, and an older one always
    before a newer one: a live record of a name is then always newer than its archived ones.
    """
    from .steps import active_jobs, submitting

    def ended(r: dict[str, Any]) -> bool:
        return (
            r["state"] in (STOPPED, FAILED)
            and not r.get("resources_left")
            and (r.get("updated_at") or r["created_at"]) < cutoff
            and not active_jobs(r)
            and not submitting(r)
        )

    groups: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = {}
    for doc_id, r in sessions.items():
        groups.setdefault((r["owner"], r["name"]), []).append((doc_id, r))
    due = set()
    for members in groups.values():
        for doc_id, r in sorted(members, key=lambda m: m[1]["created_at"]):
            if not ended(r):
                break
            due.add(doc_id)
    return due


def _check_state(record: dict[str, Any], expect: tuple[str, ...] | None) -> None:
    if expect is not None and record["state"] not in expect:
        raise StateChanged(record)


def _new_generation(lock_fd: int) -> None:
    """Put a new write generation in the lock file (its writer holds the exclusive lock).

    Always 32 characters written over the last ones: no truncation, whose freed block would wait
    for its discard on this kind of disk.
    """
    os.pwrite(lock_fd, uuid.uuid4().hex.encode(), 0)


def new_session_id() -> str:
    """A new unique session id."""
    return uuid.uuid4().hex
