"""Time `iosea-wf start` + `stop` of a session with 1 and with 4 NFS services on the local site.

Prints the ratio 4/1 (services start in parallel: aim under 1.5) and the overhead of a start over
a bare one-task ansible-runner run measured in the same run. Needs the local site (`make site`).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ansible_runner
from installed import byte_compile  # bench/installed.py, beside this script

BIN = Path(sys.executable).parent
ROUNDS = 3


def wdf(path: Path, count: int, tag: str) -> Path:
    lines = [f"workflow:\n  name: bench_{tag}\nservices:"]
    for i in range(count):
        lines.append(
            f"  - name: es{i}\n    type: NFS\n    attributes:\n      namespace: {path.parent}/ns-{tag}-{i}\n"
            f"      mountpoint: /mnt/bench/{{{{ SESSION }}}}/es{i}"
        )
    lines.append('steps:\n  - name: s\n    command: "sbatch x.sh"\n    services:')
    lines += [f"      - name: es{i} RW" for i in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return path


def timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(argv)} failed: {proc.stderr}")
    return time.perf_counter() - t0


def bare_runner(tmp: Path) -> float:
    project = tmp / "project"
    project.mkdir(exist_ok=True)
    (project / "one.yml").write_text(
        "- hosts: localhost\n  gather_facts: false\n  tasks:\n    - ansible.builtin.debug: {msg: hi}\n"
    )
    (tmp / "bare").mkdir(exist_ok=True)
    t0 = time.perf_counter()
    r = ansible_runner.run(
        private_data_dir=str(tmp / "bare"),
        project_dir=str(project),
        playbook="one.yml",
        inventory="localhost,",
        quiet=True,
        envvars={"PATH": f"{BIN}:{os.environ['PATH']}"},
    )
    assert r.status == "successful", r.status
    return time.perf_counter() - t0


def main() -> None:
    byte_compile()  # timed as installed (see bench/installed.py)
    with tempfile.TemporaryDirectory(prefix="iosea-bench-") as d:
        tmp = Path(d)
        env = dict(os.environ, IOSEA_WF_HOME=str(tmp / "state"), PATH=f"{BIN}:{os.environ['PATH']}")
        results: dict[int, list[tuple[float, float]]] = {1: [], 4: []}
        for r in range(ROUNDS):
            for count in (1, 4):
                f = wdf(tmp / f"wf{count}-{r}.yaml", count, f"{count}-{r}")
                t_start = timed(
                    [str(BIN / "iosea-wf"), "start", f"WORKFLOW={f}", f"SESSION=b{count}-{r}"], env
                )
                t_stop = timed([str(BIN / "iosea-wf"), "stop", f"SESSION=b{count}-{r}"], env)
                results[count].append((t_start, t_stop))
        bare = statistics.median(bare_runner(tmp) for _ in range(ROUNDS))
    med = {
        c: (statistics.median(s for s, _ in v), statistics.median(t for _, t in v))
        for c, v in results.items()
    }
    for c in (1, 4):
        print(f"{c} service(s): start {med[c][0]:.2f} s  stop {med[c][1]:.2f} s  total {sum(med[c]):.2f} s")
    print(f"ratio 4/1 (start+stop): {sum(med[4]) / sum(med[1]):.2f}x   (aim < 1.5)")
    print(f"ratio 4/1 (start only): {med[4][0] / med[1][0]:.2f}x")
    print(
        f"bare one-task ansible-runner run: {bare:.2f} s; "
        f"start of 1 service costs {med[1][0] - bare:+.2f} s over it"
        f" ({med[1][0] / bare:.1f}x)"
    )


if __name__ == "__main__":
    main()
