"""Tests of the data mover on real files: the engine API and the ``iosea-wf-mover`` console script."""

from __future__ import annotations

import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

import pytest
import xxhash

from iosea_wf.mover import engine
from iosea_wf.mover.errors import MoverUsageError, NothingMatched, SourceMissing
from tests.unit.mover_helpers import MOVER, digests, leftovers, make_tree, read_progress, run_mover, write

MB = 1 << 20


@pytest.fixture
def tree(tmp_path):
    """A source tree with nested small files, two large files and an inside symlink; and a target."""
    src = str(tmp_path / "src")
    make_tree(src, n_small=300, big_sizes=(24 * MB, 3 * MB))
    os.chmod(os.path.join(src, "top0000.txt"), 0o640)
    os.symlink("d1/e1/f0001.bin", os.path.join(src, "data/rel-link"))
    os.symlink(os.path.join(src, "top0000.txt"), os.path.join(src, "data/abs-link"))
    return src, str(tmp_path / "dst")


def test_copy_keeps_content_layout_metadata_and_links(tree):
    src, dst = tree
    before = digests(src)
    r = run_mover("copy", "--source", src, "--target", dst, "*")
    assert r.returncode == 0, r.stderr
    after = digests(dst)
    # Symlinks keep their text, as cp -a keeps it (an absolute one inside the source too).
    assert after == before
    s, d = os.stat(os.path.join(src, "top0000.txt")), os.stat(os.path.join(dst, "top0000.txt"))
    assert stat.S_IMODE(d.st_mode) == 0o640 and d.st_mtime_ns == s.st_mtime_ns
    assert os.stat(os.path.join(dst, "data/big0.dat")).st_mtime_ns == 1_600_000_000 * 10**9
    assert digests(src) == before  # copy leaves the source alone
    assert leftovers(dst) == [] and leftovers(src) == []
    assert r.stderr.startswith(f"iosea-wf-mover: copy completed: {len(before)}/{len(before)} files")


def test_move_empties_matched_dirs_and_loses_nothing(tree):
    src, dst = tree
    before = digests(src)
    r = run_mover("move", "--source", src, "--target", dst, "data", "top*")
    assert r.returncode == 0, r.stderr
    after = digests(dst)
    assert after.keys() == before.keys()
    assert all(after[k] == v for k, v in before.items() if k != "data/abs-link")
    assert os.listdir(src) == []
    assert leftovers(dst) == []


def test_api_double_star_selects_nested_files_only(tree):
    src, dst = tree
    res = engine.transfer("copy", src, dst, ["data/**/f000*.bin"], workers=2)
    assert (res.state, res.exit_code, res.errors) == ("completed", 0, [])
    got = sorted(digests(dst))
    assert got == sorted(k for k in digests(src) if k.startswith("data/d") and "/f000" in k)
    assert res.files_done == res.files_total == len(got)


def test_symlink_pointing_outside_is_reported_and_others_copied(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    write(os.path.join(src, "a/ok.txt"), b"ok")
    write(str(tmp_path / "secret"), b"outside")
    os.symlink(str(tmp_path / "secret"), os.path.join(src, "a/out-link"))
    os.symlink("../../secret", os.path.join(src, "a/out-rel"))
    r = run_mover("copy", "--source", src, "--target", dst, "a")
    assert r.returncode == 1
    assert "iosea-wf-mover: error: a/out-link: symlink points outside the source; refused" in r.stderr
    assert "a/out-rel: symlink points outside the source" in r.stderr
    assert sorted(os.listdir(os.path.join(dst, "a"))) == ["ok.txt"]
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("pattern", ["../x", "/etc/passwd", "a/../../x", "out-link", "out-link/*"])
def test_pattern_escaping_the_source_is_refused_before_anything(tmp_path, pattern):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    write(os.path.join(src, "a/ok.txt"), b"ok")
    os.makedirs(tmp_path / "outside")
    os.symlink(str(tmp_path / "outside"), os.path.join(src, "out-link"))
    r = run_mover("copy", "--source", src, "--target", dst, "a", pattern)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("iosea-wf-mover: error: pattern") and "Traceback" not in r.stderr
    assert not os.path.exists(dst)


def test_usage_errors_and_missing_source(tmp_path):
    r = run_mover("copy", "--source", str(tmp_path / "nope"), "--target", str(tmp_path / "d"), "*")
    assert r.returncode == 3 and r.stderr.startswith("iosea-wf-mover: error: source directory")
    r = run_mover("shuffle", "--source", str(tmp_path), "--target", str(tmp_path / "d"), "*")
    assert r.returncode == 2 and r.stderr.startswith("iosea-wf-mover: error: argument operation")
    r = run_mover("copy", "--source", str(tmp_path), "--target", str(tmp_path / "d"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    with pytest.raises(SourceMissing):
        engine.transfer("copy", tmp_path / "nope", tmp_path / "d", ["*"])
    with pytest.raises(MoverUsageError):
        engine.transfer("copy", tmp_path, tmp_path, ["*"])


def test_help_documents_exit_codes():
    r = run_mover("--help")
    assert r.returncode == 0
    for code in ("0", "1", "2", "3", "4", "5", "129", "130", "143"):
        assert f"\n  {code} " in r.stdout


def test_empty_match_warns_and_strict_fails_doing_nothing(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    write(os.path.join(src, "a.txt"), b"a")
    r = run_mover("copy", "--source", src, "--target", dst, "a.txt", "*.h5")
    assert r.returncode == 0
    assert "iosea-wf-mover: warning: pattern '*.h5' matched nothing" in r.stderr
    assert sorted(os.listdir(dst)) == [".iosea-mover", "a.txt"]  # the record a copy leaves
    dst2 = str(tmp_path / "dst2")
    r = run_mover("copy", "--strict", "--source", src, "--target", dst2, "a.txt", "*.h5")
    assert r.returncode == 5 and not os.path.exists(dst2)
    with pytest.raises(NothingMatched):
        engine.transfer("copy", src, dst2, ["*.h5"], strict=True)


def test_unreadable_file_is_reported_and_the_others_copied(tmp_path):
    # Root reads any file whatever its mode, so the mover drops to 'nobody' after importing: the
    # EACCES below is a real one, from the kernel.
    base = tempfile.mkdtemp(prefix="mover-nobody-")
    try:
        os.chmod(base, 0o755)
        src, dst = os.path.join(base, "src"), os.path.join(base, "dst")
        write(os.path.join(src, "ok1.txt"), b"1")
        write(os.path.join(src, "secret.txt"), b"s", mode=0o000)
        write(os.path.join(src, "sub/ok2.txt"), b"2")
        os.makedirs(dst)
        for p in (base, src, dst, os.path.join(src, "sub")):
            os.chown(p, 65534, 65534)
        code = (
            # argparse imports locale and shutil lazily: load them while /root is still readable.
            "import os, sys, locale, shutil; from iosea_wf.mover import cli; os.setgroups([]);"
            "os.setgid(65534); os.setuid(65534); sys.exit(cli.main(sys.argv[1:]))"
        )
        args = ["copy", "--source", src, "--target", dst, "*"]
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1, r.stderr
        assert "iosea-wf-mover: error: secret.txt: Permission denied" in r.stderr
        assert sorted(digests(dst)) == ["ok1.txt", "sub/ok2.txt"]
        assert leftovers(dst) == []
    finally:
        shutil.rmtree(base)


def test_fifo_and_directory_in_the_way_are_per_file_errors(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    write(os.path.join(src, "ok.txt"), b"ok")
    write(os.path.join(src, "blocked.txt"), b"b")
    os.mkfifo(os.path.join(src, "pipe"))
    os.makedirs(os.path.join(dst, "blocked.txt"))  # a directory where a file is expected
    # replace=True: the rename itself meets the directory (without it, it is refused before).
    res = engine.transfer("copy", src, dst, ["*"], replace=True)
    assert res.exit_code == 1 and res.state == "failed"
    assert any(e.startswith("pipe: not a regular file") for e in res.errors)
    assert any(e.startswith("blocked.txt: Is a directory") for e in res.errors)
    with open(os.path.join(dst, "ok.txt"), "rb") as f:
        assert f.read() == b"ok"
    assert leftovers(dst) == []


def test_progress_json_final_document(tree, tmp_path):
    src, dst = tree
    prog = str(tmp_path / "progress.json")
    r = run_mover("copy", "--source", src, "--target", dst, "--progress", prog, "data")
    assert r.returncode == 0, r.stderr
    doc = read_progress(prog)
    files = [k for k in digests(src) if k.startswith("data/") and "link" not in k]
    total = sum(os.path.getsize(os.path.join(src, k)) for k in files)
    assert doc["operation"] == "copy" and doc["state"] == "completed"
    assert doc["files_total"] == doc["files_done"] == len([k for k in digests(dst)])
    assert doc["bytes_total"] == doc["bytes_done"] == total
    assert doc["errors"] == [] and doc["eta_s"] == 0.0 and doc["throughput_bytes_per_s"] >= 0
    assert abs(doc["updated_at"] - time.time()) < 60
    assert [n for n in os.listdir(tmp_path) if n.startswith("progress")] == ["progress.json"]


def test_rerun_removes_stale_temps_and_does_not_recopy_complete_files(tree):
    src, dst = tree
    assert engine.transfer("copy", src, dst, ["*"]).exit_code == 0
    big = os.path.join(dst, "data/big0.dat")
    ino = os.stat(big).st_ino
    # A temporary of a run that recorded itself and is gone (killed: its record stayed).
    dead_run = "deadbeef00c0ffee"
    write(os.path.join(dst, f".iosea-mover/run-{dead_run}"), b'{"host": "h", "pid": 1, "start": "0"}')
    stale = os.path.join(dst, f"data/.f.bin.iosea-tmp-{dead_run}-0a3")
    write(stale, b"half")
    res = engine.transfer("copy", src, dst, ["*"])
    assert res.exit_code == 0 and res.bytes_copied == 0  # verified by hashing both sides, not recopied
    assert os.stat(big).st_ino == ino
    assert leftovers(dst) == []
    assert any("removed 1 temporary file" in w for w in res.warnings)


def test_move_rerun_verifies_file_present_on_both_sides(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    write(os.path.join(src, "same.bin"), b"x" * 5000, mtime=1_600_000_000)
    write(os.path.join(src, "differs.bin"), b"y" * 5000, mtime=1_600_000_000)
    write(os.path.join(dst, "same.bin"), b"x" * 5000, mtime=1_600_000_000)
    write(os.path.join(dst, "differs.bin"), b"z" * 5000, mtime=1_600_000_000)  # same size and mtime
    res = engine.transfer("move", src, dst, ["*"], replace=True)  # else differs.bin is refused
    assert res.exit_code == 0
    assert os.listdir(src) == []
    with open(os.path.join(dst, "differs.bin"), "rb") as f:
        assert f.read() == b"y" * 5000
    assert res.bytes_copied == 5000


# The mover with every verified source handed to its deleter thread at once (as large files are),
# instead of deleted when the worker has no more work: the kill -9 trials cover both paths.
EARLY_DELETING_MOVER = [
    sys.executable,
    "-c",
    "import sys; from iosea_wf.mover import engine, cli; "
    "engine._DELETE_EARLY_BYTES = 1; sys.exit(cli.main())",
]


@pytest.mark.parametrize("mover", [[MOVER], EARLY_DELETING_MOVER], ids=["delete-at-end", "delete-early"])
def test_move_killed_at_random_moments_loses_nothing_and_rerun_completes(tmp_path, mover):
    pristine = str(tmp_path / "pristine")
    make_tree(pristine, n_small=300, big_sizes=(2 * MB, 3 * MB, 1 * MB + 7), seed=7)
    os.symlink("d0/e0/f0001.bin", os.path.join(pristine, "data/link"))
    shutil.copyfile(os.path.join(pristine, "top0004.txt"), os.path.join(pristine, "data/hard-link"))
    expected = digests(pristine)
    rng = random.Random(20240601)
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    shutil.copytree(pristine, src, symlinks=True)
    t0 = time.monotonic()
    assert subprocess.run([*mover, "move", "--source", src, "--target", dst, "*"]).returncode == 0
    duration = time.monotonic() - t0
    killed_mid_run = kept_links = 0
    for trial in range(20):
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(pristine, src, symlinks=True)
        os.unlink(os.path.join(src, "data/hard-link"))  # copytree split it: a hard link again
        os.link(os.path.join(src, "top0004.txt"), os.path.join(src, "data/hard-link"))
        proc = subprocess.Popen(
            [*mover, "move", "--source", src, "--target", dst, "*"], stderr=subprocess.DEVNULL
        )
        time.sleep(rng.uniform(0.0, duration))
        proc.kill()
        killed_mid_run += proc.wait() == -signal.SIGKILL
        at_src, at_dst = digests(src), digests(dst)
        for rel, digest in expected.items():
            assert rel in at_src or rel in at_dst, f"trial {trial}: {rel} lost"
            assert at_src.get(rel, digest) == digest, f"trial {trial}: {rel} altered at the source"
            assert at_dst.get(rel, digest) == digest, f"trial {trial}: {rel} incomplete at the target"
        in_place = {k for k in at_dst if ".iosea-tmp-" not in k and not k.startswith(".iosea-mover/")}
        assert in_place <= set(expected), f"trial {trial}: unexpected file in place"
        r = run_mover("move", "--source", src, "--target", dst, "*")
        assert r.returncode == 0, r.stderr
        assert digests(dst) == expected and os.listdir(src) == []
        assert leftovers(dst) == [] and leftovers(src) == []
        # Copied as one inode, unless the kill split the pair (the rerun copies what was left).
        linked = (
            os.stat(os.path.join(dst, "data/hard-link")).st_ino
            == os.stat(os.path.join(dst, "top0004.txt")).st_ino
        )
        kept_links += linked
    assert kept_links >= 5
    assert killed_mid_run >= 10  # most kills must land while the mover is running


def test_move_deleting_early_removes_a_source_only_once_its_copy_is_in_place(tmp_path, monkeypatch):
    """With a tiny early-deletion threshold, sources go while the copies go on, never before theirs."""
    src, dst, log = str(tmp_path / "src"), str(tmp_path / "dst"), str(tmp_path / "deletions.log")
    make_tree(src, n_small=200, big_sizes=(3 * MB, 2 * MB, 1 * MB + 3), seed=3)
    expected = digests(src)
    real_delete_now = engine._Worker.delete_now

    def checked_delete_now(self, todo):
        # Runs in the forked workers: one line per call, listing any source whose copy is not in
        # place with the same bytes at the moment it is about to be deleted.
        bad = []
        for d, name, *_ in todo:
            rel = f"{d}/{name}" if d else name
            try:
                with open(os.path.join(dst, rel), "rb") as f:
                    in_place = xxhash.xxh3_128_digest(f.read()) == expected[rel]
            except OSError:
                in_place = False
            if not in_place:
                bad.append(rel)
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {len(todo)} {' '.join(bad)}\n")
        real_delete_now(self, todo)

    monkeypatch.setattr(engine, "_DELETE_EARLY_BYTES", 1)
    monkeypatch.setattr(engine._Worker, "delete_now", checked_delete_now)
    res = engine.transfer("move", src, dst, ["*"], workers=2)
    assert res.exit_code == 0
    assert digests(dst) == expected and os.listdir(src) == []
    with open(log) as f:
        calls = [line.split(" ", 2) for line in f.read().splitlines()]
    assert all(bad.strip() == "" for _pid, _n, bad in calls), calls
    assert sum(int(n) for _pid, n, _bad in calls) == len(expected)
    assert len(calls) > 2, "sources were deleted only when the workers ran out of work"


def _state(pid: int) -> str | None:
    """Return the state letter of process ``pid`` (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _children_of(pid: int) -> set[int]:
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(name))
    return found


def test_kill_9_of_the_mover_kills_its_worker_processes(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    make_tree(src, n_small=50, big_sizes=(32 * MB,) * 8, seed=5)
    prog = str(tmp_path / "p.json")
    proc = subprocess.Popen(
        [MOVER, "move", "--workers", "2", "--source", src, "--target", dst, "--progress", prog, "*"]
    )
    deadline = time.monotonic() + 30
    # Its workers, once they copy (a fast machine moves these files in well under a second, so
    # the progress file's quarter-second updates may come too late to catch them).
    while not ((workers := _children_of(proc.pid)) and any(".iosea-tmp-" in p for p in leftovers(dst))):
        assert time.monotonic() < deadline and proc.poll() is None, "the mover runs its copies in workers"
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 5
    while any(_state(w) not in (None, "Z") for w in workers):  # a zombie has died already
        assert time.monotonic() < deadline, "a worker outlived the kill -9 of the mover"
        time.sleep(0.01)
    r = run_mover("move", "--source", src, "--target", dst, "*")
    assert r.returncode == 0, r.stderr
    assert os.listdir(src) == [] and leftovers(dst) == []


def test_sigterm_cancels_cleanly_and_rerun_completes(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    make_tree(src, n_small=100, big_sizes=(32 * MB,) * 24, seed=3)  # long enough to be interrupted
    expected = digests(src)
    prog = str(tmp_path / "p.json")
    args = ["move", "--workers", "1", "--source", src, "--target", dst, "--progress", prog, "*"]
    proc = subprocess.Popen([MOVER, *args], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (os.path.exists(prog) and read_progress(prog)["bytes_done"] > 0):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert "cancelled by signal 15" in err and "Traceback" not in err
    doc = read_progress(prog)
    assert doc["state"] == "cancelled" and doc["files_done"] < doc["files_total"]
    assert [p for p in leftovers(dst) if ".iosea-tmp-" in p] == []  # in-flight temp removed
    at_src, at_dst = digests(src), digests(dst)
    assert all(at_src.get(k, v) == v and at_dst.get(k, v) == v for k, v in expected.items())
    assert set(at_src) | {k for k in at_dst if not k.startswith(".iosea-mover/")} == set(expected)
    r = run_mover(*args)
    assert r.returncode == 0, r.stderr
    assert digests(dst) == expected and os.listdir(src) == [] and leftovers(dst) == []
    assert read_progress(prog)["state"] == "completed"


def test_target_full_stops_with_exit_4_and_no_temp(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        src = str(tmp_path / "src")
        write(os.path.join(src, "a.bin"), b"a" * 1_000_000)
        write(os.path.join(src, "b.bin"), b"b" * 3_000_000)
        r = run_mover("copy", "--workers", "1", "--source", src, "--target", str(mnt), "*")
        assert r.returncode == 4, r.stderr
        assert "target full" in r.stderr and "Traceback" not in r.stderr
        assert [n for n in os.listdir(mnt) if ".iosea-tmp-" in n] == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
