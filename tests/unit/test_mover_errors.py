"""Every failure of the mover is told, and its counters add up (issue 15, finding 11)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from tests.unit.mover_helpers import MOVER, digests, leftovers, make_tree, read_progress, run_mover, write

MB = 1 << 20


def test_a_target_that_cannot_be_prepared_is_told_on_stderr_and_in_the_progress_file(tmp_path):
    src, prog = str(tmp_path / "src"), str(tmp_path / "p.json")
    write(os.path.join(src, "f"), b"data")
    write(str(tmp_path / "file"), b"not a directory")
    r = run_mover(
        "copy", "--source", src, "--target", str(tmp_path / "file" / "sub"), "--progress", prog, "*"
    )
    assert r.returncode == 1
    assert "error: cannot prepare target" in r.stderr and "Not a directory" in r.stderr, r.stderr
    doc = read_progress(prog)
    assert doc["state"] == "failed" and any("cannot prepare target" in e for e in doc["errors"]), doc
    assert doc["files_done"] + doc["files_failed"] <= doc["files_total"]


def test_a_target_full_at_the_start_is_told_and_leaves_no_journal(tmp_path):
    """A full tmpfs (in a private mount namespace, gone with the process): exit 4, a reason,
    and the target holds nothing the mover made (main left .iosea-mover/journal.jsonl)."""
    src, dst, prog, listing = (str(tmp_path / n) for n in ("src", "dst", "p.json", "ls"))
    write(os.path.join(src, "f"), b"x" * 100_000)
    os.makedirs(dst)
    script = (
        'mount -t tmpfs -o size=64k tmpfs "$1" || exit 99; head -c 1M /dev/zero > "$1/filler" 2>/dev/null;'
        ' "$2" copy --source "$3" --target "$1" --progress "$4" "*"; rc=$?; ls -A "$1" > "$5"; exit $rc'
    )
    r = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script, "sh", dst, MOVER, src, prog, listing],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 4, r.stderr
    assert "No space left on device" in r.stderr and "Traceback" not in r.stderr
    with open(listing, encoding="utf-8") as f:
        assert f.read().split() == ["filler"]
    doc = read_progress(prog)
    assert doc["state"] == "failed" and doc["errors"], doc


def test_a_closed_stderr_is_no_traceback_and_no_other_exit_code(tmp_path):
    """The reader of stderr went away (a pipe closed early): the run completes, exit 0."""
    src, dst, prog = str(tmp_path / "src"), str(tmp_path / "dst"), str(tmp_path / "p.json")
    make_tree(src, n_small=50)
    r_fd, w_fd = os.pipe()
    os.close(r_fd)  # nobody will ever read: every write to stderr gets EPIPE
    try:
        proc = subprocess.run(
            [MOVER, "copy", "--source", src, "--target", dst, "--progress", prog, "*", "nothing-*"],
            stderr=w_fd,
            timeout=60,
        )
    finally:
        os.close(w_fd)
    assert proc.returncode == 0
    assert digests(dst) == digests(src) and read_progress(prog)["state"] == "completed"
    assert any("matched nothing" in w for w in read_progress(prog)["warnings"])


def test_sighup_cancels_like_sigterm_and_the_rerun_completes(tmp_path):
    src, dst, prog = str(tmp_path / "src"), str(tmp_path / "dst"), str(tmp_path / "p.json")
    make_tree(src, n_small=20, big_sizes=(32 * MB,) * 6, seed=4)
    expected = digests(src)
    args = ["move", "--workers", "1", "--source", src, "--target", dst, "--progress", prog, "*"]
    proc = subprocess.Popen([MOVER, *args], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not any(".iosea-tmp-" in p for p in leftovers(dst)):  # in the middle of a large file
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.0005)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 129, err
    assert "cancelled by signal 1" in err and "Traceback" not in err
    assert read_progress(prog)["state"] == "cancelled"
    assert [p for p in leftovers(dst) if ".iosea-tmp-" in p] == []
    r = run_mover(*args)
    assert r.returncode == 0, r.stderr
    assert digests(dst) == expected


def test_entries_named_like_the_movers_own_files_are_warned_about(tmp_path):
    src, dst, prog = str(tmp_path / "src"), str(tmp_path / "dst"), str(tmp_path / "p.json")
    write(os.path.join(src, "keep"), b"k")
    write(os.path.join(src, ".iosea-mover", "notes.txt"), b"a user's own directory of that name")
    # named as a temporary is now (run id, then worker and sequence); the old form is a user's file
    write(os.path.join(src, "d", ".draft.iosea-tmp-0123456789abcdef-01"), b"a user's file of that name")
    write(os.path.join(src, "d", ".old.iosea-tmp-0123abcd"), b"no longer a temporary's name")
    r = run_mover("copy", "--source", src, "--target", dst, "--progress", prog, "*")
    assert r.returncode == 0, r.stderr
    assert "warning: .iosea-mover: not transferred: named like the mover's journal directory" in r.stderr
    assert (
        "warning: d/.draft.iosea-tmp-0123456789abcdef-01: not transferred: named like a mover's temporary"
        in r.stderr
    )
    assert len(read_progress(prog)["warnings"]) == 2
    assert os.path.exists(os.path.join(dst, "d", ".old.iosea-tmp-0123abcd"))


def test_counters_add_up_with_refused_elements(tmp_path):
    """A FIFO and a symlink leading out of the source are refused: each counts once, in
    files_failed and in files_total (main counted them failed but not in the total)."""
    src, dst, prog = str(tmp_path / "src"), str(tmp_path / "dst"), str(tmp_path / "p.json")
    for i in range(3):
        write(os.path.join(src, f"f{i}"), b"x" * i)
    os.mkfifo(os.path.join(src, "fifo"))
    os.symlink("/etc/hostname", os.path.join(src, "out-link"))
    r = run_mover("copy", "--source", src, "--target", dst, "--progress", prog, "*")
    assert r.returncode == 1
    doc = read_progress(prog)
    assert (doc["files_total"], doc["files_done"], doc["files_failed"]) == (5, 3, 2), doc
    assert "copy failed: 3/5 files" in r.stderr and "2 failed" in r.stderr


def test_the_record_of_an_earlier_copy_in_a_source_is_skipped_without_a_word(tmp_path):
    """A directory that received a copy holds the mover's record: copying it on is no warning."""
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    write(os.path.join(str(tmp_path / "src"), "f"), b"f")
    assert run_mover("copy", "--source", str(tmp_path / "src"), "--target", first, "*").returncode == 0
    assert os.path.exists(os.path.join(first, ".iosea-mover", "record.jsonl"))
    r = run_mover("copy", "--source", first, "--target", second, "*")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    assert digests(second) == {"f": digests(first)["f"]}


def _adds_up(counts) -> None:
    """files_done + files_failed + files_left == files_total, none negative (a dict or a result)."""
    get = counts.get if isinstance(counts, dict) else lambda k: getattr(counts, k)
    done, failed, left, total = (get(k) for k in ("files_done", "files_failed", "files_left", "files_total"))
    assert min(done, failed, left) >= 0 and done + failed + left == total, (done, failed, left, total)


def test_counters_add_up_when_a_target_directory_cannot_be_made(tmp_path):
    """A file where the target needs directory d: its two files fail, once each (main counted the
    directory as a failed file too: 3 failed of 2)."""
    src, dst, prog = str(tmp_path / "src"), str(tmp_path / "dst"), str(tmp_path / "p.json")
    write(os.path.join(src, "d", "a"), b"a")
    write(os.path.join(src, "d", "b"), b"b")
    write(os.path.join(src, "c"), b"c")
    write(os.path.join(dst, "d"), b"a file in the way")
    r = run_mover("copy", "--source", src, "--target", dst, "--progress", prog, "*")
    assert r.returncode == 1
    assert "d/: cannot create the target directory" in r.stderr, r.stderr
    doc = read_progress(prog)
    _adds_up(doc)
    assert (doc["files_total"], doc["files_done"], doc["files_failed"], doc["files_left"]) == (3, 1, 2, 0)
    assert "copy failed: 1/3 files" in r.stderr and "2 failed" in r.stderr


def test_every_name_of_a_hard_linked_file_whose_copy_failed_is_told(tmp_path):
    """The names of one inode are copied once: when that copy fails, each name is an error (main
    said nothing of the other names, and counted them nowhere)."""
    from iosea_wf.mover import engine

    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    write(os.path.join(src, "a"), b"one inode, three names")
    os.makedirs(os.path.join(src, "d"))
    os.link(os.path.join(src, "a"), os.path.join(src, "d", "b"))
    os.link(os.path.join(src, "a"), os.path.join(src, "c"))
    grown = []

    def grow(_snap, _reporter):  # planned and scanned, nothing copied yet
        if not grown:
            with open(os.path.join(src, "a"), "ab") as f:
                f.write(b" and more")
            grown.append(True)

    res = engine.transfer("move", src, dst, ["*"], workers=1, on_progress=grow)
    assert res.exit_code == 1
    assert sorted(e.split(":")[0] for e in res.errors) == ["a", "c", "d/b"], res.errors
    _adds_up(res)
    assert (res.files_done, res.files_failed) == (0, 3)
    assert sorted(os.listdir(src)) == ["a", "c", "d"] and os.listdir(os.path.join(src, "d")) == ["b"]


def test_counters_add_up_when_a_source_found_done_cannot_be_deleted(tmp_path):
    """A move finds a symlink already at the target (done) but its source directory was swapped
    for a symlink: it is kept and counted failed, not also done."""
    from iosea_wf.mover import engine

    src, dst, outside = str(tmp_path / "src"), str(tmp_path / "dst"), str(tmp_path / "outside")
    write(os.path.join(src, "d", "f"), b"f")
    os.symlink("f", os.path.join(src, "d", "link"))
    os.makedirs(outside)
    assert engine.transfer("copy", src, dst, ["*"]).state == "completed"
    swapped = []

    def swap(_snap, _reporter):
        if not swapped:
            os.rename(os.path.join(src, "d"), os.path.join(src, "d.orig"))
            os.symlink(outside, os.path.join(src, "d"))
            swapped.append(True)

    res = engine.transfer("move", src, dst, ["d"], workers=1, on_progress=swap)
    assert swapped and res.exit_code == 1
    _adds_up(res)
    assert (res.files_done, res.files_failed) == (0, 2), res.errors
    assert sorted(os.listdir(os.path.join(src, "d.orig"))) == ["f", "link"]


def test_a_cancelled_run_counts_what_it_left_in_the_progress_file_and_its_last_line(tmp_path):
    src, dst, prog = str(tmp_path / "src"), str(tmp_path / "dst"), str(tmp_path / "p.json")
    make_tree(src, n_small=20, big_sizes=(32 * MB,) * 6, seed=5)
    # --fsync: each large file takes long enough that the signal lands before the last one.
    args = ["copy", "--fsync", "--workers", "1", "--source", src, "--target", dst, "--progress", prog, "*"]
    proc = subprocess.Popen([MOVER, *args], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    # In the middle of the first large file (the largest go first): the others are left.
    while not any(".iosea-tmp-" in p and ".big" in p for p in leftovers(dst)):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.0005)
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    doc = read_progress(prog)
    _adds_up(doc)
    assert doc["state"] == "cancelled" and doc["files_left"] > 0, (doc, err)
    left = doc["files_left"]
    assert f"{doc['files_done']}/{doc['files_total']} files done, {left} left" in err, err
    r = run_mover(*args)
    assert r.returncode == 0, r.stderr
    doc = read_progress(prog)
    _adds_up(doc)
    assert doc["files_left"] == 0 and doc["files_done"] == doc["files_total"]
