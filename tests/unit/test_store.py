"""The session store: records carry a schema version, and concurrent writers lose nothing."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time

from iosea_wf import store as st


def _record(name, owner="alice", state=st.ACTIVE):
    now = time.time()
    return {
        "id": st.new_session_id(),
        "name": name,
        "owner": owner,
        "workflow": "wf",
        "state": state,
        "created_at": now,
        "updated_at": now,
        "services": [{"name": "svc", "state": "ACTIVE"}],
    }


def test_records_carry_schema_version(tmp_path):
    s = st.Store(tmp_path)
    rec = _record("s1")
    with s.transaction() as tx:
        tx.put_session(rec)
        tx.allocate(
            {
                "datanode": "dn1",
                "session_id": rec["id"],
                "service": "svc",
                "cores": 2,
                "memory_mb": 10,
                "storage_gb": 0,
            }
        )
    data = json.loads((tmp_path / "iosea-wf.json").read_text())
    assert all(r["schema_version"] == st.SCHEMA_VERSION for r in data["sessions"].values())
    assert all(r["schema_version"] == st.SCHEMA_VERSION for r in data["allocations"].values())


def test_sessions_are_keyed_by_owner(tmp_path):
    s = st.Store(tmp_path)
    with s.transaction() as tx:
        tx.put_session(_record("s1", "alice"))
        tx.put_session(_record("s1", "bob"))
    assert [r["owner"] for r in s.sessions_of("alice")] == ["alice"]
    with s.transaction(shared=True) as tx:
        assert tx.session("bob", "s1")["owner"] == "bob"
        assert tx.session("carol", "s1") is None


def test_live_only_ignores_stopped_sessions(tmp_path):
    s = st.Store(tmp_path)
    with s.transaction() as tx:
        tx.put_session(_record("s1", state=st.STOPPED))
        assert tx.session("alice", "s1", live_only=True) is None
        assert tx.session("alice", "s1")["state"] == st.STOPPED


def test_allocations_add_up_and_release(tmp_path):
    s = st.Store(tmp_path)
    with s.transaction() as tx:
        for i in range(3):
            tx.allocate(
                {
                    "datanode": "dn1",
                    "session_id": "a",
                    "service": f"s{i}",
                    "cores": 2,
                    "memory_mb": 100,
                    "storage_gb": 1,
                }
            )
        tx.allocate(
            {
                "datanode": "dn2",
                "session_id": "b",
                "service": "x",
                "cores": 8,
                "memory_mb": 1,
                "storage_gb": 1,
            }
        )
        assert tx.used_on("dn1") == {"cores": 6, "memory_mb": 300, "storage_gb": 3}
        assert tx.release("a", "s0") == 1
        assert tx.used_on("dn1")["cores"] == 4
        assert tx.release("a") == 2
        assert tx.used_on("dn1")["cores"] == 0


def _writer(state_dir, worker, count):
    s = st.Store(state_dir)
    for i in range(count):
        with s.transaction() as tx:
            tx.allocate(
                {
                    "datanode": "dn",
                    "session_id": f"w{worker}",
                    "service": f"s{i}",
                    "cores": 1,
                    "memory_mb": 0,
                    "storage_gb": 0,
                }
            )


def test_concurrent_writers_lose_nothing(tmp_path):
    procs = [mp.Process(target=_writer, args=(tmp_path, w, 40)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with st.Store(tmp_path).transaction(shared=True) as tx:
        assert tx.used_on("dn")["cores"] == 8 * 40
    assert not list(tmp_path.glob(".store-*.tmp"))


def test_update_session_applies_changes(tmp_path):
    s = st.Store(tmp_path)
    rec = _record("s1")
    with s.transaction() as tx:
        tx.put_session(rec)
    new = s.update_service(rec["id"], "svc", state="STOPPED")
    assert new["services"][0]["state"] == "STOPPED"
    new = s.update_session(rec["id"], state=st.STOPPED)
    assert s.sessions_of("alice")[0]["state"] == st.STOPPED == new["state"]


def test_corrupt_store_is_a_clear_error(tmp_path):
    (tmp_path / "iosea-wf.json").write_text("{not json")
    s = st.Store(tmp_path)
    try:
        s.sessions_of("alice")
    except st.StoreError as exc:
        assert "corrupt" in str(exc)
    else:
        raise AssertionError("a corrupt store must raise StoreError")


# --- the cache of a long-lived store (the service's) ------------------------------------------


def _count_parses(monkeypatch) -> list[int]:
    """Count how often the live store file is parsed."""
    parses = [0]
    read = st._read_json

    def counting(path, *args):
        if path.name == "iosea-wf.json":
            parses[0] += 1
        return read(path, *args)

    monkeypatch.setattr(st, "_read_json", counting)
    return parses


def _state_writer(state_dir, session_id, state):
    st.Store(state_dir).update_session(session_id, state=state)


def test_a_cached_store_parses_once_while_the_file_is_unchanged(tmp_path, monkeypatch):
    rec = _record("s1")
    with st.Store(tmp_path).transaction() as tx:
        tx.put_session(rec)
    parses = _count_parses(monkeypatch)
    cached = st.Store(tmp_path, cache=True)
    for _ in range(3):
        assert cached.sessions_of("alice")[0]["state"] == st.ACTIVE
    assert parses[0] == 1
    # A write of its own is not parsed again: the store holds what it wrote.
    cached.update_session(rec["id"], state=st.STOPPING)
    assert [cached.sessions_of("alice")[0]["state"] for _ in range(2)] == [st.STOPPING] * 2
    assert parses[0] == 1


def test_a_cached_store_sees_writes_by_another_store_and_another_process(tmp_path):
    rec = _record("s1")
    cached = st.Store(tmp_path, cache=True)
    with st.Store(tmp_path).transaction() as tx:
        tx.put_session(rec)
    assert cached.sessions_of("alice")[0]["state"] == st.ACTIVE
    # The same length of state, written at once: the same size, often the same mtime tick.
    for state in (st.STOPPING, st.STARTING, st.STOPPING):
        st.Store(tmp_path).update_session(rec["id"], state=state)
        assert cached.sessions_of("alice")[0]["state"] == state
    proc = mp.Process(target=_state_writer, args=(tmp_path, rec["id"], st.STOPPED))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    with cached.transaction(shared=True) as tx:
        assert tx.session("alice", "s1")["state"] == st.STOPPED


def test_a_new_write_generation_alone_invalidates_the_cache(tmp_path, monkeypatch):
    """A new file may have the old one's inode, mtime and size: the writer's generation tells."""
    with st.Store(tmp_path).transaction() as tx:
        tx.put_session(_record("s1"))
    cached = st.Store(tmp_path, cache=True)
    cached.sessions_of("alice")
    parses = _count_parses(monkeypatch)
    cached.sessions_of("alice")
    assert parses[0] == 0
    lock = os.open(cached.lock_path, os.O_RDWR)
    st._new_generation(lock)  # what a writer does before its rename
    os.close(lock)
    cached.sessions_of("alice")
    assert parses[0] == 1


def test_every_write_puts_a_new_generation_in_place(tmp_path):
    s = st.Store(tmp_path)
    rec = _record("s1")
    with s.transaction() as tx:
        tx.put_session(rec)
    seen = set()
    for state in (st.STOPPING, st.ACTIVE, st.STOPPING):
        s.update_session(rec["id"], state=state)
        generation = (tmp_path / "iosea-wf.lock").read_bytes()
        assert len(generation) == 32 and generation not in seen
        seen.add(generation)


def test_records_from_the_cache_are_copies(tmp_path):
    with st.Store(tmp_path).transaction() as tx:
        tx.put_session(_record("s1"))
    cached = st.Store(tmp_path, cache=True)
    mine = cached.sessions_of("alice")[0]
    mine["services"][0]["state"] = "CHANGED"
    mine["state"] = "CHANGED"
    with cached.transaction(shared=True) as tx:
        again = tx.session("alice", "s1")
    assert again["state"] == st.ACTIVE and again["services"][0]["state"] == "ACTIVE"


def test_a_shared_transaction_of_a_cached_store_cannot_write(tmp_path):
    with st.Store(tmp_path).transaction() as tx:
        tx.put_session(_record("s1"))
    cached = st.Store(tmp_path, cache=True)
    try:
        with cached.transaction(shared=True) as tx:
            tx.put_session(_record("s2"))
    except st.StoreError as exc:
        assert "read-only" in str(exc)
    else:
        raise AssertionError("a write in a shared transaction must raise StoreError")
    assert [r["name"] for r in st.Store(tmp_path).sessions_of("alice")] == ["s1"]


# --- what a write costs: one record encoded, each site snapshot once ---------------------------


def test_the_file_is_what_the_store_holds_after_every_kind_of_write(tmp_path):
    """Each record's JSON text is kept between writes: a record changed any way is written anew."""
    s = st.Store(tmp_path)
    a, b, c = _record("a"), _record("b"), _record("c")
    with s.transaction() as tx:
        tx.put_session(a)
        tx.add_sessions([b])
    s.update_session(a["id"], state=st.STOPPING)
    with s.transaction() as tx:  # TinyDB's own update changes the document in place
        tx.sessions.update({"state": st.STOPPED}, st.Query().id == b["id"])
    with s.transaction() as tx:
        tx.put_session(c)
        tx.sessions.remove(st.Query().id == a["id"])
    s.update_service(c["id"], "svc", state="LOST")
    on_disk = json.loads((tmp_path / "iosea-wf.json").read_text())
    states = {r["name"]: r["state"] for r in on_disk["sessions"].values()}
    assert states == {"b": st.STOPPED, "c": st.ACTIVE}
    fresh = {r["name"]: r for r in st.Store(tmp_path).sessions_of("alice")}
    assert fresh["c"]["services"][0]["state"] == "LOST"
    assert {r["name"]: r for r in s.sessions_of("alice")} == fresh


def test_a_site_snapshot_is_stored_once_and_records_come_out_whole(tmp_path):
    snapshot = {"path": "/site", "datanodes": {"dn1": {"cores": 32}}, "variables": {"x": [1, 2]}}
    s = st.Store(tmp_path)
    with s.transaction() as tx:
        for name in ("a", "b"):
            tx.put_session(dict(_record(name), site_snapshot=snapshot))
    data = json.loads((tmp_path / "iosea-wf.json").read_text())
    assert list(data["snapshots"].values()) == [snapshot]
    ref = {"$ref": next(iter(data["snapshots"]))}
    assert all(r["site_snapshot"] == ref for r in data["sessions"].values())
    for reader in (s, st.Store(tmp_path)):
        assert [r["site_snapshot"] for r in reader.sessions_of("alice")] == [snapshot, snapshot]
    with s.transaction() as tx:  # nobody refers to it any more: it goes
        for r in tx.sessions.all():
            tx.put_session(dict(r, site_snapshot=None))
    assert json.loads((tmp_path / "iosea-wf.json").read_text())["snapshots"] == {}
