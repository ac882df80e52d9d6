"""A move keeps every source whose copy the target failed to write back (issue 15, finding 4).

The failing disk is real: an ext4 without a journal on a loop device whose image lives on a small
tmpfs. Writes land in the page cache and succeed; write-back fails (EIO) once the tmpfs is full,
and syncfs says so. What reached the disk is read back after the loop device is set up afresh.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest
import xxhash

from tests.unit.mover_helpers import digests, run_mover, write

MB = 1 << 20


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.fixture
def failing_disk(tmp_path):
    """Return (mountpoint, remount): an ext4 whose write-back fails past ~6 MiB; all undone at the end."""
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    image = str(backing / "ext4.img")
    state = {"tmpfs": False, "loop": None, "mounted": False}

    def attach() -> None:
        r = _run("losetup", "--find", "--show", image)
        if r.returncode:
            pytest.skip(f"no loop device here: {r.stderr.strip()}")
        state["loop"] = r.stdout.strip()
        r = _run("mount", "-t", "ext4", state["loop"], str(mnt))
        assert r.returncode == 0, r.stderr
        state["mounted"] = True

    def detach() -> None:
        if state["mounted"]:
            if _run("umount", str(mnt)).returncode:
                _run("umount", "-l", str(mnt))
            state["mounted"] = False
        if state["loop"]:
            _run("losetup", "-d", state["loop"])
            state["loop"] = None

    def remount() -> None:
        """Drop every cached page of the filesystem: what is read next comes from the image."""
        detach()
        attach()

    try:
        if _run("mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(backing)).returncode:
            pytest.skip("cannot mount a tmpfs here")
        state["tmpfs"] = True
        with open(image, "wb") as f:
            f.truncate(64 * MB)  # sparse: the tmpfs fills as blocks are written back
        r = _run("mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-E", "nodiscard", image)
        assert r.returncode == 0, r.stderr
        attach()
        yield str(mnt), remount
    finally:
        detach()
        if state["tmpfs"]:
            # The loop device lets go of its image asynchronously: retry, then detach lazily.
            for _ in range(50):
                if _run("umount", str(backing)).returncode == 0:
                    break
                time.sleep(0.1)
            else:
                _run("umount", "-l", str(backing))


@pytest.mark.parametrize("fsync", [[], ["--fsync"]], ids=["syncfs", "fsync"])
def test_a_move_keeps_the_sources_whose_copies_failed_to_reach_the_disk(tmp_path, failing_disk, fsync):
    mnt, remount = failing_disk
    src, dst = str(tmp_path / "src"), os.path.join(mnt, "t")
    for i in range(24):
        write(os.path.join(src, f"f{i:02}.bin"), os.urandom(MB if i % 3 else 20_000))
    expected = digests(src)
    r = run_mover("move", "--workers", "2", *fsync, "--source", src, "--target", dst, "*")
    # Files failed (1), or a write was refused once the disk had failed (4: target full).
    assert r.returncode in (1, 4), r.stderr
    assert "kept at the source: the target could not be synced" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    remount()
    at_src = digests(src)
    kept_only_at_target = 0
    for rel, digest in expected.items():
        if at_src.get(rel) != digest:
            assert _digest_or_none(os.path.join(dst, rel)) == digest, f"{rel} lost"
            kept_only_at_target += 1
    assert kept_only_at_target < len(expected)  # the failing disk did make sources stay


def _digest_or_none(path: str):
    """The xxh3-128 of a file read back from the failing disk; None when it cannot be read whole."""
    try:
        with open(path, "rb") as f:
            return xxhash.xxh3_128_digest(f.read())
    except OSError:  # EIO, EBADMSG: the disk lost it
        return None
