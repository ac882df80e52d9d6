"""`iosea-wf site check` against `ansible -i INVENTORY all -m ping` over the same hosts, in one run.

    python bench/site_check.py [INVENTORY]        (default: inventories/local)

Both are run as processes, alternately, BENCH_ROUNDS times (default 5) after one untimed round
each, and the medians printed with their ratio. `ansible ... -m ping` only proves that Ansible
reaches every host and runs a Python module there; the site check also checks munge, the clocks,
Slurm, ganesha, the tiers and the Workflow Manager. A failing check does not stop the benchmark
(its time counts the same); a failing ping does. Run it as root (the checks read the munge key).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from installed import byte_compile  # noqa: E402  bench/installed.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))


def timed(argv: list[str], env: dict[str, str], ok: tuple[int, ...]) -> tuple[float, int]:
    """(seconds, exit code) of one command, whose exit code must be one of ``ok``."""
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    if done.returncode not in ok:
        raise SystemExit(
            f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return seconds, done.returncode


def main() -> None:
    """Print both medians and their ratio."""
    inventory = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "inventories" / "local").resolve()
    byte_compile()
    env = {k: v for k, v in os.environ.items() if k not in ("IOSEA_WF_SITE", "IOSEA_WF_URL", "IOSEA_WF_HOME")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    check = [str(BIN / "iosea-wf"), "--site", str(inventory), "site", "check"]
    ping = [str(BIN / "ansible"), "-i", str(inventory), "all", "-m", "ansible.builtin.ping"]
    times: dict[str, list[float]] = {"check": [], "ping": []}
    codes = set()
    for round_ in range(ROUNDS + 1):
        seconds, code = timed(check, env, ok=(0, 13))
        codes.add(code)
        ping_seconds, _ = timed(ping, env, ok=(0,))
        if round_:  # the first round warms caches and the byte code
            times["check"].append(seconds)
            times["ping"].append(ping_seconds)
    report = json.loads(subprocess.run([*check, "--json"], env=env, capture_output=True, text=True).stdout)
    check_s, ping_s = statistics.median(times["check"]), statistics.median(times["ping"])
    print(f"inventory {inventory} (medians of {ROUNDS} rounds)")
    print(f"iosea-wf site check        {check_s:6.2f} s   (exit {', '.join(map(str, sorted(codes)))})")
    print(f"ansible all -m ping        {ping_s:6.2f} s")
    print(f"site check / ansible ping  {check_s / ping_s:6.2f}x")
    print(f"{len(report['hosts'])} hosts, {len(report['checks'])} checks, {report['failed']} failed")


if __name__ == "__main__":
    main()
