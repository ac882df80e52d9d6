"""Time `iosea-wf start` + `stop` of a session with 1 and with 4 NFS services on the local site.

Like is compared with like: every figure is taken twice, cold (``IOSEA_WF_WARM_ANSIBLE=0``: each
playbook run starts a fresh ansible-playbook) and warm (the warm ansible-playbook server of
iosea_wf/warm_playbook.py, started by an untimed first run). A bare one-task ansible-runner run
is timed the same two ways (cold: ansible-playbook; warm: iosea-wf-ansible-playbook as its binary),
so "start costs X over a bare run" compares the same Ansible start-up. Prints the ratio 4/1
(services start in parallel: aim under 1.5). Needs the local site (`make site`).
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
from installed import byte_compile, inprocess_site  # bench/installed.py, beside this script

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


def bare_runner(tmp: Path, env: dict[str, str], warm: bool) -> float:
    """One one-task playbook through ansible-runner, run the way the orchestrator runs them."""
    project = tmp / "project"
    project.mkdir(exist_ok=True)
    (project / "one.yml").write_text(
        "- hosts: localhost\n  gather_facts: false\n  tasks:\n    - ansible.builtin.debug: {msg: hi}\n"
    )
    private = Path(tempfile.mkdtemp(dir=tmp, prefix="bare-"))
    t0 = time.perf_counter()
    r = ansible_runner.run(
        private_data_dir=str(private),
        project_dir=str(project),
        playbook="one.yml",
        binary=str(BIN / "iosea-wf-ansible-playbook") if warm else None,
        cmdline="one.yml" if warm else None,
        inventory="localhost,",
        quiet=True,
        envvars={"PATH": env["PATH"], "IOSEA_WF_WARM_ANSIBLE": env["IOSEA_WF_WARM_ANSIBLE"]},
    )
    assert r.status == "successful", r.status
    return time.perf_counter() - t0


def start_stop(tmp: Path, env: dict[str, str], count: int, tag: str) -> tuple[float, float]:
    """(start, stop) wall times of one session of ``count`` services."""
    f = wdf(tmp / f"wf-{tag}.yaml", count, tag)
    for i in range(count):
        (tmp / f"ns-{tag}-{i}").mkdir()
    t_start = timed([str(BIN / "iosea-wf"), "start", f"WORKFLOW={f}", f"SESSION=b{tag}"], env)
    t_stop = timed([str(BIN / "iosea-wf"), "stop", f"SESSION=b{tag}"], env)
    return t_start, t_stop


def measure(tmp: Path, mode: str) -> None:
    """Time sessions and the bare run in one mode (cold or warm) and print them."""
    env = dict(
        os.environ,
        IOSEA_WF_HOME=str(tmp / f"state-{mode}"),
        IOSEA_WF_SITE=str(inprocess_site(tmp / f"site-{mode}")),
        PATH=f"{BIN}:{os.environ['PATH']}",
        IOSEA_WF_WARM_ANSIBLE="0" if mode == "cold" else "120",
    )
    warm = mode == "warm"
    if warm:  # untimed: starts the warm servers the timed runs then use
        start_stop(tmp, env, 1, "warmup")
        bare_runner(tmp, env, warm)
    results: dict[int, list[tuple[float, float]]] = {1: [], 4: []}
    for r in range(ROUNDS):
        for count in (1, 4):
            results[count].append(start_stop(tmp, env, count, f"{mode}{count}-{r}"))
    bare = statistics.median(bare_runner(tmp, env, warm) for _ in range(ROUNDS))
    med = {
        c: (statistics.median(s for s, _ in v), statistics.median(t for _, t in v))
        for c, v in results.items()
    }
    print(f"== {mode} ansible-playbook (median of {ROUNDS})")
    for c in (1, 4):
        print(f"{c} service(s): start {med[c][0]:.2f} s  stop {med[c][1]:.2f} s  total {sum(med[c]):.2f} s")
    print(f"ratio 4/1 (start+stop): {sum(med[4]) / sum(med[1]):.2f}x   (aim < 1.5)")
    print(f"ratio 4/1 (start only): {med[4][0] / med[1][0]:.2f}x")
    print(
        f"bare one-task ansible-runner run ({mode}): {bare:.2f} s; "
        f"start of 1 service costs {med[1][0] - bare:+.2f} s over it ({med[1][0] / bare:.1f}x)"
    )


def main() -> None:
    """Cold figures, then warm ones."""
    byte_compile()  # timed as installed (see bench/installed.py)
    with tempfile.TemporaryDirectory(prefix="iosea-bench-") as d:
        for mode in ("cold", "warm"):
            measure(Path(d), mode)


if __name__ == "__main__":
    main()
