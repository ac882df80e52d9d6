"""Benchmark ``iosea-wf-mover`` against ``cp -a`` and ``rsync -a`` on the disk that holds /work.

Datasets: (a) 1 GiB in 8 files, (b) 20,000 files of 4 KiB in nested directories, (c) one sparse
file of 4 GiB holding 4 KiB of data (a VM image, a checkpoint preallocated by truncate). Each tool runs
best-of-N into a fresh directory, with ``sync`` (write-back only: nothing is dropped from the page
cache) before every timed run, so all tools start from the same clean state. The tools are
interleaved: every round times each tool once, in an order rotated by one each round, so the noise
of a shared machine (its copies vary several-fold from one second to the next) is spread over all
of them rather than hitting whichever runs at a given point of the sequence. Aims, as ratios to
``cp -a``: (a) mover copy <= 1.2x; (b) mover copy faster than rsync -a; verified move <= 1.5x;
(b) also a no-op rerun of each copy onto its own unchanged output ("mover rerun" against "rsync -a
rerun": aim <= 1.2x, "about the time of rsync -a"; the mover's quick check stats both sides once,
hashes nothing and syncs nothing); (c) the sparse file copied by the mover in about
``cp -a``'s time (aim: within 0.3 s of it; ``cp -a`` copies only the data, and the mover's start-up
alone is ~0.1 s).

Why ``--settle``: on an ext4 without a journal (this bench box), the inode allocator scans past every
inode freed in the last ~60 s, which makes file creation right after a mass deletion several times
slower. ``move`` deletes its sources, so after each timed move of dataset (b) the bench waits that
window out before the next timed run, so that no tool pays for a previous tool's deletions, and (b)'s
outputs are kept until the end for the same reason. Dataset (a) has 8 files: its outputs are deleted
before each timed run instead, so that every tool writes into the same recycled memory (see
``bench_dataset``).

``move`` syncs the target filesystem before it deletes any source (a moved file must survive a crash
of the node, not only a kill of the mover), which ``cp -a`` never does: the bench also prints
"cp -a + sync", the time for a copy that is on the disk when it ends, and "cp -a + sync + rm -rf",
a durable move done with standard tools, as references a durable move can be read against. The
aims themselves are ratios to plain ``cp -a``, as specified.

The mover is timed as installed, byte-compiled (``bench/installed.py``): where
PYTHONDONTWRITEBYTECODE is set, an editable install would compile its modules on every run.

Run: ``.venv/bin/python bench/mover.py`` (needs rsync, not installed on these machines by
default: ``apt-get install -y rsync``). ``--only b --settle 0 --runs 5`` times the no-op reruns
quickly (the settle only matters for the timed moves).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import xxhash
from installed import byte_compile  # bench/installed.py, beside this script

MOVER = os.path.join(os.path.dirname(sys.executable), "iosea-wf-mover")
SPARSE_SIZE = 4 << 30


def build_big(path: str) -> None:
    """Write 1 GiB of incompressible data in 8 files."""
    os.makedirs(path)
    block = os.urandom(8 << 20)
    for i in range(8):
        with open(os.path.join(path, f"big{i}.dat"), "wb") as f:
            for j in range(16):
                f.write(block[j:] + block[:j])  # distinct content per block, no extra RNG cost


def build_small(path: str) -> None:
    """Write 20,000 files of 4 KiB in 20 x 10 nested directories of 100 files."""
    blob = os.urandom(4096 + 20000)
    n = 0
    for a in range(20):
        for b in range(10):
            d = os.path.join(path, f"d{a:02}", f"e{b}")
            os.makedirs(d)
            for _ in range(100):
                with open(os.path.join(d, f"f{n:05}.bin"), "wb") as f:
                    f.write(blob[n : n + 4096])
                n += 1


def build_sparse(path: str) -> None:
    """Write one 4 GiB sparse file whose only data is 4 KiB at 1 GiB."""
    os.makedirs(path)
    with open(os.path.join(path, "sparse.img"), "wb") as f:
        f.truncate(SPARSE_SIZE)
        f.seek(1 << 30)
        f.write(os.urandom(4096))


def tree_digest(root: str) -> dict[str, bytes]:
    """Return {relative path: xxh3-128} of every file under root (the mover's record left out)."""
    out = {}
    for d, dirs, files in os.walk(root):
        if ".iosea-mover" in dirs:
            dirs.remove(".iosea-mover")
        for name in files:
            p = os.path.join(d, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = xxhash.xxh3_128_digest(f.read())
    return out


def timed(cmd: list[str]) -> float:
    """Run cmd after a sync and return its wall time; fail loudly if it fails."""
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return elapsed


def bench_dataset(
    work: str, name: str, src: str, runs: int, settle: float, workers: list[str], verbose: bool = False
) -> dict:
    """Time every tool on one dataset; return {tool: best seconds}, plus two references for a move.

    Each round times the four tools one after the other, starting one tool later every round, so
    that a slow spell of this shared machine does not always hit the same tool.

    Memory: with ``settle == 0`` (dataset a: 8 large files) every timed run starts with the
    outputs of the runs before it deleted (untimed), so each tool writes into the page cache the
    last run freed, the same amount for every tool. Keeping 12 GiB of outputs instead made the
    later runs of a round pay for reclaiming the earlier ones' and for the VM's first touches of
    fresh memory: the same ``cp -a`` took 0.33 s or 3.4 s depending on its place in the sequence.
    With ``settle`` (dataset b: 20,000 files) outputs are kept instead: deleting 20,000 files makes
    the next creations slow for a minute (see ``--settle``), which would hit the next tool.

    "cp -a + sync": after each timed ``cp -a``, the ``sync`` that writes its copy to the disk is
    timed too; the sum is what a copy that is on stable storage when it ends costs, the floor
    under a move that syncs before deleting its sources. "cp -a + sync + rm -rf" adds the time
    ``rm -rf`` takes to delete one more copy of the dataset: a durable move with standard tools.
    """
    tools = ["cp -a", "rsync -a", "mover copy", "mover move"]
    times: dict[str, list[float]] = {tool: [] for tool in [*tools, "cp -a + sync"]}
    expected = tree_digest(src)
    recycle = not settle
    sources = []
    # Move sources are prepared up front, so that no timed run follows a creation (or a
    # creation right after a deletion): every run is preceded by the same steps.
    for r in range(runs):
        sources.append(f"{work}/{name}-msrc{r}")
        subprocess.run(["cp", "-a", src, sources[-1]], check=True)
    outputs: list[str] = []
    moved = False
    for r in range(runs):
        for tool in tools[r % len(tools) :] + tools[: r % len(tools)]:
            if moved and settle:
                time.sleep(settle)  # let the last move's mass deletion age out of the inode allocator
            moved = False
            if recycle:
                for path in outputs:
                    shutil.rmtree(path)
                outputs.clear()
            if tool == "cp -a":
                out = f"{work}/{name}-cp{r}"
                times[tool].append(timed(["cp", "-a", src, out]))
                t0 = time.perf_counter()
                os.sync()
                times["cp -a + sync"].append(times[tool][-1] + time.perf_counter() - t0)
            elif tool == "rsync -a":
                out = f"{work}/{name}-rs{r}"
                times[tool].append(timed(["rsync", "-a", f"{src}/", f"{out}/"]))
            elif tool == "mover copy":
                out = f"{work}/{name}-mc{r}"
                times[tool].append(timed([MOVER, "copy", "--source", src, "--target", out, *workers, "*"]))
                if tree_digest(out) != expected:
                    raise SystemExit(f"bench: mover copy of {name} differs from the source")
            else:
                msrc, out = sources[r], f"{work}/{name}-mm{r}"
                times[tool].append(timed([MOVER, "move", "--source", msrc, "--target", out, *workers, "*"]))
                moved = True
                if os.listdir(msrc) or tree_digest(out) != expected:
                    raise SystemExit(f"bench: mover move of {name} left files behind or differs")
            outputs.append(out)
    # What deleting the sources costs with rm -rf (once, on a copy made for it): with cp -a + sync
    # it makes the reference a durable move can be read against, the standard tools' way of moving.
    if settle:
        # No-op reruns, on the outputs kept: each tool again onto its own copy of the unchanged tree.
        times["mover rerun"], times["rsync -a rerun"] = [], []
        for r in range(runs):
            pair = [("mover rerun", f"{work}/{name}-mc{r}"), ("rsync -a rerun", f"{work}/{name}-rs{r}")]
            for tool, out in pair[r % 2 :] + pair[: r % 2]:
                if tool == "mover rerun":
                    cmd = [MOVER, "copy", "--source", src, "--target", out, *workers, "*"]
                else:
                    cmd = ["rsync", "-a", f"{src}/", f"{out}/"]
                times[tool].append(timed(cmd))
    doomed = f"{work}/{name}-rm"
    subprocess.run(["cp", "-a", src, doomed], check=True)
    t_rm = timed(["rm", "-rf", doomed])
    times["cp -a + sync + rm -rf"] = [t + t_rm for t in times["cp -a + sync"]]
    if verbose:
        for tool, ts in times.items():
            print(f"  ({name}) {tool}: " + " ".join(f"{t:.2f}" for t in ts), flush=True)
    return {tool: min(ts) for tool, ts in times.items()}


def bench_sparse(work: str, src: str, runs: int, workers: list[str], verbose: bool = False) -> dict:
    """Time cp -a and the mover's copy of the sparse dataset; check the copies stay sparse."""
    times: dict[str, list[float]] = {"cp -a": [], "mover copy": []}
    for r in range(runs):
        for tool in list(times) if r % 2 == 0 else list(times)[::-1]:
            out = f"{work}/c-out"
            shutil.rmtree(out, ignore_errors=True)
            if tool == "cp -a":
                times[tool].append(timed(["cp", "-a", src, out]))
            else:
                times[tool].append(timed([MOVER, "copy", "--source", src, "--target", out, *workers, "*"]))
            st = os.stat(f"{out}/sparse.img")
            if st.st_size != SPARSE_SIZE or st.st_blocks * 512 > 1 << 20:
                raise SystemExit(
                    f"bench: {tool} inflated the sparse file ({st.st_blocks * 512} bytes allocated)"
                )
    shutil.rmtree(f"{work}/c-out", ignore_errors=True)
    if verbose:
        for tool, ts in times.items():
            print(f"  (c) {tool}: " + " ".join(f"{t:.2f}" for t in ts), flush=True)
    return {tool: min(ts) for tool, ts in times.items()}


def main() -> int:
    """Build the datasets, time the tools, print ratios to cp -a, remove everything."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="best of N (default 3)")
    ap.add_argument("--settle", type=float, default=65.0, help="seconds to wait after mass deletions")
    ap.add_argument("--workers", help="pass --workers N to the mover (default: its own default)")
    ap.add_argument("--only", choices=["a", "b", "c"], help="run one dataset only")
    ap.add_argument("--mover", help="the iosea-wf-mover to time (default: the one beside this Python)")
    ap.add_argument("--verbose", action="store_true", help="print every timing, not only the best")
    args = ap.parse_args()
    global MOVER
    MOVER = args.mover or MOVER
    byte_compile()  # timed as installed (see bench/installed.py)
    if shutil.which("rsync") is None:
        raise SystemExit("bench: rsync is missing (apt-get install -y rsync)")
    base = "/tmp" if os.stat("/tmp").st_dev == os.stat("/work").st_dev else "/work"
    work = tempfile.mkdtemp(prefix="iosea-mover-bench-", dir=base)
    workers = ["--workers", args.workers] if args.workers else []
    lines = []
    try:
        datasets = [
            ("a", "1 GiB in 8 files", build_big),
            ("b", "20,000 x 4 KiB files", build_small),
            ("c", "a 4 GiB sparse file, 4 KiB of data", build_sparse),
        ]
        for key, label, build in datasets:
            if args.only and args.only != key:
                continue
            src = f"{work}/src-{key}"
            build(src)
            if key == "c":
                best = bench_sparse(work, src, args.runs, workers, args.verbose)
                cp = best["cp -a"]
                ok = best["mover copy"] <= cp + 0.3
                parts = [f"{tool} {t:.2f}s" for tool, t in best.items()]
                line = f"({key}) {label} [best of {args.runs}]: " + " | ".join(parts)
                line += f" | aim mover<=cp -a+0.3s: {'met' if ok else 'MISSED'}"
                print(line, flush=True)
                lines.append(line)
                continue
            settle = args.settle if key == "b" else 0.0
            best = bench_dataset(work, key, src, args.runs, settle, workers, args.verbose)
            cp = best["cp -a"]
            parts = [f"{tool} {t:.2f}s {t / cp:.2f}x" for tool, t in best.items()]
            if key == "a":
                aim = f"aim copy<=1.2x: {'met' if best['mover copy'] <= 1.2 * cp else 'MISSED'}"
            else:
                aim = f"aim copy<rsync: {'met' if best['mover copy'] < best['rsync -a'] else 'MISSED'}"
            aim += f", move<=1.5x: {'met' if best['mover move'] <= 1.5 * cp else 'MISSED'}"
            if "mover rerun" in best:
                ratio = best["mover rerun"] / best["rsync -a rerun"]
                aim += f", rerun<=1.2x rsync rerun ({ratio:.2f}x): {'met' if ratio <= 1.2 else 'MISSED'}"
            line = f"({key}) {label} [best of {args.runs}]: " + " | ".join(parts) + f" | {aim}"
            print(line, flush=True)
            lines.append(line)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
