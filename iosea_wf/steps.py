"""Step runs of a session: submission of the job chain, and honest states from Slurm.

A run of a step is a chain of Slurm jobs submitted at once through the orchestrator:
``step_start`` data movers -> the step (``afterok``) -> ``step_stop`` data movers (``afterok``).
The chain lives in Slurm, so nothing depends on the CLI staying alive. Job states are asked of
Slurm in one batch per call and cached in the store once final.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

from . import jobs, slurm
from . import store as st
from .errors import OrchestrationError, SessionConflict, SessionNotFound, SlurmError, UsageError

# What a job that will never run is shown as, and why.
SKIPPED = "SKIPPED"
NEVER_RUNS_REASONS = {"DependencyNeverSatisfied"}
# An instance recorded (under the lock) before its jobs are submitted, and one whose submission
# failed: its number stays taken, so instance numbers never repeat.
SUBMITTING = "SUBMITTING"
NOT_SUBMITTED = "NOT_SUBMITTED"
# A submission takes about a second; one still SUBMITTING after this long, on whatever host, is
# taken for dead (its process cannot be checked from another host), so `stop` never waits forever.
SUBMIT_GIVE_UP_S = 300.0


def _instance_dir(
    state_dir: Path, session: dict[str, Any], step: str, instance: int, who: slurm.OnBehalf | None = None
) -> tuple[Path, Path]:
    """(directory of the instance's scripts, directory its jobs write their output and progress to).

    For a user root submits for, the jobs (the user's) write into ``out/``, given to the user;
    the scripts stay in root's directory, which the user can pass through but not change: sbatch
    reads them as root, so a file the user could swap would let root submit any file it can read.
    """
    d = state_dir / "jobs" / session["id"] / f"{step}.{instance}"
    d.mkdir(parents=True, exist_ok=True)
    if who is None:
        return d, d
    # The state directory and the ones down to the instance: passable, never listable or readable.
    for parent in (d, d.parent, d.parent.parent, Path(state_dir)):
        mode = parent.stat().st_mode & 0o7777
        if mode & 0o011 != 0o011:
            parent.chmod(mode | 0o011)
    out = d / "out"
    out.mkdir(mode=0o700, exist_ok=True)
    os.chown(out, who.uid, who.gid, follow_symlinks=False)
    return d, out


def _attached_services(session: dict[str, Any], step_def) -> list[dict[str, Any]]:
    by_name = {s["name"]: s for s in session["services"]}
    attached = []
    for ref in step_def.services:
        svc = dict(by_name[ref.name])
        svc["mode"] = ref.mode
        svc["datamovers"] = list(ref.datamovers)
        attached.append(svc)
    return attached


def tier_dir(session: dict[str, Any]) -> str:
    """The session's directory on a tier: its name, then the start of its id (a reused name never meets)."""
    return f"{session['name']}.{session['id'][:12]}"


def plan_run(
    ctx, session: dict[str, Any], step: str, cwd: str, who: slurm.OnBehalf | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write the job scripts of a new instance of ``step``; return (instance record, pipeline).

    ``who``: the user root submits for (their jobs get ``--uid/--gid`` and the user's own
    environment; see :func:`slurm.acting_for`), None when this process is the user.
    """
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
    workdir, outdir = _instance_dir(ctx.store.state_dir, session, step, instance, who)
    base = f"iosea.{session['name']}.{step}.{instance}"
    attached = _attached_services(session, step_def)
    attach_mode = site.variables.get("iosea_service_attach", "env")

    movers: list[dict[str, Any]] = []
    pipeline: dict[str, Any] = {"cwd": cwd, "start_movers": [], "stop_movers": [], "user_dirs": []}
    for svc in attached:
        for dm_name in svc["datamovers"]:
            dm = wdf.datamovers[dm_name]
            tier = site.tiers[dm.target]
            tool = list(site.mover_tools[tier.tool].command)
            # Each tier has a 0700 directory per user (made by the orchestrator before
            # submission): the movers, which run as the user, write only under it.
            user_dir = os.path.join(tier.path, session["owner"])
            if all(d["path"] != user_dir for d in pipeline["user_dirs"]):
                pipeline["user_dirs"].append({"path": user_dir, "user": session["owner"]})
            target = os.path.join(user_dir, tier_dir(session), svc["name"])
            label = f"{dm_name}.{svc['name']}"
            script = workdir / f"mover.{label}.sh"
            progress = outdir / f"mover.{label}.progress.json" if tier.tool == "builtin" else None
            jobs.mover_script(
                script, tool, dm.operation, svc["namespace"], target, list(dm.elements), progress
            )
            argv = jobs.mover_argv(
                partition=site.datanodes_partition,
                job_name=f"{base}.dm.{dm_name}",
                output=outdir / f"mover.{label}.out",
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
                    "output": str(outdir / f"mover.{label}.out"),
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
    if who is not None:
        # Right after "sbatch": the WDF's own options (e.g. --export) come later and win.
        for entry in [pipeline["step"], *pipeline["start_movers"], *pipeline["stop_movers"]]:
            entry["argv"][1:1] = who.sbatch_options()
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
    """Submit a new instance of a step of an ACTIVE session; return the recorded instance.

    The instance number is taken and the instance recorded (SUBMITTING) in one transaction that
    finds the session ACTIVE; the playbook (about 1 s) runs outside the lock; the job ids are then
    merged into the current record. ``stop`` waits for SUBMITTING instances, so no job of a
    session ever runs untracked.
    """
    from .orchestrator import run_playbook

    sid = session["id"]
    # Refused here, before anything is written, when root acts for a user without their token.
    who = slurm.acting_for(ctx.user, ctx.slurm_jwt)
    with ctx.store.transaction() as tx:
        current = _current(tx, sid)
        if current["state"] != st.ACTIVE:
            raise SessionConflict(
                f"session {current['name']!r} is {current['state']}, not ACTIVE: cannot run a step"
            )
        record, pipeline = plan_run(ctx, current, step, cwd or os.getcwd(), who)
        instance = record["instance"]
        ident = f"{session['name']}-run-{step}-{instance}-{int(time.time())}"
        # Who submits, and the playbook run's name: a `stop` finding this process dead ends the
        # ansible-playbook it left (which would otherwise submit on) before cancelling its jobs.
        submitter = {"pid": os.getpid(), "host": os.uname().nodename, "run": ident}
        record.update(state=SUBMITTING, submitter=submitter)
        current["steps"] = [*current.get("steps", []), record]
        current["updated_at"] = time.time()
        tx.put_session(current)
    try:
        with slurm.token_file(who) as token_file:
            extravars: dict[str, Any] = {"iosea_pipeline": pipeline}
            if token_file:
                extravars["iosea_token_file"] = token_file
            result = run_playbook(
                "step_submit",
                site_path=Path(session["site"]),
                state_dir=ctx.store.state_dir,
                ident=ident,
                extravars=extravars,
                verbose=ctx.verbose,
            )
    except BaseException as exc:
        # Interrupted or crashed mid-submission: whatever reached Slurm is cancelled, then said.
        _cancel_named(ctx, _pipeline_names(pipeline))
        _mark_not_submitted(ctx, sid, step, instance, f"submission interrupted: {exc!r}")
        raise
    ids = next((h.results for h in result.hosts.values() if h.results.get("step")), None)
    if not result.ok or not ids:
        msg = "; ".join(h.message for h in result.hosts.values() if not h.ok) or "no job id reported"
        # The chain action cancels what it had submitted when an sbatch is refused.
        _mark_not_submitted(ctx, sid, step, instance, f"not submitted: {msg}")
        raise (SlurmError if result.refused_by_slurm else OrchestrationError)(
            f"step {step} of session {session['name']} was not submitted: {msg}"
        )
    start_ids, stop_ids = list(ids["start_movers"]), list(ids["stop_movers"])
    mover_ids = [
        str(start_ids.pop(0) if m["trigger"] == "step_start" else stop_ids.pop(0))
        for m in record["datamovers"]
    ]
    with ctx.store.transaction() as tx:
        current = _current(tx, sid)
        inst = _instance_of(current, step, instance)
        inst.update(job_id=str(ids["step"]), state=None, artifacts=result.artifacts)
        for mover, job_id in zip(inst["datamovers"], mover_ids, strict=True):
            mover["job_id"] = job_id
        # A stop (or a cancel) that came while the playbook ran: the new jobs must not outlive it.
        left = current["state"] != st.ACTIVE
        cancel_now = left or bool(inst.get("cancel_requested"))
        if cancel_now:
            now = time.time()
            for entry in [inst, *inst["datamovers"]]:
                entry["cancelled_at"] = now
        current["updated_at"] = time.time()
        tx.put_session(current)
    if cancel_now:
        slurm.cancel(_job_ids(inst), who)
    if left:
        raise SessionConflict(
            f"session {current['name']!r} became {current['state']} while step {step} was submitted: "
            f"its jobs ({' '.join(_job_ids(inst))}) were cancelled"
        )
    return inst


def _current(tx, session_id: str) -> dict[str, Any]:
    """A deep copy of the session as the store holds it now (under the caller's lock)."""
    found = tx.sessions.get(st.Query().id == session_id)
    if found is None:
        raise st.StoreError(f"session {session_id} vanished from the store")
    return json.loads(json.dumps(found))


def _instance_of(session: dict[str, Any], step: str, instance: int) -> dict[str, Any]:
    for inst in session.get("steps", []):
        if inst["name"] == step and inst["instance"] == instance:
            return inst
    raise st.StoreError(f"instance {instance} of step {step} vanished from session {session['name']}")


def _mark_not_submitted(ctx, session_id: str, step: str, instance: int, reason: str) -> None:
    """Record honestly that an instance's submission failed (its number stays taken)."""
    with ctx.store.transaction() as tx:
        current = _current(tx, session_id)
        inst = _instance_of(current, step, instance)
        if inst.get("state") != SUBMITTING:
            return  # its `run` recorded its jobs meanwhile: they are tracked
        inst.update(state=NOT_SUBMITTED, reason=reason)
        for m in inst["datamovers"]:
            m.update(state=NOT_SUBMITTED, reason="the step was not submitted")
        current["updated_at"] = time.time()
        tx.put_session(current)


def _pipeline_names(pipeline: dict[str, Any]) -> list[str]:
    names = []
    for entry in [*pipeline["start_movers"], pipeline["step"], *pipeline["stop_movers"]]:
        names += [a.split("=", 1)[1] for a in entry["argv"] if a.startswith("--job-name=")]
    return names


def _cancel_named(ctx, names: list[str]) -> list[str]:
    """Cancel the unfinished jobs Slurm holds under these job names (a submission cut short).

    For another user, only with their token (asked for only when there is something to cancel).
    """
    if not names or not slurm.controller_up():
        return []
    rows = slurm.jobs_named(",".join(names))
    ids = [j for j, state, _ in rows if state not in slurm.TERMINAL_STATES]
    if ids:
        slurm.cancel(ids, slurm.acting_for(ctx.user, ctx.slurm_jwt))
    return ids


def abandoned(session: dict[str, Any], now: float | None = None) -> list[dict[str, Any]]:
    """SUBMITTING instances whose `run` died (kill -9 mid-submission, on this host) or is long overdue."""
    from .procs import alive

    here, now = os.uname().nodename, time.time() if now is None else now
    found = []
    for i in submitting(session):
        who = i.get("submitter") or {}
        dead_here = who.get("host") == here and not alive(who.get("pid"))
        if dead_here or now - i["submitted_at"] > SUBMIT_GIVE_UP_S:
            found.append(i)
    return found


def submitting(session: dict[str, Any]) -> list[dict[str, Any]]:
    """Instances recorded but not yet submitted (a `run` in flight)."""
    return [i for i in session.get("steps", []) if i.get("state") == SUBMITTING]


def end_abandoned(ctx, session: dict[str, Any]) -> list[dict[str, Any]]:
    """Mark abandoned submissions NOT_SUBMITTED, cancelling whatever of them reached Slurm; return them."""
    from .orchestrator import end_orphaned_run

    found = abandoned(session)
    for inst in found:
        who = inst.get("submitter") or {}
        if who.get("run") and who.get("host") == os.uname().nodename:
            end_orphaned_run(ctx.store.state_dir, who["run"])
        prefix = f"iosea.{session['name']}.{inst['name']}.{inst['instance']}"
        names = [prefix] + [f"{prefix}.dm.{m['name']}" for m in inst["datamovers"]]
        ids = _cancel_named(ctx, names)
        why = "the submitting `run` died" + (f"; its jobs {' '.join(ids)} were cancelled" if ids else "")
        _mark_not_submitted(ctx, session["id"], inst["name"], inst["instance"], why)
    return found


def _job_ids(instance: dict[str, Any]) -> list[str]:
    return [j for j in [instance["job_id"], *(m["job_id"] for m in instance["datamovers"])] if j]


def _final(state: str | None) -> bool:
    return state is not None and (state in slurm.TERMINAL_STATES or state in (SKIPPED, NOT_SUBMITTED))


_PROGRESS_MAX = 1 << 20


def read_progress(path: str | None) -> dict[str, Any] | None:
    """The data mover's progress file, if it wrote one (a plain file of its own, else None).

    The instance directory belongs to the job's user, who could plant there a symlink or a hard
    link to a file only the reader may read (root, for a site service): such a file is never read.
    """
    if not path:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_size > _PROGRESS_MAX:
            return None
        data = fh.read(_PROGRESS_MAX + 1)
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def refresh(ctx, session: dict[str, Any]) -> dict[str, Any]:
    """Ask Slurm (one batch) for every unfinished job of the session; cache final states; return it.

    Slurm is asked outside the lock; what was learned is merged, per step instance and job id,
    into the record as the store holds it then (another command may have added an instance or an
    access meanwhile), which is what is returned.
    """
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
    if not _learn(session, states):
        return session
    with ctx.store.transaction() as tx:
        current = _current(tx, session["id"])
        _learn(current, states)
        tx.put_session(current)
    return current


def _learn(session: dict[str, Any], states: dict[str, slurm.JobState]) -> bool:
    """Fold Slurm's answers into the instances and accesses of ``session``; True if a final state is new."""
    changed = False
    for inst in session.get("steps", []):
        changed |= _apply(inst, states)
    for acc in session.get("accesses", []):
        js = states.get(acc.get("job_id"))
        if js and js.terminal and acc.get("state") != js.state:
            acc["state"], changed = js.state, True
        elif js:
            acc["live_state"] = js.state
    return changed


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
                "target_path": m.get("target_path"),
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
    """Reject a missing STEP= or one that cannot be a step's name (the WDF's name rule)."""
    from .wdf.model import NAME_RULE, name_problem

    if not step:
        raise UsageError("STEP= is mandatory (e.g. STEP=step_A)")
    why = name_problem(step)
    if why is not None:
        raise UsageError(f"invalid step name {step!r} (STEP=): {why}; use {NAME_RULE}")
    return step


def cancel(ctx, session: dict[str, Any], step: str | None = None, instance: int | None = None) -> list[str]:
    """Cancel the unfinished jobs of one step instance (or of every run of the session) in one scancel.

    The targets are chosen in the current record, under the lock; an instance still SUBMITTING is
    marked so that its `run` cancels its jobs as soon as it has their ids.
    """
    who = slurm.acting_for(ctx.user, ctx.slurm_jwt)  # refused before anything is marked cancelled
    session = refresh(ctx, session)
    if step:
        find_instance(session, step, instance)  # SessionNotFound before any write
    now = time.time()
    ids = []
    with ctx.store.transaction() as tx:
        current = _current(tx, session["id"])
        targets = [find_instance(current, step, instance)] if step else current.get("steps", [])
        for inst in targets:
            if inst.get("state") == SUBMITTING:
                inst["cancel_requested"] = now
            for entry in [inst, *inst["datamovers"]]:
                if entry.get("job_id") and not _final(entry.get("state")):
                    ids.append(entry["job_id"])
                    entry["cancelled_at"] = now
        if ids or any(i.get("cancel_requested") == now for i in targets):
            current["updated_at"] = now
            tx.put_session(current)
    if ids:
        slurm.cancel(ids, who)
    return ids
