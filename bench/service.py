"""The CLI through the Workflow Manager service against the in-process CLI, in the same run.

Prints medians of: `run` submission (no --wait) against a plain `sbatch` of the same job,
`status` on a store holding 1,000 sessions, and `start` + `stop` of a one-service workflow.
Both ways use the same site and the same kind of store; the service listens on a private Unix
socket with a private store, the in-process CLI uses another private store, so each side is warm
the same way (an untimed first round). Aims (issue 13): run < 0.2 s, status < 0.1 s, start < 1.2 s.
Needs the local site (`make site`) and runs as root (the service submits only for its own user
until jobs are submitted on the caller's behalf).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from api_service import running_service  # noqa: E402  (tests/api_service.py)
from installed import byte_compile, inprocess_site  # noqa: E402  bench/installed.py, beside this script

from iosea_wf import slurm  # noqa: E402
from iosea_wf import store as st  # noqa: E402

BIN = Path(sys.executable).parent
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
SESSIONS = 1000

WDF = """\
workflow:
  name: bench_service
services:
  - name: es
    type: NFS
    attributes:
      namespace: {ns}
      mountpoint: /mnt/bench/{{{{ SESSION }}}}/es
steps:
  - name: s
    location: cpu_module
    command: "sbatch job.sh"
    services:
      - name: es RW
"""


def timed(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    """Seconds one command took; it must succeed."""
    if os.environ.get("BENCH_VERBOSE"):
        print(
            "..",
            " ".join(argv[1:]),
            "via",
            env.get("IOSEA_WF_URL", "in-process"),
            file=sys.stderr,
            flush=True,
        )
    t0 = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if done.returncode != 0:
        where = env.get("IOSEA_WF_URL", "in-process")
        raise SystemExit(f"[{where}] {' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return took


def wait_for_steps(cli: str, env: dict[str, str], cwd: Path, session: str, timeout: float = 300) -> None:
    """Wait (untimed) until every step job of ``session`` has ended and ``status`` has recorded it.

    Otherwise `status` would time, now and then, the one write that records a job's end (the
    whole store rewritten), and a service's cache being refilled after it, not a status.
    """
    final = slurm.TERMINAL_STATES | {"SKIPPED", "NOT_SUBMITTED"}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = subprocess.run(
            [cli, "status", f"SESSION={session}", "--json"], env=env, cwd=cwd, capture_output=True, text=True
        )
        view = json.loads(done.stdout)
        if all(i["state"] in final for i in view["steps"]):
            return
        time.sleep(1)
    raise SystemExit(f"the step jobs of {session} did not end in {timeout:.0f} s")


def fill_store(state: Path, owner: str, count: int) -> None:
    """Add ``count`` STOPPED sessions of ``owner`` to the store in ``state`` (one transaction)."""
    store = st.Store(state)
    with store.transaction() as tx:
        template = dict(next(s for s in tx.sessions.all() if s["owner"] == owner))
        records = []
        for i in range(count):
            record = copy.deepcopy(template)
            record.update(
                id=uuid.uuid4().hex, name=f"old-{i}", state=st.STOPPED, steps=[], resources_left=False
            )
            record["schema_version"] = st.SCHEMA_VERSION
            records.append(record)
        # One write: TinyDB rewrites the whole file on every insert.
        tx.sessions.insert_multiple(records)


def main() -> None:
    byte_compile()
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="bench-service-", dir="/tmp") as tmp:
        tmp = Path(tmp)
        work = tmp / "work"
        work.mkdir()
        # One namespace serves one live session: `live` keeps its own, the timed sessions share one.
        for name in ("live", "wf"):
            (tmp / f"ns-{name}").mkdir()
            (work / f"{name}.yaml").write_text(WDF.format(ns=tmp / f"ns-{name}"))
        (work / "job.sh").write_text("#!/bin/bash\ntrue\n")
        base = {k: v for k, v in os.environ.items() if k not in ("IOSEA_WF_URL", "IOSEA_WF_HOME")}
        base["PATH"] = f"{BIN}{os.pathsep}{base.get('PATH', '')}"
        # Both sides on one site: the local one minus the file naming the site's own service.
        site = inprocess_site(tmp / "site")
        base["IOSEA_WF_SITE"] = str(site)
        sock, served = tmp / "wm.sock", tmp / "served"
        local = {**base, "IOSEA_WF_HOME": str(tmp / "local")}
        remote = {**base, "IOSEA_WF_URL": f"unix://{sock}"}
        cli = str(BIN / "iosea-wf")
        figures: dict[str, dict[str, list[float]]] = {}

        def add(what: str, how: str, seconds: float) -> None:
            figures.setdefault(what, {}).setdefault(how, []).append(seconds)

        with running_service(sock, served, "--site", str(site)):
            sides = {"service": remote, "in-process": local}
            # One live session each, for run and status; an untimed round warms both sides.
            for env in sides.values():
                timed([cli, "start", "WORKFLOW=live.yaml", "SESSION=live"], env, work)
                timed([cli, "run", "SESSION=live", "STEP=s"], env, work)
            for r in range(ROUNDS):
                for how, env in sides.items():
                    add("run submission", how, timed([cli, "run", "SESSION=live", "STEP=s"], env, work))
                    start = [cli, "start", "WORKFLOW=wf.yaml", f"SESSION=b{r}"]
                    add("start (1 service)", how, timed(start, env, work))
                    add("stop (1 service)", how, timed([cli, "stop", f"SESSION=b{r}"], env, work))
                sbatch = ["sbatch", "--parsable", "-p", "cpu", "job.sh"]
                add("run submission", "sbatch", timed(sbatch, base, work))
            # Status last: a store of 1,000 full records makes every write of the rounds above slow
            # (TinyDB rewrites the whole file), which is not what they measure.
            for env in sides.values():
                wait_for_steps(cli, env, work, "live")
            fill_store(served, user, SESSIONS)
            fill_store(tmp / "local", user, SESSIONS)
            status = [cli, "status", "SESSION=live"]
            for env in sides.values():  # untimed, as for the other figures
                timed(status, env, work)
            for _ in range(ROUNDS):
                for how, env in sides.items():
                    add(f"status ({SESSIONS} sessions)", how, timed(status, env, work))
            for env in sides.values():
                timed([cli, "stop", "SESSION=live", "--force"], env, work)

    print(f"medians of {ROUNDS} rounds (seconds; ratio service / in-process)")
    for what, by in figures.items():
        med = {how: statistics.median(v) for how, v in by.items()}
        extra = f"  sbatch {med['sbatch']:.3f}" if "sbatch" in med else ""
        ratio = med["service"] / med["in-process"]
        both = f"service {med['service']:.3f}  in-process {med['in-process']:.3f}"
        print(f"  {what:<24} {both}  {ratio:.2f}x{extra}")


if __name__ == "__main__":
    main()
