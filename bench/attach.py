"""Throughput of a step's I/O through the `nfs` attach method, against `bind` and a local copy.

One Slurm job per method (`srun` as a fresh unprivileged user, on the cpu partition), each running
the same workload, in the same run:
- local: on a plain directory of the user's (no attach at all);
- bind:  through ``iosea_wf.attach --bind`` (the namespace bound at the mountpoint);
- nfs:   through ``iosea_wf.attach --nfs`` (the user's FUSE client of the ephemeral NFS export,
         so every byte goes through nfs-ganesha on the datanode).
The workload writes one large file in 1 MiB writes (then fsync), reads it back, then writes and
reads many 4 KiB files (one open/write/close each). Sizes: BENCH_LARGE_MB (256), BENCH_SMALL (1000).
Prints MB/s and files/s per method and the ratios nfs/bind and nfs/local. Needs the local site
(`make site`: fuse3 and /dev/fuse open to users come from the slurm role) and root (useradd).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from installed import byte_compile, inprocess_site  # bench/installed.py, beside this script

BLOCK = 1 << 20
SMALL = 4096
LARGE_MB = int(os.environ.get("BENCH_LARGE_MB", "256"))
SMALL_COUNT = int(os.environ.get("BENCH_SMALL", "1000"))
METHODS = ("local", "bind", "nfs")
ROWS = (
    ("large_write_mb_s", "large file write (MB/s)"),
    ("large_read_mb_s", "large file read (MB/s)"),
    ("small_write_files_s", f"small files write ({SMALL // 1024} KiB, files/s)"),
    ("small_read_files_s", "small files read (files/s)"),
)


def workload(where: str, large_mb: int, small_count: int) -> dict[str, float]:
    """The step's I/O in ``where``: four timed phases; what it made is removed afterwards."""
    block = os.urandom(BLOCK)
    large = os.path.join(where, "large.bin")
    rates = {}
    t0 = time.perf_counter()
    with open(large, "wb", buffering=0) as fh:
        for _ in range(large_mb):
            fh.write(block)
        os.fsync(fh.fileno())
    rates["large_write_mb_s"] = large_mb * BLOCK / 1e6 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    got = 0
    with open(large, "rb", buffering=0) as fh:
        while chunk := fh.read(BLOCK):
            got += len(chunk)
    rates["large_read_mb_s"] = got / 1e6 / (time.perf_counter() - t0)
    if got != large_mb * BLOCK:
        raise RuntimeError(f"read {got} bytes of {large_mb * BLOCK}")
    small_dir = os.path.join(where, "small")
    os.mkdir(small_dir)
    payload = block[:SMALL]
    t0 = time.perf_counter()
    for i in range(small_count):
        with open(os.path.join(small_dir, f"f{i:06d}"), "wb", buffering=0) as fh:
            fh.write(payload)
    rates["small_write_files_s"] = small_count / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(small_count):
        with open(os.path.join(small_dir, f"f{i:06d}"), "rb", buffering=0) as fh:
            if len(fh.read()) != SMALL:
                raise RuntimeError("short read of a small file")
    rates["small_read_files_s"] = small_count / (time.perf_counter() - t0)
    os.unlink(large)
    shutil.rmtree(small_dir)
    return rates


def _sh(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=600, **kw)


def main() -> None:
    """Start a session for a fresh user, run the workload once per method, print the table."""
    if len(sys.argv) > 1 and sys.argv[1] == "--workload":
        print(json.dumps(workload(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
        return
    byte_compile()  # timed as installed (see bench/installed.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from iosea_wf import jobs, manager
    from tests.packaging import editable_user_venv
    from tests.unix_users import fresh_uid

    venv = editable_user_venv()
    name = f"iwfb-{uuid.uuid4().hex[:6]}"
    _sh(["useradd", "-m", "-u", fresh_uid(), "-s", "/bin/bash", name])
    user = pwd.getpwnam(name)
    home = Path(user.pw_dir)
    base = Path(tempfile.mkdtemp(prefix="iosea-bench-attach-", dir="/var/tmp"))
    base.chmod(0o755)
    ctx = session = None
    try:
        ns, local, state, mnt = home / "ns", home / "local", home / "state", home / "mnt"
        for d in (ns, local, state, mnt):
            d.mkdir(mode=0o700)
        wdf = home / "wf.yaml"
        wdf.write_text(
            "workflow:\n  name: benchattach\nservices:\n  - name: data\n    type: NFS\n"
            f"    attributes: {{namespace: {ns}, mountpoint: {mnt}}}\n"
            'steps:\n  - name: io\n    command: "sbatch job.sh"\n    services:\n      - name: data RW\n'
        )
        _sh(["chown", "-R", f"{name}:", str(home)])
        os.environ["IOSEA_WF_SITE"] = str(inprocess_site(base / "site"))
        token = _sh(["runuser", "-u", name, "--", "scontrol", "token", "lifespan=900"], cwd="/").stdout
        ctx = manager.Context(state_dir=str(state), user=name, slurm_jwt=token.strip().split("=", 1)[1])
        session = "benchattach"
        record = manager.start(ctx, str(wdf), session, {}, wait_resources=600)
        attached = [dict(s, mode="RW") for s in record["services"]]
        me = [str(venv / "python"), __file__, "--workload"]
        results = {}
        for method in METHODS:
            target = str(local if method == "local" else mnt)
            command = [*me, target, str(LARGE_MB), str(SMALL_COUNT)]
            if method != "local":
                # The step job's own command line, with the user's Python (jobs.attach_command).
                command = jobs.attach_command(attached, method, command)
                command[0] = str(venv / "python")
            srun = ["srun", "--immediate=60", "-p", "cpu", "-N1", "-n1", "--mem=500", "-t", "10", *command]
            out = _sh(["runuser", "-u", name, "--", *srun], cwd=str(home))
            results[method] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"Step I/O by attach method (large file {LARGE_MB} MiB, {SMALL_COUNT} small files)")
        print(f"{'':34}{'local':>10}{'bind':>10}{'nfs':>10}{'nfs/bind':>10}{'nfs/local':>10}")
        for key, label in ROWS:
            row = [results[m][key] for m in METHODS]
            ratios = f"{row[2] / row[1]:10.3f}{row[2] / row[0]:10.3f}"
            print(f"{label:34}" + "".join(f"{v:10.1f}" for v in row) + ratios)
    finally:
        if ctx is not None and session is not None:
            manager.stop(ctx, session, force=True)
        subprocess.run(["pkill", "-u", name], check=False)
        time.sleep(0.5)
        subprocess.run(["userdel", "-r", name], check=False, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
