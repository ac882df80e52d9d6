"""The session store: records carry a schema version, and concurrent writers lose nothing."""

from __future__ import annotations

import json
import multiprocessing as mp
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
