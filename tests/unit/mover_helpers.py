"""Helpers for the data-mover tests: build real trees, run the real console script, compare trees."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import xxhash

MOVER = os.path.join(os.path.dirname(sys.executable), "iosea-wf-mover")
TEMP_MARK = ".iosea-tmp-"


def run_mover(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the installed ``iosea-wf-mover`` console script and capture its output."""
    return subprocess.run([MOVER, *args], capture_output=True, text=True, timeout=timeout)


def write(path: str, data: bytes, mode: int | None = None, mtime: int | None = None) -> None:
    """Create ``path`` (and its parents) holding ``data``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    if mode is not None:
        os.chmod(path, mode)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def make_tree(root: str, n_small: int = 200, big_sizes: tuple[int, ...] = (), seed: int = 1) -> None:
    """Build nested dirs of small files of varied sizes, plus big files, under ``root``."""
    rng = random.Random(seed)
    blob = rng.randbytes(70_000)
    for i in range(n_small):
        size = rng.choice([0, 1, 100, 4096, 10_000, 65_536])
        rel = f"data/d{i % 5}/e{i % 3}/f{i:04}.bin" if i % 4 else f"top{i:04}.txt"
        write(os.path.join(root, rel), blob[i : i + size], mtime=1_600_000_000 + i)
    for j, size in enumerate(big_sizes):
        write(os.path.join(root, f"data/big{j}.dat"), rng.randbytes(size), mtime=1_600_000_000)


def digests(root: str) -> dict[str, object]:
    """Return {rel: xxh3-128 digest or ('link', text)} for every file and symlink under ``root``."""
    out: dict[str, object] = {}
    for d, dirs, files in os.walk(root):
        if ".iosea-mover" in dirs:
            dirs.remove(".iosea-mover")  # the mover's own: its record stays after a copy
        for name in files + [x for x in dirs if os.path.islink(os.path.join(d, x))]:
            p = os.path.join(d, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            else:
                with open(p, "rb") as f:
                    out[rel] = xxhash.xxh3_128_digest(f.read())
    return out


def leftovers(root: str) -> list[str]:
    """Return every mover temp file or journal (not the record a copy leaves) under ``root``."""
    found = []
    for d, _dirs, files in os.walk(root):
        found += [os.path.join(d, n) for n in files if TEMP_MARK in n]
        if os.path.basename(d) == ".iosea-mover":
            found += [os.path.join(d, n) for n in files if n != "record.jsonl"]
    return found


def read_progress(path: str) -> dict:
    """Return the progress JSON document at ``path``."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)
