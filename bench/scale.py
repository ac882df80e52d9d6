"""Scale: many users, sessions and runs through one Workflow Manager service, in the same run.

Real users (useradd, removed afterwards) start SCALE_SESSIONS sessions in all (one small NFS
service each) through a private `iosea-wf serve` of this checkout (own socket, own store), then
submit SCALE_RUNS step runs (each a chain: a step_start data mover, then the step) with
SCALE_CONCURRENCY commands in flight. Prints:

- chains submitted per second through the service against plain `sbatch` chains of the same
  shape (mover job, then the step job `afterok` on it), submitted by the same users with the same
  concurrency;
- `status` p50/p99 during that load (the CLI as a user, and the request alone from a warm client);
- with SCALE_RECORDED sessions recorded in all (live and archived, spread over a year, the
  site's iosea_store_keep_days deciding which are archived): `status` of a live and of an
  archived session, `list --all`, and one store write (aims: status < 0.1 s, write < 20 ms).

Sizes (env): SCALE_USERS (20), SCALE_SESSIONS (30), SCALE_RUNS (300), SCALE_CONCURRENCY (4),
SCALE_RECORDED (10000), SCALE_SAMPLES (30, timed repetitions of each quiet figure),
SCALE_DRAIN_S (900, how long to wait for the jobs to end). E.g. a small run:
`SCALE_USERS=2 SCALE_SESSIONS=2 SCALE_RUNS=10 SCALE_RECORDED=1000 python bench/scale.py`.
Needs the local site (`make site`) and root.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import pwd
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from iosea_wf import slurm  # noqa: E402
from iosea_wf import store as st  # noqa: E402
from tests.api_service import need_munge, running_service  # noqa: E402
from tests.packaging import editable_user_venv  # noqa: E402
from tests.unix_users import fresh_uid  # noqa: E402

USERS = int(os.environ.get("SCALE_USERS", "20"))
SESSIONS = int(os.environ.get("SCALE_SESSIONS", "30"))
RUNS = int(os.environ.get("SCALE_RUNS", "300"))
CONCURRENCY = int(os.environ.get("SCALE_CONCURRENCY", "4"))
RECORDED = int(os.environ.get("SCALE_RECORDED", "10000"))
SAMPLES = int(os.environ.get("SCALE_SAMPLES", "30"))
DRAIN_S = float(os.environ.get("SCALE_DRAIN_S", "900"))
TIERS = "/var/lib/iosea-wf/local/tiers"
DAY = 86400.0

WDF = """\
workflow:
  name: bench_scale
services:
  - name: es
    type: NFS
    attributes:
      namespace: "{{ NS }}"
      mountpoint: /mnt/bench-scale/{{ SESSION }}/es
      flavor: small
datamovers:
  - name: dm
    trigger: step_start
    target: flash
    operation: copy
    elements: ["in/*"]
steps:
  - name: s
    location: cpu_module
    command: "sbatch job.sh"
    services:
      - name: es RW
        datamovers: [dm]
"""
JOB = "#!/bin/sh\n#SBATCH -o /dev/null\ntrue\n"

# Times a warm client's `status` requests, run as a user: one JSON list of seconds on stdout.
REQUEST_TIMER = """
import json, sys, time
from iosea_wf.api import client
ctx = client.ServiceContext(sys.argv[1])
client.status(ctx, sys.argv[2])
took = []
for _ in range(int(sys.argv[3])):
    t0 = time.perf_counter()
    client.status(ctx, sys.argv[2])
    took.append(time.perf_counter() - t0)
print(json.dumps(took))
"""


class Bench:
    """The users, the service and the commands they run."""

    def __init__(self, bin_dir: Path, url: str, state: Path):
        self.bin_dir, self.url, self.state = bin_dir, url, state
        self.users: list[pwd.struct_passwd] = []
        self.sessions: list[tuple[pwd.struct_passwd, str]] = []

    def argv(self, user: pwd.struct_passwd, *argv: str, tool: str = "iosea-wf") -> list[str]:
        env = {
            "PATH": f"{self.bin_dir}:/usr/bin:/bin",
            "HOME": user.pw_dir,
            "IOSEA_WF_URL": self.url,
            "LANG": "C.UTF-8",
        }
        return ["runuser", "-u", user.pw_name, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()),
                str(self.bin_dir / tool) if tool else argv[0], *(argv if tool else argv[1:])]  # fmt: skip

    def run(self, user, *argv, check=True, timeout=600, tool="iosea-wf") -> tuple[float, str]:
        """(seconds, stdout) of one command as ``user`` in their home."""
        t0 = time.perf_counter()
        done = subprocess.run(
            self.argv(user, *argv, tool=tool),
            cwd=user.pw_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        took = time.perf_counter() - t0
        if check and done.returncode != 0:
            what = " ".join(argv)
            raise SystemExit(f"{user.pw_name}: {what} failed ({done.returncode}): {done.stderr.strip()}")
        return took, done.stdout

    # --- setup and teardown -----------------------------------------------------------------

    def add_users(self, count: int) -> None:
        tag = secrets.token_hex(2)
        for i in range(count):
            name = f"iwf-scale{i:02d}-{tag}"
            subprocess.run(
                ["useradd", "-m", "-u", fresh_uid(), "-s", "/bin/sh", name], check=True, capture_output=True
            )
            user = pwd.getpwnam(name)
            self.users.append(user)
            home = Path(user.pw_dir)
            (home / "wdf.yaml").write_text(WDF)
            (home / "job.sh").write_text(JOB)
            for path in (home / "wdf.yaml", home / "job.sh"):
                os.chown(path, user.pw_uid, user.pw_gid)

    def remove_users(self) -> None:
        for user in self.users:
            subprocess.run(["scancel", "-u", user.pw_name], check=False, capture_output=True)
        for user in self.users:
            for tier in glob.glob(f"{TIERS}/*"):
                shutil.rmtree(os.path.join(tier, user.pw_name), ignore_errors=True)
            subprocess.run(["userdel", "-r", user.pw_name], check=False, capture_output=True)

    def start_sessions(self, count: int) -> None:
        plan = [(self.users[k % len(self.users)], f"scale-{k}") for k in range(count)]

        def start(pair):
            user, name = pair
            ns = Path(user.pw_dir) / f"ns-{name}"
            (ns / "in").mkdir(parents=True)
            (ns / "in" / "a.txt").write_text("x" * 4096)
            for path in (ns, ns / "in", ns / "in" / "a.txt"):
                os.chown(path, user.pw_uid, user.pw_gid)
            wait = ("--wait-resources", "300s")
            self.run(user, "start", "WORKFLOW=wdf.yaml", f"SESSION={name}", f"NS={ns}", *wait)
            return pair

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            self.sessions = list(pool.map(start, plan))

    def stop_sessions(self) -> None:
        def stop(pair):
            user, name = pair
            self.run(user, "stop", f"SESSION={name}", "--force", check=False)

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(stop, self.sessions))

    # --- figures --------------------------------------------------------------------------------

    def service_chains(self, runs: int) -> float:
        """Seconds ``runs`` `iosea-wf run` commands took, CONCURRENCY at a time."""
        todo = [self.sessions[i % len(self.sessions)] for i in range(runs)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(lambda pair: self.run(pair[0], "run", f"SESSION={pair[1]}", "STEP=s"), todo))
        return time.perf_counter() - t0

    def sbatch_chains(self, runs: int) -> float:
        """Seconds ``runs`` plain sbatch chains (mover job, then the step afterok) took, as the users."""
        chain = (
            "j=$(sbatch --parsable -p cpu -J ref.dm -o /dev/null --wrap true) && "
            "sbatch --parsable -p cpu -J ref.s --dependency=afterok:$j job.sh"
        )
        todo = [self.sessions[i % len(self.sessions)][0] for i in range(runs)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(lambda user: self.run(user, "/bin/sh", "-c", chain, tool=""), todo))
        return time.perf_counter() - t0

    def cli_status(self, user, name) -> float:
        return self.run(user, "status", f"SESSION={name}")[0]

    def request_status(self, user, name, count: int) -> list[float]:
        _, out = self.run(user, "-c", REQUEST_TIMER, self.url, name, str(count), tool="python", timeout=600)
        return json.loads(out)

    def wait_for_jobs(self, timeout: float) -> bool:
        """True once no job of the users is pending or running (polled with squeue)."""
        names = ",".join(u.pw_name for u in self.users)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(
                ["squeue", "-h", "-u", names, "-t", "PENDING,RUNNING,CONFIGURING,COMPLETING", "-o", "%i %j"],
                capture_output=True,
                text=True,
            ).stdout.split("\n")
            # The services' own allocations run as long as their sessions.
            if not [line for line in out if line.strip() and ".svc." not in line]:
                return True
            time.sleep(5)
        return False

    def fill_store(self, total: int) -> tuple[int, int]:
        """Record sessions until ``total`` in all, spread over a year; return (live, archived) after."""
        store = st.Store(self.state, keep_days=lambda: 7)
        with store.transaction() as tx:
            template = dict(tx.session(self.sessions[0][0].pw_name, self.sessions[0][1]))
        now, records = time.time(), []
        for i in range(total - len(self.sessions)):
            user = self.users[i % len(self.users)]
            created = now - (i / max(1, total)) * 365 * DAY
            record = copy.deepcopy(template)
            record.update(
                id=uuid.uuid4().hex,
                name=f"old-{i}",
                owner=user.pw_name,
                state=st.STOPPED,
                resources_left=False,
                created_at=created,
                updated_at=created + 3600,
                steps=record.get("steps", [])[:3],
            )
            for svc in record["services"]:
                svc["state"] = "STOPPED"
            records.append(record)
        with store.transaction() as tx:
            tx.add_sessions(records)  # one write: TinyDB would rewrite the file per insert
        store.archive_ended()
        with store.transaction(shared=True) as tx:
            live = len(tx.sessions)
        files = glob.glob(f"{self.state}/archive/*/*.json")
        archived = sum(len(json.loads(Path(p).read_text())["sessions"]) for p in files)
        return live, archived


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def p50_p99(values: list[float]) -> str:
    p50, p99 = statistics.median(values) * 1000, pct(values, 0.99) * 1000
    return f"p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  (n={len(values)})"


def timed_writes(state: Path, session_id: str, count: int) -> tuple[list[float], list[float]]:
    """Seconds of ``count`` writes of one live session: by a warm store, and by a fresh one each."""
    warm = st.Store(state)
    warm.sessions_of("nobody", archived=False)
    hot, cold = [], []
    for i in range(count):
        t0 = time.perf_counter()
        warm.update_session(session_id, bench_mark=i)
        hot.append(time.perf_counter() - t0)
    for i in range(count):
        t0 = time.perf_counter()
        st.Store(state).update_session(session_id, bench_mark=i)
        cold.append(time.perf_counter() - t0)
    return hot, cold


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("bench/scale.py needs root (it creates users)")
    need_munge()
    if not slurm.controller_up():
        raise SystemExit("slurmctld does not answer (`make site`)")
    bin_dir = editable_user_venv()
    folder = Path(tempfile.mkdtemp(prefix="iosea-wf-scale-", dir="/tmp"))
    folder.chmod(0o755)
    sock, state = folder / "wm.sock", folder / "state"
    bench = Bench(bin_dir, f"unix://{sock}", state)
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        print(line, file=sys.stderr, flush=True)

    try:
        with running_service(sock, state, bin_dir=bin_dir):
            bench.add_users(USERS)
            t0 = time.perf_counter()
            bench.start_sessions(SESSIONS)
            say(f"{SESSIONS} sessions of {USERS} users started in {time.perf_counter() - t0:.1f} s")

            reference = bench.sbatch_chains(RUNS)
            say(f"sbatch chains: {RUNS} in {reference:.1f} s")

            # The load, with status sampled all along (a CLI and a warm client, as users).
            done = threading.Event()
            cli_times: list[float] = []
            request_times: list[float] = []

            def sample() -> None:
                k = 0
                while not done.is_set():
                    user, name = bench.sessions[k % len(bench.sessions)]
                    cli_times.append(bench.cli_status(user, name))
                    request_times.extend(bench.request_status(user, name, 5))
                    k += 1
                    done.wait(0.5)  # a user's pace, not a load of its own on two cores

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            service = bench.service_chains(RUNS)
            done.set()
            sampler.join(120)
            say(f"service chains: {RUNS} in {service:.1f} s")
            drained = bench.wait_for_jobs(DRAIN_S)
            say(f"every job ended: {drained}")

            user, name = bench.sessions[0]
            bench.run(user, "status", f"SESSION={name}")  # records the final states (one write)
            live, archived = bench.fill_store(RECORDED)
            say(f"store filled: {live} live, {archived} archived")
            quiet_cli = [bench.cli_status(user, name) for _ in range(SAMPLES)]
            quiet_request = bench.request_status(user, name, SAMPLES)
            old = next(f"old-{i}" for i in range(RECORDED) if bench.users[i % len(bench.users)] == user)
            archived_request = bench.request_status(user, old, SAMPLES)
            archived_cli = [bench.cli_status(user, old) for _ in range(max(3, SAMPLES // 3))]
            list_all = [bench.run(user, "list", "--all")[0] for _ in range(max(3, SAMPLES // 3))]
            with st.Store(state).transaction(shared=True) as tx:
                live_id = tx.session(user.pw_name, name)["id"]
            hot, cold = timed_writes(state, live_id, SAMPLES)
            # What a command costs before it does anything: Python, then the CLI's imports.
            bare = [bench.run(user, "-c", "pass", tool="python")[0] for _ in range(5)]
            imports = [
                bench.run(user, "-c", "import iosea_wf.cli, iosea_wf.api.client", tool="python")[0]
                for _ in range(5)
            ]
            bench.stop_sessions()
    finally:
        bench.remove_users()
        shutil.rmtree(folder, ignore_errors=True)

    print(
        f"scale: {USERS} users, {SESSIONS} live sessions (one small NFS service each), {RUNS} step runs "
        f"(one data mover each), {CONCURRENCY} commands in flight"
    )
    print(
        f"  chains submitted per second: service {RUNS / service:.2f}  sbatch {RUNS / reference:.2f}"
        f"  (service / sbatch {reference / service:.2f}x)"
    )
    print(f"  status during the load, CLI      {p50_p99(cli_times)}")
    print(f"  status during the load, request  {p50_p99(request_times)}")
    print(f"  with {live + archived} sessions recorded ({live} live, {archived} archived):")
    print(f"    status (live session), CLI      {p50_p99(quiet_cli)}")
    print(f"    status (live session), request  {p50_p99(quiet_request)}   aim < 100 ms")
    print(f"    status (archived), request      {p50_p99(archived_request)}")
    print(f"    status (archived), CLI          {p50_p99(archived_cli)}")
    print(f"    list --all, CLI                 {p50_p99(list_all)}")
    print(f"    one write, warm store           {p50_p99(hot)}   aim < 20 ms")
    print(f"    one write, fresh store          {p50_p99(cold)}")
    print(f"    start-up: python -c pass         {p50_p99(bare)}")
    print(f"    start-up: + the CLI's imports    {p50_p99(imports)}")


if __name__ == "__main__":
    main()
