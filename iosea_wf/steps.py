"""Step runs of a session: submission of the job chain, and honest states from Slurm.

A run of a step is a chain of Slurm jobs submitted at once through the orchestrator:
``step_start`` data movers -> the step (``afterok``) -> ``step_stop`` data movers (``afterok``).
The chain lives in Slurm, so nothing depends on the CLI staying alive. Job states are asked of
Slurm in one batch per call and cached in the store once final.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from . import jobs, slurm
from . import store as st
from .errors import OrchestrationError, SessionConflict, SessionNotFound, UsageError

# What a job that will never run is shown as, and why.
SKIPPED = "SKIPPED"
NEVER_RUNS_REASONS = {"DependencyNeverSatisfied"}


def _instance_dir(state_dir: Path, session: dict[str, Any], step: str, instance: int) -> Path:
    d = state_dir / "jobs" / session["id"] / f"{step}.{instance}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _attached_services(session: dict[str, Any], step_def) -> list[dict[str, Any]]:
    by_name = {s["name"]: s for s in session["services"]}
    attached = []
    for ref in step_def.services:
        svc = dict(by_name[ref.name])
        svc["mode"] = ref.mode
        svc["datamovers"] = list(ref.datamovers)
        attached.append(svc)
    return attached


def plan_run(ctx, session: dict[str, Any], step: str, cwd: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write the job scripts of a new instance of ``step``; return (instance record, pipeline)."""
    from .wdf import Workflow

    wdf = Workflow.from_dict(session["wdf"])
    step_def = wdf.steps.get(step)
    if step_def is None:
        raise SessionNotFound(
            f"step {step!r} is not in the WDF of session {session['name']} "
            f"(steps: {', '.join(wdf.steps) or 'none'})"
        )
    site = ctx.site_of(session)
    instance = 1 + max((s["instance"] for s in session.get("steps", []) if s["name"] == step), default=0)
    workdir = _instance_dir(ctx.store.state_dir, session, step, instance)
    base = f"iosea.{session['name']}.{step}.{instance}"
    attached = _attached_services(session, step_def)
    attach_mode = site.variables.get("iosea_service_attach", "env")

    movers: list[dict[str, Any]] = []
    pipeline: dict[str, Any] = {"cwd": cwd, "start_movers": [], "stop_movers": []}
    for svc in attached:
        for dm_name in svc["datamovers"]:
            dm = wdf.datamovers[dm_name]
            tier = site.tiers[dm.target]
            tool = list(site.mover_tools[tier.tool].command)
            target = os.path.join(tier.path, session["owner"], session["name"], svc["name"])
            label = f"{dm_name}.{svc['name']}"
            script = workdir / f"mover.{label}.sh"
            progress = workdir / f"mover.{label}.progress.json" if tier.tool == "builtin" else None
            jobs.mover_script(
                script, tool, dm.operation, svc["namespace"], target, list(dm.elements), progress
            )
            argv = jobs.mover_argv(
                partition=site.datanodes_partition,
                job_name=f"{base}.dm.{dm_name}",
                output=workdir / f"mover.{label}.out",
                script=script,
                cwd=cwd,
            )
            entry = {"name": dm_name, "argv": argv}
            pipeline["start_movers" if dm.trigger == "step_start" else "stop_movers"].append(entry)
            movers.append(
                {
                    "name": dm_name,
                    "service": svc["name"],
                    "trigger": dm.trigger,
                    "operation": dm.operation,
                    "target": dm.target,
                    "target_path": target,
                    "progress_file": str(progress) if progress else None,
                    "output": str(workdir / f"mover.{label}.out"),
                    "job_id": None,
                    "state": None,
                    "exit_code": None,
                }
            )

    options, script_and_args, wrap = jobs.parse_sbatch(step_def.command)
    sent = ctx.sent_files.get(script_and_args[0]) if wrap is None else None
    if sent is not None:
        # The caller read its batch script with its own rights and sent it: this copy is what runs.
        copy = workdir / f"sent.{Path(script_and_args[0]).name}"
        copy.write_bytes(sent)
        copy.chmod(0o755)
        script_and_args = [str(copy), *script_and_args[1:]]
    script = workdir / "step.sh"
    jobs.write_step_script(
        script,
        cwd=cwd,
        script_and_args=script_and_args,
        wrap=wrap,
        env={
            **jobs.service_environment(session, attached),
            "IOSEA_STEP": step,
            "IOSEA_INSTANCE": str(instance),
        },
        attached=attached,
        attach_mode=attach_mode,
    )
    module = step_def.location[0]
    pipeline["step"] = {
        "name": step,
        "argv": jobs.step_argv(
            options, partition=site.modules[module].partition, job_name=base, cwd=cwd, script=script
        ),
    }
    record = {
        "name": step,
        "instance": instance,
        "cwd": cwd,
        "submitted_at": time.time(),
        "job_id": None,
        "state": None,
        "exit_code": None,
        "datamovers": movers,
        "dir": str(workdir),
    }
    return record, pipeline


def submit(ctx, session: dict[str, Any], step: str, cwd: str | None = None) -> dict[str, Any]:
    """Submit a new instance of a step of an ACTIVE session; return the recorded instance."""
    from .orchestrator import run_playbook

    if session["state"] != st.ACTIVE:
        raise SessionConflict(
            f"session {session['name']!r} is {session['state']}, not ACTIVE: cannot run a step"
        )
    record, pipeline = plan_run(ctx, session, step, cwd or os.getcwd())
    ident = f"{session['name']}-run-{step}-{record['instance']}-{int(time.time())}"
    result = run_playbook(
        "step_submit",
        site_path=Path(session["site"]),
        state_dir=ctx.store.state_dir,
        ident=ident,
        extravars={"iosea_pipeline": pipeline},
        verbose=ctx.verbose,
    )
    ids = next((h.results for h in result.hosts.values() if h.results.get("step")), None)
    if not result.ok or not ids:
        msg = "; ".join(h.message for h in result.hosts.values() if not h.ok) or "no job id reported"
        raise OrchestrationError(f"step {step} of session {session['name']} was not submitted: {msg}")
    start_ids, stop_ids = list(ids["start_movers"]), list(ids["stop_movers"])
    for mover in record["datamovers"]:
        mover["job_id"] = str(start_ids.pop(0) if mover["trigger"] == "step_start" else stop_ids.pop(0))
    record["job_id"] = str(ids["step"])
    record["artifacts"] = result.artifacts
    with ctx.store.transaction() as tx:
        current = dict(tx.sessions.get(st.Query().id == session["id"]))
        current["steps"] = [*current.get("steps", []), record]
        current["updated_at"] = time.time()
        tx.put_session(current)
    return record


def _job_ids(instance: dict[str, Any]) -> list[str]:
    return [j for j in [instance["job_id"], *(m["job_id"] for m in instance["datamovers"])] if j]


def _final(state: str | None) -> bool:
    return state is not None and (state in slurm.TERMINAL_STATES or state == SKIPPED)


def read_progress(path: str | None) -> dict[str, Any] | None:
    """The data mover's progress file, if it wrote one."""
    if not path:
        return None
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def refresh(ctx, session: dict[str, Any]) -> dict[str, Any]:
    """Ask Slurm (one batch) for every unfinished job of the session; cache final states; return views."""
    pending_ids = [
        j
        for inst in session.get("steps", [])
        for j, state in [(inst["job_id"], inst["state"])]
        + [(m["job_id"], m["state"]) for m in inst["datamovers"]]
        if j and not _final(state)
    ]
    extra = [
        a["job_id"] for a in session.get("accesses", []) if a.get("job_id") and not _final(a.get("state"))
    ]
    states = slurm.job_states(pending_ids + extra) if (pending_ids or extra) and slurm.controller_up() else {}
    changed = False
    for inst in session.get("steps", []):
        changed |= _apply(inst, states)
    for acc in session.get("accesses", []):
        js = states.get(acc.get("job_id"))
        if js and js.terminal and acc.get("state") != js.state:
            acc["state"], changed = js.state, True
        elif js:
            acc["live_state"] = js.state
    if changed:
        with ctx.store.transaction() as tx:
            current = dict(tx.sessions.get(st.Query().id == session["id"]))
            current["steps"] = session["steps"]
            if "accesses" in session:
                current["accesses"] = session["accesses"]
            tx.put_session(current)
    return session


def _apply(inst: dict[str, Any], states: dict[str, slurm.JobState]) -> bool:
    """Fold Slurm's answers into one step instance; return True when a final state was learned."""
    changed = False

    def learn(entry: dict[str, Any]) -> None:
        nonlocal changed
        js = states.get(entry["job_id"]) if entry.get("job_id") else None
        if js is None or _final(entry.get("state")):
            return
        if js.terminal:
            entry.update(state=js.state, exit_code=js.exit_code, signal=js.signal, reason=js.reason)
            changed = True
        else:
            entry.update(live_state=js.state, reason=js.reason)

    learn(inst)
    for m in inst["datamovers"]:
        learn(m)
    step_state = inst.get("state")
    for m in inst["datamovers"]:
        if (
            m["trigger"] == "step_stop"
            and _final(step_state)
            and step_state != "COMPLETED"
            and m["state"] != SKIPPED
        ):
            # afterok: a step that did not complete never triggers its step_stop movers.
            m.update(state=SKIPPED, reason=f"step {step_state}: step_stop data movers do not run")
            changed = True
    failed_start = [
        m
        for m in inst["datamovers"]
        if m["trigger"] == "step_start" and _final(m["state"]) and m["state"] != "COMPLETED"
    ]
    if (
        failed_start
        and inst.get("state") in (None, "CANCELLED")
        and inst.get("live_state") in (None, "PENDING")
    ):
        never = inst.get("reason") in NEVER_RUNS_REASONS or inst.get("state") == "CANCELLED"
        if never:
            names = ", ".join(f"{m['name']} {m['state']}" for m in failed_start)
            inst.update(state=SKIPPED, reason=f"step_start data mover {names}: the step does not run")
            for m in inst["datamovers"]:
                if m["trigger"] == "step_stop" and not _final(m["state"]):
                    m.update(state=SKIPPED, reason="the step did not run")
            changed = True
    return changed


def view(inst: dict[str, Any]) -> dict[str, Any]:
    """The public view of one step instance (status --json)."""
    return {
        "name": inst["name"],
        "instance": inst["instance"],
        "state": inst.get("state") or inst.get("live_state") or "SUBMITTED",
        "job_id": inst["job_id"],
        "exit_code": inst.get("exit_code"),
        "reason": inst.get("reason"),
        "submitted_at": inst["submitted_at"],
        "datamovers": [
            {
                "name": m["name"],
                "service": m["service"],
                "trigger": m["trigger"],
                "operation": m["operation"],
                "target": m["target"],
                "state": m.get("state") or m.get("live_state") or "SUBMITTED",
                "job_id": m["job_id"],
                "exit_code": m.get("exit_code"),
                "reason": m.get("reason"),
                "progress": read_progress(m.get("progress_file")),
            }
            for m in inst["datamovers"]
        ],
    }


def active_jobs(session: dict[str, Any]) -> list[str]:
    """Ids of the session's jobs that are not known to have ended."""
    ids = []
    for inst in session.get("steps", []):
        for entry in [inst, *inst["datamovers"]]:
            if entry.get("job_id") and not _final(entry.get("state")):
                ids.append(entry["job_id"])
    ids += [
        a["job_id"] for a in session.get("accesses", []) if a.get("job_id") and not _final(a.get("state"))
    ]
    return ids


def starting_accesses(session: dict[str, Any]) -> list[dict[str, Any]]:
    """Interactive accesses whose salloc still runs but whose job id is not known yet."""
    from .procs import alive

    return [
        a
        for a in session.get("accesses", [])
        if not a.get("job_id") and not a.get("ended_at") and alive(a.get("pid"))
    ]


def find_instance(session: dict[str, Any], step: str, instance: int | None = None) -> dict[str, Any]:
    """A step instance of the session (the latest unless ``instance`` is given)."""
    found = [s for s in session.get("steps", []) if s["name"] == step]
    if instance is not None:
        found = [s for s in found if s["instance"] == instance]
    if not found:
        what = f"instance {instance} of step {step!r}" if instance is not None else f"step {step!r}"
        raise SessionNotFound(f"session {session['name']} has no run of {what}")
    return found[-1]


def instance_done(inst: dict[str, Any]) -> bool:
    """True once every job of the instance has a final state."""
    return _final(inst.get("state")) and all(_final(m.get("state")) for m in inst["datamovers"])


def instance_succeeded(inst: dict[str, Any]) -> bool:
    """True when the step and every data mover completed."""
    return inst.get("state") == "COMPLETED" and all(m.get("state") == "COMPLETED" for m in inst["datamovers"])


def check_step_name(step: str | None) -> str:
    """Reject a missing STEP=."""
    if not step:
        raise UsageError("STEP= is mandatory (e.g. STEP=step_A)")
    return step


def cancel(ctx, session: dict[str, Any], step: str | None = None, instance: int | None = None) -> list[str]:
    """Cancel the unfinished jobs of one step instance (or of every run of the session) in one scancel."""
    session = refresh(ctx, session)
    targets = [find_instance(session, step, instance)] if step else session.get("steps", [])
    now = time.time()
    ids = []
    for inst in targets:
        for entry in [inst, *inst["datamovers"]]:
            if entry.get("job_id") and not _final(entry.get("state")):
                ids.append(entry["job_id"])
                entry["cancelled_at"] = now
    if not ids:
        return []
    with ctx.store.transaction() as tx:
        current = dict(tx.sessions.get(st.Query().id == session["id"]))
        current["steps"] = session["steps"]
        tx.put_session(current)
    slurm.cancel(ids)
    return ids
