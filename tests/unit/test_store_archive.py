"""The store's archive: ended sessions leave the live file, nothing is lost however a move is cut."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time

import pytest

from iosea_wf import manager
from iosea_wf import store as st

DAY = 86400.0
# Two months apart: a move of both writes two archive files.
JAN, MAR = 1767225600.0, 1772323200.0  # 2026-01-01, 2026-03-01 (UTC)


def _record(name, owner="alice", state=st.STOPPED, created=JAN, **extra):
    return {
        "id": st.new_session_id(),
        "name": name,
        "owner": owner,
        "workflow": "wf",
        "state": state,
        "created_at": created,
        "updated_at": created + 60,
        "services": [
            {
                "name": "svc",
                "type": "NFS",
                "state": "STOPPED",
                "datanode": "datanode1",
                "url": None,
                "mountpoint": "/mnt/x",
                "namespace": f"/ns/{owner}/{name}",
                "flavor": "small",
            }
        ],
        "steps": [],
        **extra,
    }


def _put(store, *records):
    with store.transaction() as tx:
        for r in records:
            tx.put_session(r)


def _live_ids(state_dir) -> set[str]:
    data = json.loads((state_dir / "iosea-wf.json").read_text())
    return {r["id"] for r in data["sessions"].values()}


def _archived_ids(state_dir) -> set[str]:
    found = set()
    for path in (state_dir / "archive").glob("*/*.json"):
        found |= set(json.loads(path.read_text())["sessions"])
    return found


def test_ended_sessions_older_than_keep_days_move_to_the_archive(tmp_path):
    s = st.Store(tmp_path, keep_days=7)
    now = MAR + 30 * DAY
    old = _record("old")  # January: archived
    old_failed = _record("crashed", state=st.FAILED, created=MAR)
    held = _record("held", state=st.FAILED, resources_left=True)  # still holds something: live
    live = _record("live", state=st.ACTIVE)
    recent = _record("recent", created=now - DAY)  # ended yesterday: live
    running = _record("jobs", steps=[{"name": "s", "job_id": "12", "state": "RUNNING", "datamovers": []}])
    bobs = _record("old", owner="bob")
    _put(st.Store(tmp_path), old, old_failed, held, live, recent, running, bobs)

    assert s.archive_ended(now=now) == 3
    moved = {old["id"], old_failed["id"], bobs["id"]}
    assert _archived_ids(tmp_path) == moved
    assert _live_ids(tmp_path) == {held["id"], live["id"], recent["id"], running["id"]}
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("archive/*/*.json")) == [
        "archive/alice/2026-01.json",
        "archive/alice/2026-03.json",
        "archive/bob/2026-01.json",
    ]
    assert not (tmp_path / "archive" / st.INTENT_FILE).exists()

    # Read back: by owner (list --all), by name (status), by id; a fresh store (another process) too.
    for reader in (s, st.Store(tmp_path)):
        assert {r["name"] for r in reader.sessions_of("alice")} == {
            "old",
            "crashed",
            "held",
            "live",
            "recent",
            "jobs",
        }
        assert {r["name"] for r in reader.sessions_of("alice", archived=False)} == {
            "held",
            "live",
            "recent",
            "jobs",
        }
        with reader.transaction(shared=True) as tx:
            assert tx.session("alice", "old")["id"] == old["id"]
            assert tx.session("bob", "old")["id"] == bobs["id"]
            assert tx.session_by_id(old_failed["id"])["state"] == st.FAILED
            assert tx.sessions.get(st.Query().id == old["id"])["name"] == "old"
            # Uniqueness and accounting look at the live file only.
            assert tx.session("alice", "old", live_only=True) is None
            assert {r["name"] for r in tx.live_sessions()} == {"held", "live"}


def test_nothing_is_archived_without_keep_days_and_live_writes_archive_when_due(tmp_path):
    now = time.time()
    _put(st.Store(tmp_path), _record("old", created=now - 30 * DAY))
    _put(st.Store(tmp_path), _record("other", state=st.ACTIVE, created=now))  # no keep_days: stays
    assert len(_live_ids(tmp_path)) == 2
    # A writer that knows keep_days archives what is due with its own write (one live write).
    _put(st.Store(tmp_path, keep_days=lambda: 7), _record("new", state=st.ACTIVE, created=now))
    assert len(_live_ids(tmp_path)) == 2 and len(_archived_ids(tmp_path)) == 1


def test_an_older_session_of_a_name_is_archived_before_a_newer_one(tmp_path):
    s = st.Store(tmp_path, keep_days=7)
    s._next_archive = float("inf")  # only when asked, below
    first = _record("x", created=JAN)
    second = _record("x", created=JAN + DAY)
    second["updated_at"] = MAR  # touched later: not due yet
    third = _record("x", created=JAN + 2 * DAY)  # due, but newer than one that stays
    _put(s, first, second, third)
    assert s.archive_ended(now=MAR + DAY) == 1
    assert _archived_ids(tmp_path) == {first["id"]}
    with s.transaction(shared=True) as tx:
        assert tx.session("alice", "x")["id"] == third["id"]  # still the newest of the name


def test_a_write_of_an_archived_session_brings_it_back_live(tmp_path):
    s = st.Store(tmp_path, keep_days=7)
    old = _record("old")
    _put(st.Store(tmp_path), old)
    s.archive_ended(now=MAR)
    fresh = st.Store(tmp_path, keep_days=7)  # another process: it only knows the name
    with fresh.transaction(shared=True) as tx:
        assert tx.session("alice", "old")["id"] == old["id"]
    fresh.modify_session(old["id"], lambda r: r.setdefault("shares", {}).update(bob={"mode": "ro"}))
    assert _live_ids(tmp_path) == {old["id"]} and _archived_ids(tmp_path) == set()
    assert st.Store(tmp_path).sessions_of("alice")[0]["shares"] == {"bob": {"mode": "ro"}}
    s.archive_ended(now=time.time() + 30 * DAY)
    with pytest.raises(st.StateChanged):  # a change meant for ACTIVE sessions is refused, unwritten
        st.Store(tmp_path).update_session(old["id"], expect=(st.ACTIVE,), state=st.STOPPING)
    assert _archived_ids(tmp_path) == {old["id"]} and _live_ids(tmp_path) == set()


def test_list_all_and_status_find_archived_sessions(tmp_path):
    ctx = manager.Context(state_dir=str(tmp_path), user="alice")
    old = _record("old")
    _put(ctx.store, old, _record("live", state=st.ACTIVE, created=time.time()))
    st.Store(tmp_path, keep_days=7).archive_ended()
    assert [r["session"] for r in manager.list_sessions(ctx)] == ["live"]
    assert [r["session"] for r in manager.list_sessions(ctx, include_ended=True)] == ["old", "live"]
    view = manager.status(ctx, "old")
    assert (view["session"], view["state"], view["id"]) == ("old", st.STOPPED, old["id"])


# --- a move cut short at each of its steps ------------------------------------------------------


def _crashing_mover(state_dir, at, count_before_crash):
    """Archive everything due, dying (as a kill -9 would: no cleanup) after ``at``."""
    seen = {"n": 0}

    def hook(name):
        if name == at:
            seen["n"] += 1
            if seen["n"] == count_before_crash:
                os._exit(17)

    st._crash_hook = hook
    st.Store(state_dir, keep_days=7).archive_ended(now=MAR + 60 * DAY)
    os._exit(0)


@pytest.mark.parametrize(
    ("at", "nth"),
    [("intent", 1), ("archive", 1), ("archive", 2), ("live", 1)],
    ids=["after-intent", "after-first-archive-file", "after-all-archive-files", "after-live-write"],
)
def test_a_move_cut_short_loses_nothing_and_the_next_writer_finishes_it(tmp_path, at, nth):
    jan, mar, live = _record("jan"), _record("mar", created=MAR), _record("live", state=st.ACTIVE)
    _put(st.Store(tmp_path), jan, mar, live)
    proc = mp.get_context("fork").Process(target=_crashing_mover, args=(tmp_path, at, nth))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 17, "the mover did not reach the step it should die after"
    assert (tmp_path / "archive" / st.INTENT_FILE).exists()

    # Readers meanwhile: every session once, whole.
    reader = st.Store(tmp_path)
    got = reader.sessions_of("alice")
    assert sorted(r["name"] for r in got) == ["jan", "live", "mar"]
    with reader.transaction(shared=True) as tx:
        assert tx.session("alice", "jan")["id"] == jan["id"]
        assert tx.session_by_id(mar["id"])["name"] == "mar"

    # The next writer (which need not archive at all) finishes the move.
    st.Store(tmp_path).update_session(live["id"], state=st.STOPPING)
    assert _live_ids(tmp_path) == {live["id"]}
    assert _archived_ids(tmp_path) == {jan["id"], mar["id"]}
    assert not (tmp_path / "archive" / st.INTENT_FILE).exists()
    assert sorted(r["name"] for r in st.Store(tmp_path).sessions_of("alice")) == ["jan", "live", "mar"]
    assert not list(tmp_path.rglob(".store-*.tmp"))


def test_a_move_cut_before_its_intent_changes_nothing(tmp_path):
    jan = _record("jan")
    _put(st.Store(tmp_path), jan)
    before = (tmp_path / "iosea-wf.json").read_bytes()

    def die(name):
        raise KeyboardInterrupt  # a Ctrl-C inside the move: no file of the archive is there yet

    st._crash_hook = die
    try:
        with pytest.raises(KeyboardInterrupt):
            st.Store(tmp_path, keep_days=7).archive_ended(now=MAR)
    finally:
        st._crash_hook = None
    assert (tmp_path / "iosea-wf.json").read_bytes() == before
    # The intent was written (the hook runs after it); no archive file: the next writer finishes.
    assert _archived_ids(tmp_path) == set()
    st.Store(tmp_path).update_session(jan["id"], note="x")
    assert st.Store(tmp_path).sessions_of("alice")[0]["note"] == "x"


# --- schema -------------------------------------------------------------------------------------


def test_a_schema_1_file_is_read_and_migrated_by_the_first_writer(tmp_path):
    old = _record("old", state=st.ACTIVE)
    old["schema_version"] = 1
    v1 = {
        "sessions": {"1": old},
        "allocations": {
            "1": {
                "datanode": "dn1",
                "session_id": old["id"],
                "service": "svc",
                "cores": 2,
                "memory_mb": 1,
                "storage_gb": 0,
                "schema_version": 1,
            }
        },
    }
    (tmp_path / "iosea-wf.json").write_text(json.dumps(v1))
    s = st.Store(tmp_path)
    with s.transaction(shared=True) as tx:
        assert tx.session("alice", "old")["state"] == st.ACTIVE
        assert tx.used_on("dn1")["cores"] == 2
    assert json.loads((tmp_path / "iosea-wf.json").read_text()) == v1  # a reader writes nothing
    with s.transaction() as tx:  # a writer that changes nothing still migrates
        pass
    data = json.loads((tmp_path / "iosea-wf.json").read_text())
    assert data["meta"]["1"]["schema_version"] == st.SCHEMA_VERSION == 2
    assert data["sessions"]["1"]["schema_version"] == 2
    assert data["allocations"]["1"]["schema_version"] == 2


def test_a_store_of_a_newer_schema_is_refused(tmp_path):
    (tmp_path / "iosea-wf.json").write_text(json.dumps({"meta": {"1": {"schema_version": 99}}}))
    with pytest.raises(st.StoreError, match="schema version 99"):
        st.Store(tmp_path).sessions_of("alice")


# --- concurrency --------------------------------------------------------------------------------


def _appender(state_dir, session_id, worker, count):
    s = st.Store(state_dir, keep_days=0)
    for i in range(count):
        s.modify_session(session_id, lambda r, i=i: r.setdefault("marks", []).append(f"{worker}.{i}"))


def _churner(state_dir, count):
    """Sessions started and stopped, archived at once (keep_days 0) while the others write."""
    s = st.Store(state_dir, keep_days=0)
    st.ARCHIVE_EVERY_S = 0.0
    for i in range(count):
        r = _record(f"c{i}", owner="carol", state=st.ACTIVE, created=time.time())
        _put(s, r)
        s.update_session(r["id"], state=st.STOPPED)


def test_several_processes_writing_and_archiving_lose_no_update(tmp_path):
    target = _record("shared", state=st.ACTIVE, created=time.time())
    _put(st.Store(tmp_path), target)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_appender, args=(tmp_path, target["id"], w, 25)) for w in range(4)]
    procs += [ctx.Process(target=_churner, args=(tmp_path, 20)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    s = st.Store(tmp_path)
    marks = s.sessions_of("alice")[0]["marks"]
    assert sorted(marks) == sorted(f"{w}.{i}" for w in range(4) for i in range(25))
    carols = s.sessions_of("carol")
    assert len(carols) == 40 and {r["state"] for r in carols} == {st.STOPPED}
    assert len({r["id"] for r in carols}) == 40
    assert _archived_ids(tmp_path) | _live_ids(tmp_path) >= {r["id"] for r in carols}
    assert not _archived_ids(tmp_path) & _live_ids(tmp_path)


def test_a_long_lived_store_sees_another_process_archive(tmp_path):
    old = _record("old")
    _put(st.Store(tmp_path), old)
    cached = st.Store(tmp_path)
    assert [r["name"] for r in cached.sessions_of("alice", archived=False)] == ["old"]
    proc = mp.get_context("fork").Process(
        target=lambda: st.Store(tmp_path, keep_days=7).archive_ended(now=MAR)
    )
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    assert cached.sessions_of("alice", archived=False) == []
    assert [r["id"] for r in cached.sessions_of("alice")] == [old["id"]]
