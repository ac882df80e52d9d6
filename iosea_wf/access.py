"""Interactive access: a Slurm allocation with every service of a session attached.

``manager.access`` checks the rules (the session exists, belongs to the user and is ACTIVE) and
calls :func:`open_allocation`, which runs the user's command (or a shell) through ``salloc`` and
``srun`` with the services attached, records the access in the session while it lasts (so that
``status`` lists it and ``stop`` waits for it, or ends it with ``--force``), and watches Slurm
for its job id.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from . import jobs, slurm
from . import store as st
from .errors import SessionConflict, SlurmError, UsageError
from .identity import current_user
from .manager import Context, Progress


def open_allocation(
    ctx: Context,
    record: dict[str, Any],
    command: list[str],
    *,
    nodes: int | None,
    cores: int | None,
    time_limit: str | None,
    partition: str | None,
    immediate: bool,
    progress: Progress,
    update_accesses: Callable[[Callable[[list[dict[str, Any]]], None]], None] | None = None,
) -> int:
    """Run ``command`` (else the user's shell) in a new allocation; return its exit code.

    Raises :class:`SlurmError` when no allocation was granted (``--immediate`` on busy nodes,
    or salloc failing before the command ran). ``update_accesses(change)`` records a change of
    the session's accesses (default: in ``ctx.store``; through the service: there).
    """
    me = current_user()
    if ctx.user != me:
        # salloc runs in the user's own terminal, as the user (their CLI runs it): a process
        # running as someone else never opens an allocation for them.
        raise UsageError(
            f"interactive access runs as the user in their own terminal: this process runs as {me}, "
            f"not as {ctx.user}"
        )
    if update_accesses is None:

        def update_accesses(change, require_active=False):
            _update_accesses(ctx, record["id"], change, require_active=require_active)

    site = ctx.site_of(record)
    partition = partition or site.interactive_partition
    token = uuid.uuid4().hex[:8]
    job_name = f"iosea.{record['name']}.access.{token}"
    # A read-only share (``shared_mode``, set by whoever checked the rules) mounts every service RO.
    mode = "RO" if record.get("shared_mode") == "ro" else "RW"
    attached = [dict(s, mode=mode) for s in record["services"]]
    env = dict(os.environ)
    env.update(jobs.service_environment(record, attached))
    inner = jobs.attach_command(
        attached,
        site.attach,
        list(command) or [os.environ.get("SHELL") or "/bin/bash"],
    )
    argv = ["salloc", f"--job-name={job_name}", f"--partition={partition}"]
    if nodes:
        argv.append(f"--nodes={nodes}")
    if cores:
        argv.append(f"--cpus-per-task={cores}")
    if time_limit:
        argv.append(f"--time={time_limit}")
    if immediate:
        argv.append("--immediate=1")
    srun = ["srun", "--ntasks=1", "--nodes=1"]
    if not command and sys.stdin.isatty():
        srun.append("--pty")
    # The marker tells an allocation that ran our command from one salloc created and revoked
    # (--immediate on busy nodes), which Slurm reports as FAILED too.
    marker = ctx.store.state_dir / "access" / f"{token}.started"
    marker.parent.mkdir(parents=True, exist_ok=True)
    argv += [*srun, "/bin/sh", "-c", 'touch "$0" && exec "$@"', str(marker), *inner]

    entry = {
        "token": token,
        "job_name": job_name,
        "since": time.time(),
        "pid": os.getpid(),
        "job_id": None,
        "state": None,
        "partition": partition,
        "user": ctx.user,
    }
    # Recorded only if the session is still ACTIVE under the lock: a `stop` that began since
    # `manager.access` looked either refuses this access or sees it and waits for it.
    update_accesses(lambda acc: acc.append(entry), require_active=True)
    granted: dict[str, str] = {}
    done = threading.Event()

    def watch() -> None:
        said_waiting = False
        started = time.time()
        while not done.is_set():
            rows = slurm.jobs_named(job_name)
            if rows:
                job_id, state, reason = rows[0]
                if job_id not in granted.values():
                    granted["job_id"] = job_id
                    update_accesses(lambda acc, j=job_id: _set(acc, token, job_id=j))
                if state == "PENDING" and not said_waiting and time.time() - started > 1:
                    progress(
                        f"access: waiting for resources on partition {partition} (job {job_id}: {reason})"
                    )
                    said_waiting = True
                if state == "RUNNING":
                    granted["ran"] = "yes"
                    return
            done.wait(0.3)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        rc = slurm.allocate_and_run(argv, env=env)
    finally:
        done.set()
        watcher.join(2)
        if marker.exists():
            granted["ran"] = "yes"
            marker.unlink()
        if "job_id" not in granted:
            # A short command may end before the watcher saw it: slurmctld still knows the job.
            rows = slurm.jobs_named(job_name)
            if rows:
                granted["job_id"] = rows[0][0]
        update_accesses(
            lambda acc: _set(acc, token, ended_at=time.time(), job_id=granted.get("job_id")),
        )
    if "ran" not in granted and rc != 0:
        # salloc may create the job and revoke it (--immediate): an allocation that never ran.
        update_accesses(lambda acc: _set(acc, token, state="NOT_GRANTED"))
        if immediate:
            raise SlurmError(
                f"no allocation: resources on partition {partition} are busy right now (--immediate)"
            )
        raise SlurmError(f"no allocation on partition {partition} (salloc exit code {rc})")
    return rc


def _set(accesses: list[dict[str, Any]], token: str, **changes: Any) -> None:
    for a in accesses:
        if a["token"] == token:
            a.update(changes)


def _update_accesses(
    ctx: Context,
    session_id: str,
    change: Callable[[list[dict[str, Any]]], None],
    *,
    require_active: bool = False,
) -> None:
    """Change the session's accesses in the current record, in one transaction."""
    with ctx.store.transaction() as tx:
        found = tx.sessions.get(st.Query().id == session_id)
        if found is None:
            raise st.StoreError(f"session {session_id} vanished from the store")
        current = dict(found)
        if require_active and current["state"] != st.ACTIVE:
            raise SessionConflict(f"session {current['name']!r} is {current['state']}, not ACTIVE: no access")
        accesses = [dict(a) for a in current.get("accesses", [])]
        change(accesses)
        current["accesses"] = accesses
        tx.put_session(current)
