"""Time WDF validation against a plain ``yaml.safe_load`` of the same file (best of 5).

Builds a WDF of 500 steps, 200 services and their data movers in a temporary directory, loads the
local site once (not timed), then prints ``validate: ... yaml.safe_load: ... ratio: ...x``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import yaml

from iosea_wf.site import load_site
from iosea_wf.wdf import load_wdf

STEPS = 500
SERVICES = 200
ROUNDS = 5


def build_wdf(steps: int = STEPS, services: int = SERVICES) -> str:
    """The text of a large valid WDF: every service has two data movers, every step uses two services."""
    lines = ["workflow:", "  name: bench_workflow", "", "services:"]
    for i in range(services):
        lines += [
            f"  - name: service_{i}",
            "    type: NFS",
            "    attributes:",
            f'      namespace: "/datasets/{{{{ USER }}}}/ns_{i}"',
            f'      mountpoint: "/mnt/{{{{ USER }}}}/{{{{ SESSION }}}}/service_{i}"',
            f"      flavor: {('small', 'medium', 'high')[i % 3]}",
            f"      storagesize: {1 + i % 4}Gi",
        ]
    lines.append("datamovers:")
    for i in range(services):
        for trigger, target, operation in (("step_start", "flash", "copy"), ("step_stop", "tape", "move")):
            lines += [
                f"  - name: mover_{trigger}_{i}",
                f"    trigger: {trigger}",
                f"    target: {target}",
                f"    operation: {operation}",
                "    elements:",
                f'      - "input_{i}/*.h5"',
                '      - "results/**"',
            ]
    lines.append("steps:")
    for i in range(steps):
        first, second = i % services, (i + 1) % services
        lines += [
            f"  - name: step_{i}",
            f"    location: [{('cpu_module', 'gpu_module')[i % 2]}]",
            f'    command: "sbatch --comment=step_{i} step_{i}.sh {{{{ WORKFLOW }}}}"',
            "    services:",
            f"      - name: service_{first} RO",
            f"      - name: service_{second} RW",
            "        datamovers:",
            f"          - mover_step_start_{second}",
            f"          - mover_step_stop_{second}",
        ]
    return "\n".join(lines) + "\n"


def best_of(rounds: int, action) -> float:
    """The shortest wall time of ``rounds`` runs of ``action``."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    """Build the WDF, time both loads and report them."""
    site = load_site("inventories/local")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench-wdf.yaml"
        text = build_wdf()
        path.write_text(text, encoding="utf-8")
        variables = {"SESSION": "bench", "USER": "bencher", "WORKFLOW": str(path)}
        workflow = load_wdf(path, variables, site)
        if len(workflow.steps) != STEPS or len(workflow.services) != SERVICES:
            raise RuntimeError("the benchmark WDF did not load whole")
        validate = best_of(ROUNDS, lambda: load_wdf(path, variables, site))
        safe_load = best_of(ROUNDS, lambda: yaml.safe_load(path.read_text(encoding="utf-8")))
    print(
        f"WDF: {STEPS} steps, {SERVICES} services, {2 * SERVICES} data movers ({len(text) // 1024} KiB)\n"
        f"validate: {validate:.3f} s  yaml.safe_load: {safe_load:.3f} s  ratio: {validate / safe_load:.1f}x"
    )


if __name__ == "__main__":
    main()
