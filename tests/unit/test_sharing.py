"""Session sharing's rules on one store, without a site: who may do what, tokens, durations.

Two Contexts on the same state directory stand for two users of one store (what the site's
service holds); the service's tests (tests/integration/test_sharing.py) do the same with real
users. The shared user is ``nobody`` (share checks that the user exists on this host).
"""

from __future__ import annotations

import json
import os
import time

import pytest

from iosea_wf import manager, sharing
from iosea_wf import store as st
from iosea_wf.errors import EXIT_FORBIDDEN, EXIT_NOT_FOUND, EXIT_USAGE, Forbidden, IoseaError

OWNER, GUEST, OTHER = "alice-owner", "nobody", "daemon"


@pytest.fixture
def ctxs(tmp_path):
    """Contexts of the owner, a user to share with and a third user, on one store with one ACTIVE session."""
    made = {
        u: manager.Context(site_dir=None, state_dir=str(tmp_path / "state"), user=u)
        for u in (OWNER, GUEST, OTHER)
    }
    with made[OWNER].store.transaction() as tx:
        tx.put_session(
            {
                "id": "sid",
                "owner": OWNER,
                "name": "s1",
                "workflow": "wf",
                "state": st.ACTIVE,
                "created_at": 1.0,
                "services": [],
                "steps": [],
            }
        )
    return made


def _code(call, *args, **kwargs) -> int:
    with pytest.raises(IoseaError) as caught:
        call(*args, **kwargs)
    return caught.value.exit_code


def test_a_read_only_share_lets_see_but_not_run_stop_or_share(ctxs):
    owner, guest, other = ctxs[OWNER], ctxs[GUEST], ctxs[OTHER]
    ref = f"{OWNER}/s1"
    # Before the share: for the guest the session does not exist.
    assert _code(manager.status, guest, ref) == EXIT_NOT_FOUND
    shared = manager.share(owner, "s1", GUEST)
    assert (shared["mode"], shared["expires_at"]) == ("ro", None)

    listed = manager.list_sessions(guest)
    assert [(r["session"], r["owner"], r["shared_mode"]) for r in listed] == [("s1", OWNER, "ro")]
    assert [r["shared_mode"] for r in manager.list_sessions(owner)] == [None]
    assert manager.status(guest, ref)["shared_mode"] == "ro"
    assert [s["user"] for s in manager.status(owner, "s1")["shares"]] == [GUEST]

    with pytest.raises(Forbidden, match="read-only: run a step of needs a read-write share"):
        manager.run(guest, ref, "step1")
    assert _code(manager.cancel, guest, ref) == EXIT_FORBIDDEN
    for call, args in [
        (manager.stop, (guest, ref)),
        (manager.share, (guest, ref, OTHER)),
        (manager.unshare, (guest, ref, GUEST)),
        (manager.share_token, (guest, ref)),
    ]:
        with pytest.raises(Forbidden, match=f"only {OWNER}, its owner, may"):
            call(*args)
    # A third user still sees nothing, and the guest's bare name is their own (none).
    assert _code(manager.status, other, ref) == EXIT_NOT_FOUND
    assert _code(manager.status, guest, "s1") == EXIT_NOT_FOUND

    assert manager.unshare(owner, "s1", GUEST)["was_shared"] is True
    assert _code(manager.status, guest, ref) == EXIT_NOT_FOUND
    assert manager.list_sessions(guest) == []
    assert manager.unshare(owner, "s1", GUEST)["was_shared"] is False


def test_share_refuses_the_owner_an_unknown_user_a_bad_mode_and_an_ended_session(ctxs):
    owner = ctxs[OWNER]
    assert _code(manager.share, owner, "s1", OWNER) == EXIT_USAGE
    assert _code(manager.share, owner, "s1", "no-such-user-iwf") == EXIT_USAGE
    assert _code(manager.share, owner, "s1", GUEST, "rwx") == EXIT_USAGE
    assert _code(manager.share, owner, "s1", "../etc") == EXIT_USAGE
    owner.store.update_session("sid", state=st.STOPPED)
    assert _code(manager.share, owner, "s1", GUEST) == 5
    assert _code(manager.share_token, owner, "s1") == 5


def test_a_token_is_stored_as_its_hash_and_works_once(ctxs):
    owner, guest, other = ctxs[OWNER], ctxs[GUEST], ctxs[OTHER]
    made = manager.share_token(owner, "s1", "rw")
    token = made["token"]
    assert token.startswith(sharing.TOKEN_PREFIX)
    assert made["expires_at"] - time.time() == pytest.approx(sharing.DEFAULT_TOKEN_LIFETIME_S, abs=5)
    stored = owner.store.db_path.read_text()
    assert token not in stored and sharing._digest(token) in stored

    # The owner's own token is not for them (and is not used up by trying).
    assert _code(manager.join, owner, token) == EXIT_USAGE
    joined = manager.join(guest, token)
    assert (joined["owner"], joined["mode"], joined["via"]) == (OWNER, "rw", "token")
    assert manager.status(guest, f"{OWNER}/s1")["shared_mode"] == "rw"
    with pytest.raises(Forbidden, match="already used"):
        manager.join(other, token)
    with pytest.raises(Forbidden, match="already used"):
        manager.join(guest, token)
    assert _code(manager.join, other, sharing.TOKEN_PREFIX + "x" * 43) == EXIT_FORBIDDEN
    assert _code(manager.join, other, "not-a-token") == EXIT_USAGE


def test_an_expired_token_is_refused_and_the_share_it_gave_ends_with_it(ctxs):
    owner, guest, other = ctxs[OWNER], ctxs[GUEST], ctxs[OTHER]
    first = manager.share_token(owner, "s1", expires_s=60)["token"]
    second = manager.share_token(owner, "s1", expires_s=60)["token"]
    manager.join(guest, first)
    assert manager.status(guest, f"{OWNER}/s1")["shared_mode"] == "ro"

    def expire(record):
        for t in record["share_tokens"]:
            t["expires_at"] = 0.0
        record["shares"][GUEST]["expires_at"] = 0.0

    owner.store.modify_session("sid", expire)
    with pytest.raises(Forbidden, match="expired at"):
        manager.join(other, second)
    assert _code(manager.status, guest, f"{OWNER}/s1") == EXIT_NOT_FOUND
    assert manager.status(owner, "s1")["shares"] == []


@pytest.mark.parametrize(
    "text, seconds", [("90s", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800), ("30d", 2592000)]
)
def test_durations(text, seconds):
    assert sharing.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "12", "1y", "0s", "-5m", "1.5h", "31d", "12 h", "h"])
def test_bad_durations_are_usage_errors(text):
    with pytest.raises(IoseaError) as caught:
        sharing.parse_duration(text)
    assert caught.value.exit_code == EXIT_USAGE and "--expires" in caught.value.message


def test_the_cli_refuses_bad_share_lines_with_one_line_and_exit_2(iosea):
    for argv, said in [
        (["share", "SESSION=s1"], "USER= is mandatory"),
        (["share", "SESSION=s1", "USER=nobody", "--token"], "not both"),
        (["share", "SESSION=s1", "--token", "--expires", "1y"], "is not a duration"),
        (["share", "SESSION=s1", "--token", "--mode", "rx"], "invalid choice"),
        (["unshare", "SESSION=s1"], "USER= is mandatory"),
        (["join", "abc"], "not a share token"),
        (["status", "SESSION=a/b/c"], "invalid session name"),
    ]:
        r = iosea(*argv)
        assert r.code == EXIT_USAGE, (argv, r.err)
        assert said in r.err and "Traceback" not in r.err
        assert len(r.err.strip().splitlines()) == 1, r.err


def test_in_process_a_token_is_the_last_word_and_json_has_it(iosea, state_dir):
    ctx = manager.Context(site_dir=None, state_dir=str(state_dir))
    with ctx.store.transaction() as tx:
        tx.put_session(
            {
                "id": "x",
                "owner": ctx.user,
                "name": "s1",
                "workflow": "w",
                "state": st.ACTIVE,
                "created_at": 1.0,
            }
        )
    r = iosea("share", "SESSION=s1", "--token", "--expires", "90s")
    assert r.code == 0, r.err
    token = r.out.split()[-1]
    assert token.startswith(sharing.TOKEN_PREFIX)
    r = iosea("share", "SESSION=s1", "--token", "--json")
    assert json.loads(r.out)["token"].startswith(sharing.TOKEN_PREFIX)


@pytest.mark.skipif(os.geteuid() != 0, reason="acting for another user needs root")
def test_a_run_rechecks_the_share_under_the_lock_that_records_its_instance(ctxs):
    from iosea_wf import steps

    owner, guest = ctxs[OWNER], ctxs[GUEST]
    guest.slurm_jwt = "not-used"  # never reaches Slurm: refused before anything is planned
    manager.share(owner, "s1", GUEST, "rw")
    found = manager.find_session(guest, f"{OWNER}/s1", sharing.RUN, "run")
    # Between the lookup and the submission the owner makes the share read-only, then ends it.
    manager.share(owner, "s1", GUEST, "ro")
    with pytest.raises(Forbidden, match="read-only"):
        steps.submit(guest, found, "step1", "/tmp")
    manager.unshare(owner, "s1", GUEST)
    assert _code(steps.submit, guest, found, "step1", "/tmp") == EXIT_NOT_FOUND
    assert manager.status(owner, "s1")["steps"] == []


def test_a_token_redeemed_by_eight_users_at_once_is_redeemed_once(ctxs, tmp_path):
    import multiprocessing

    token = manager.share_token(ctxs[OWNER], "s1")["token"]
    state = str(tmp_path / "state")

    def redeem(i: int, results) -> None:
        try:
            manager.join(manager.Context(site_dir=None, state_dir=state, user=f"racer{i}"), token)
            results.put(("joined", i))
        except IoseaError as exc:
            results.put((exc.exit_code, i))

    fork = multiprocessing.get_context("fork")
    results = fork.Queue()
    racers = [fork.Process(target=redeem, args=(i, results)) for i in range(8)]
    for p in racers:
        p.start()
    outcomes = [results.get(timeout=30) for _ in racers]
    for p in racers:
        p.join(30)
    assert sorted(o for o, _ in outcomes if o != "joined") == [EXIT_FORBIDDEN] * 7
    (winner,) = [i for o, i in outcomes if o == "joined"]
    shares = manager.status(ctxs[OWNER], "s1")["shares"]
    assert [s["user"] for s in shares] == [f"racer{winner}"]
