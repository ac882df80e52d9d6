"""Two movers into one target (overlapping runs of one step, issue 14 finding 4): the second never
deletes a live mover's temporary file, and both complete. The real console script, real files."""

from __future__ import annotations

import fcntl
import os
import subprocess
import time

from tests.unit.mover_helpers import MOVER, digests, leftovers, make_tree, write


def _holding_the_target(dst: str) -> int:
    """Lock ``dst`` as a mover in flight does; the descriptor (closing it releases the lock)."""
    fd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_live_movers_temporary_is_never_removed_and_both_complete(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    make_tree(src, n_small=40)
    os.makedirs(dst)
    # Another mover in flight: its lock on the target, its temporary file in it.
    live = os.path.join(dst, ".top0000.txt.iosea-tmp-5eed1")
    write(live, b"half written")
    held = _holding_the_target(dst)
    second = subprocess.Popen(
        [MOVER, "copy", "--source", src, "--target", dst, "*"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(1.5)
        # Before: the second mover removed it at once ("left by an interrupted run") and copied.
        assert second.poll() is None, second.communicate()
        assert os.path.exists(live)
        assert os.listdir(dst) == [os.path.basename(live)]
    finally:
        os.unlink(live)  # the first mover renames its temporary into place, then ends
        os.close(held)
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    assert "waiting for another mover writing into" in err
    assert digests(dst) == digests(src) and not leftovers(dst)


def test_two_movers_started_together_both_complete(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    make_tree(src, n_small=400, big_sizes=(8 << 20,))
    procs = [
        subprocess.Popen(
            [MOVER, "copy", "--source", src, "--target", dst, "*"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(3)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert digests(dst) == digests(src) and not leftovers(dst)


def test_a_cancelled_waiting_mover_touches_nothing(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    make_tree(src, n_small=5)
    os.makedirs(dst)
    held = _holding_the_target(dst)
    try:
        waiting = subprocess.Popen(
            [MOVER, "copy", "--source", src, "--target", dst, "*"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(1.0)
        waiting.terminate()
        _, err = waiting.communicate(timeout=10)
        assert waiting.returncode == 143, err
        assert os.listdir(dst) == []  # no journal, no temporary, nothing copied
    finally:
        os.close(held)
