"""Interactive-access records in the store, without a site."""

from __future__ import annotations

import pytest

from iosea_wf import access, manager


@pytest.fixture
def ctx(tmp_path):
    """A context on a private store holding one ACTIVE session without services."""
    c = manager.Context(site_dir=None, state_dir=str(tmp_path / "state"))
    with c.store.transaction() as tx:
        tx.put_session(
            {"id": "sid", "owner": c.user, "name": "s", "state": "ACTIVE", "created_at": 1.0, "services": []}
        )
    return c


def _accesses(ctx):
    with ctx.store.transaction(shared=True) as tx:
        return tx.sessions.get(access.st.Query().id == "sid").get("accesses", [])


def test_accesses_are_recorded_and_updated_by_token(ctx):
    access._update_accesses(ctx, "sid", lambda acc: acc.append({"token": "a", "job_id": None}))
    access._update_accesses(ctx, "sid", lambda acc: acc.append({"token": "b", "job_id": None}))
    access._update_accesses(ctx, "sid", lambda acc: access._set(acc, "b", job_id="42", state="COMPLETED"))
    assert _accesses(ctx) == [
        {"token": "a", "job_id": None},
        {"token": "b", "job_id": "42", "state": "COMPLETED"},
    ]
    access._update_accesses(ctx, "sid", lambda acc: access._set(acc, "nope", job_id="1"))
    assert [a["job_id"] for a in _accesses(ctx)] == [None, "42"]
