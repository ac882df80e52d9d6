"""Time WDF validation against loading the same file with the same YAML parser (best of 7).

Builds a WDF of 500 steps, 200 services and their data movers in a temporary directory, loads the
local site once (not timed), then prints how long ``load_wdf`` (read, parse, check everything)
takes against ``yaml.load`` of the same text with the parser the loader uses (libyaml's
``CSafeLoader`` when PyYAML has it), and, for reference, with PyYAML's pure-Python ``SafeLoader``.
The ratio that matters is against the same parser: it is the cost of validation itself.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import yaml

from iosea_wf.site import LOCAL_SITE, load_site
from iosea_wf.wdf import load_wdf
from iosea_wf.wdf.loader import MarkedLoader

# The parser class iosea_wf's loader is built on (CSafeLoader when libyaml is there).
_SAME_PARSER = MarkedLoader.__mro__[1]

STEPS = 500
SERVICES = 200
ROUNDS = 7


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


def best_of(rounds: int, *actions) -> list[float]:
    """The shortest wall time of each action over ``rounds`` rounds.

    The actions take turns within each round, so a burst of load on the machine (other jobs)
    slows all of them alike instead of one figure only.
    """
    times: list[list[float]] = [[] for _ in actions]
    for _ in range(rounds):
        for action, spent in zip(actions, times, strict=True):
            start = time.perf_counter()
            action()
            spent.append(time.perf_counter() - start)
    return [min(t) for t in times]


def main() -> None:
    """Build the WDF, time both loads and report them."""
    site = load_site(LOCAL_SITE)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench-wdf.yaml"
        text = build_wdf()
        path.write_text(text, encoding="utf-8")
        variables = {"SESSION": "bench", "USER": "bencher", "WORKFLOW": str(path)}
        workflow = load_wdf(path, variables, site)
        if len(workflow.steps) != STEPS or len(workflow.services) != SERVICES:
            raise RuntimeError("the benchmark WDF did not load whole")
        validate, same, pure = best_of(
            ROUNDS,
            lambda: load_wdf(path, variables, site),
            lambda: yaml.load(path.read_text(encoding="utf-8"), Loader=_SAME_PARSER),
            lambda: yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader),
        )
    print(
        f"WDF: {STEPS} steps, {SERVICES} services, {2 * SERVICES} data movers ({len(text) // 1024} KiB)\n"
        f"validate: {validate:.3f} s\n"
        f"load with the same parser ({_SAME_PARSER.__name__}): {same:.3f} s  ratio: {validate / same:.1f}x\n"
        f"load with pure-Python SafeLoader: {pure:.3f} s  ratio: {validate / pure:.1f}x"
    )


if __name__ == "__main__":
    main()
