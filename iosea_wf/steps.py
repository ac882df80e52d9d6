"""Step runs of a session: submission of the job chain, and honest states from Slurm.

A run of a step is a chain of Slurm jobs submitted at once through the orchestrator:
``step_start`` data movers -> the step (``afterok``) -> ``step_stop`` data movers (``afterok``).
The chain lives in Slurm, so nothing depends on the CLI staying alive. Job states are asked of
Slurm in one batch per call and cached in the store once final.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import time
from pathlib import Path
from typing import Any

from . import jobs, permissions, privileged, sharing, slurm
from . import store as st
from .errors import (
    Forbidden,
    OrchestrationError,
    SessionConflict,
    SessionNotFound,
    SiteError,
    SlurmError,
    SlurmUnreachable,
)
from .sessions import check_step_name  # noqa: F401 (steps' API)

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


def _instance_path(state_dir: Path | str, session: dict[str, Any], step: str, instance: int) -> Path:
    """Where the scripts of an instance are written (see :func:`_instance_dir`)."""
    return Path(state_dir) / "jobs" / session["id"] / f"{step}.{instance}"


def _instance_dir(
    state_dir: Path, session: dict[str, Any], step: str, instance: int, who: slurm.OnBehalf | None = None
) -> tuple[Path, Path]:
    """(directory of the instance's scripts, directory its jobs write their output and progress to).

    For a user root submits for, the jobs (the user's) write into ``out/``, given to the user;
    the scripts stay in root's directory, which the user can pass through but not change: sbatch
    reads them as root, so a file the user could swap would let root submit any file it can read.
    """
    d = _instance_path(state_dir, session, step, instance)
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
    if os.geteuid() == 0:
        os.chown(out, who.uid, who.gid, follow_symlinks=False)
    else:
        # The service's own account cannot give a directory away: it lets the user in by an ACL
        # (an owner may set those), and a default ACL keeps what the user's jobs write readable.
        _let_user_in(out, who.uid)
    return d, out


# POSIX ACL as Linux keeps it in system.posix_acl_access/_default: version 2, then (tag, perm, id).
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_ACL_NO_ID = 0xFFFFFFFF


def _acl(entries: list[tuple[int, int, int]]) -> bytes:
    import struct

    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, p, i in sorted(entries))


def _let_user_in(directory: Path, uid: int) -> None:
    """Give user ``uid`` rwx on ``directory`` of ours, and this process read of what it creates there."""
    me = os.geteuid()
    os.setxattr(
        directory,
        "system.posix_acl_access",
        _acl([(_ACL_USER_OBJ, 7, _ACL_NO_ID), (_ACL_USER, 7, uid), (_ACL_GROUP_OBJ, 0, _ACL_NO_ID),
              (_ACL_MASK, 7, _ACL_NO_ID), (_ACL_OTHER, 0, _ACL_NO_ID)]),
    )  # fmt: skip
    os.setxattr(
        directory,
        "system.posix_acl_default",
        _acl([(_ACL_USER_OBJ, 7, _ACL_NO_ID), (_ACL_USER, 5, me), (_ACL_GROUP_OBJ, 0, _ACL_NO_ID),
              (_ACL_MASK, 7, _ACL_NO_ID), (_ACL_OTHER, 0, _ACL_NO_ID)]),
    )  # fmt: skip


def _attached_services(session: dict[str, Any], step_def) -> list[dict[str, Any]]:
    by_name = {s["name"]: s for s in session["services"]}
    attached = []
    for ref in step_def.services:
        svc = dict(by_name[ref.name])
        svc["mode"] = ref.mode
        svc["datamovers"] = list(ref.datamovers)
        attached.append(svc)
    return attached


def require_active_services(session: dict[str, Any], services: list[dict[str, Any]], doing: str) -> None:
    """Refuse (SessionConflict) when a service the command would attach is LOST.

    A service whose allocation ended was torn down and recorded LOST: a job attaching it would
    find no server, so nothing is submitted; `stop` cleans what is left of the session.
    """
    gone = [s for s in services if s.get("state") == "LOST"]
    if gone:
        raise SessionConflict(
            f"session {session['name']!r}: cannot {doing}: "
            + "; ".join(
                f"service {s['name']} is {s['state']}" + (f" ({s['error']})" if s.get("error") else "")
                for s in gone
            )
            + f"; `iosea-wf stop SESSION={session['name']}` releases the rest"
        )


def tier_dir(session: dict[str, Any]) -> str:
    """The session's directory on a tier: its name, then the start of its id (a reused name never meets)."""
    return f"{session['name']}.{session['id'][:12]}"


def attach_method(site, step_def) -> str:
    """How the step's job sees its services: the WDF's choice, else the site's (SiteError if not offered).

    A WDF is checked against the site at start; a session started on a site that offered the
    method keeps it (the site snapshot), and one that no longer does is refused here.
    """
    chosen = step_def.attach or site.attach
    if chosen not in site.attach_methods:
        raise SiteError(
            f"step {step_def.name}: attach method {chosen!r} is not offered by the site "
            f"(offered: {', '.join(site.attach_methods)})"
        )
    return chosen


def _check_job_python(who: slurm.OnBehalf, step_def, attach_mode: str) -> None:
    """Refuse a run whose jobs would run this process's Python as a user who cannot run it (SiteError).

    The attach helper and the data movers of a step run ``sys.executable`` inside the user's jobs:
    a service run from a Python only root can reach (e.g. under /root) would submit jobs that
    fail with "Permission denied" at their first line.
    """
    uses_python = any(ref.datamovers for ref in step_def.services) or (
        attach_mode in jobs.ATTACH_WRAPPED and bool(step_def.services)
    )
    if not uses_python:
        return
    if not permissions.user_may(who.user, sys.executable, "x"):
        raise SiteError(
            f"the Workflow Manager runs from {sys.executable}, which user {who.user} cannot run: "
            "the jobs of a step with services or data movers run it as their user; run the service "
            "from a Python every user can run (e.g. a venv of /usr/bin/python3)"
        )


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
    if who is not None:
        _check_job_python(who, step_def, attach_method(site, step_def))
    instance = 1 + max((s["instance"] for s in session.get("steps", []) if s["name"] == step), default=0)
    workdir, outdir = _instance_dir(ctx.store.state_dir, session, step, instance, who)
    base = f"iosea.{session['name']}.{step}.{instance}"
    attached = _attached_services(session, step_def)
    require_active_services(session, attached, f"run step {step}")
    attach_mode = attach_method(site, step_def)

    movers: list[dict[str, Any]] = []
    pipeline: dict[str, Any] = {"cwd": cwd, "start_movers": [], "stop_movers": [], "user_dirs": []}
    # Whose run it is: the owner's, or a user the session is shared with read-write. The jobs
    # are theirs, so their movers write under their own tier directory.
    runner = ctx.user
    for svc in attached:
        for dm_name in svc["datamovers"]:
            dm = wdf.datamovers[dm_name]
            tier = site.tiers[dm.target]
            tool = list(site.mover_tools[tier.tool].command)
            # Each tier has a 0700 directory per user (made by the orchestrator before
            # submission): the movers, which run as the user, write only under it.
            user_dir = os.path.join(tier.path, runner)
            if all(d["path"] != user_dir for d in pipeline["user_dirs"]):
                pipeline["user_dirs"].append({"path": user_dir, "user": runner, "tier": dm.target})
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
        "user": runner,
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
        # A share ended (or made read-only) since the caller's session was found: nothing is run.
        sharing.check(current, ctx.user, sharing.RUN, "run a step of")
        if current["state"] != st.ACTIVE:
            raise SessionConflict(
                f"session {current['name']!r} is {current['state']}, not ACTIVE: cannot run a step"
            )
        try:
            record, pipeline = plan_run(ctx, current, step, cwd or os.getcwd(), who)
        except BaseException:
            # Refused while planning (a reserved #SBATCH line...): its directory is no instance's.
            number = 1 + max(
                (s["instance"] for s in current.get("steps", []) if s["name"] == step), default=0
            )
            _remove_instance_dir(
                ctx.store.state_dir,
                {"name": step, "dir": _instance_path(ctx.store.state_dir, current, step, number)},
            )
            raise
        instance = record["instance"]
        ident = f"{session['name']}-run-{step}-{instance}-{int(time.time())}"
        # Who submits, and the playbook run's name: a `stop` finding this process dead ends the
        # ansible-playbook it left (which would otherwise submit on) before cancelling its jobs.
        submitter = {"pid": os.getpid(), "host": os.uname().nodename, "run": ident}
        record.update(state=SUBMITTING, submitter=submitter)
        current["steps"] = [*current.get("steps", []), record]
        current["updated_at"] = time.time()
        tx.put_session(current)
    from .errors import Interrupted
    from .procs import deferred_interrupts

    site_vars = ctx.site_of(session).variables
    if pipeline["user_dirs"] and privileged.in_use(site_vars):
        # Not root: each tier directory of the user is made by the tier-dir helper, as root.
        try:
            for d in pipeline["user_dirs"]:
                privileged.tier_dir(site_vars, d["tier"], d["user"])
        except OrchestrationError as exc:
            _mark_not_submitted(ctx, sid, step, instance, f"not submitted: {exc}")
            raise OrchestrationError(
                f"step {step} of session {session['name']} was not submitted: {exc}"
            ) from None
        pipeline["user_dirs"] = []
    try:
        # Signals wait while the jobs Slurm accepted are recorded (never accepted and unknown);
        # during the playbook they end it (run_playbook), and what reached Slurm is cancelled.
        with deferred_interrupts():
            try:
                if who is not None and who.rest:
                    # Not root: slurmrestd submits the same chain with the user's token alone.
                    result = _submit_through_rest(pipeline, who)
                else:
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
                # Interrupted or crashed mid-submission: the playbook has ended (run_playbook waits for
                # it); whatever of the chain reached Slurm is cancelled, then said.
                gone = _cancel_named(ctx, _pipeline_names(pipeline))
                why = "interrupted" if isinstance(exc, Interrupted) else f"crashed: {exc!r}"
                _mark_not_submitted(ctx, sid, step, instance, f"submission {why}")
                if isinstance(exc, Interrupted):
                    exc.note = f"step {step} instance {instance} was not submitted" + (
                        f": the job(s) {' '.join(gone)} it had reached Slurm with were cancelled"
                        if gone
                        else ""
                    )
                raise
            ids = next((h.results for h in result.hosts.values() if h.results.get("step")), None)
            if not result.ok or not ids:
                msg = "; ".join(h.message for h in result.hosts.values() if not h.ok) or "no job id reported"
                # The chain action cancels what it had submitted when an sbatch is refused; a run that
                # failed otherwise may have left part of the chain: what carries its names goes too.
                _cancel_named(ctx, _pipeline_names(pipeline))
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
    except Interrupted as exc:
        if not exc.note:
            exc.note = (
                f"step {step} instance {instance} was submitted and recorded (jobs "
                f"{' '.join(_job_ids(inst))}): it runs in Slurm; follow it with `iosea-wf status`"
            )
        raise
    if left:
        raise SessionConflict(
            f"session {current['name']!r} became {current['state']} while step {step} was submitted: "
            f"its jobs ({' '.join(_job_ids(inst))}) were cancelled"
        )
    return inst


def _submit_through_rest(pipeline: dict[str, Any], who: slurm.OnBehalf):
    """The chain submitted through slurmrestd, as a playbook result (one host, its job ids or why not)."""
    from .orchestrator import HostOutcome, PlaybookResult

    try:
        ids = slurm.submit_chain(pipeline, who)
    except SlurmUnreachable:
        raise
    except SlurmError as exc:
        result = PlaybookResult(ident="slurmrestd", status="failed", rc=1, artifacts="", hosts={})
        result.hosts["slurmrestd"] = HostOutcome(ok=False, message=str(exc), refused_by_slurm=True)
        return result
    result = PlaybookResult(ident="slurmrestd", status="successful", rc=0, artifacts="", hosts={})
    result.hosts["slurmrestd"] = HostOutcome(ok=True, results=ids)
    return result


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
    # Its scripts will never run (what reached Slurm is cancelled): nothing of it stays behind.
    _remove_instance_dir(ctx.store.state_dir, inst)


def _remove_instance_dir(state_dir: Path | str, inst: dict[str, Any]) -> None:
    """Remove the directory iosea-wf made for an instance, if it is one (under ``jobs/``)."""
    d = Path(inst.get("dir") or "")
    jobs_root = Path(state_dir) / "jobs"
    if d.parent.parent != jobs_root or not d.name.startswith(f"{inst['name']}."):
        return  # not a directory of ours: never removed
    shutil.rmtree(d, ignore_errors=True)


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


def refresh(ctx, session: dict[str, Any], *, strict: bool = False) -> dict[str, Any]:
    """Ask Slurm (one batch) for every unfinished job of the session; record what changed; return it.

    Slurm is asked outside the lock; what was learned is merged, per step instance and job id,
    into the record as the store holds it then (another command may have added an instance or an
    access meanwhile), which is what is returned. Final states are kept for good, live ones as the
    last known (shown while Slurm is unreachable). With Slurm unreachable the record is returned
    as it is, or, with ``strict``, SlurmUnreachable is raised.
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
    states: dict[str, slurm.JobState] = {}
    if pending_ids or extra:
        if strict:
            slurm.require_controller()
            states = slurm.job_states(pending_ids + extra)
        elif slurm.controller_up():
            states = slurm.job_states(pending_ids + extra)
    if not _learn(session, states):
        return session
    with ctx.store.transaction() as tx:
        current = _current(tx, session["id"])
        _learn(current, states)
        tx.put_session(current)
    return current


def _learn(session: dict[str, Any], states: dict[str, slurm.JobState]) -> bool:
    """Fold Slurm's answers into the instances and accesses of ``session``; True if a state is new."""
    changed = False
    for inst in session.get("steps", []):
        changed |= _apply(inst, states)
    for acc in session.get("accesses", []):
        js = states.get(acc.get("job_id"))
        if js and js.terminal and acc.get("state") != js.state:
            acc["state"], changed = js.state, True
        elif js and acc.get("live_state") != js.state:
            acc["live_state"], changed = js.state, True
    return changed


def _cancelled(entry: dict[str, Any]) -> bool:
    """True when a cancel of this job was asked (``cancel``) and Slurm says it was cancelled."""
    return bool(entry.get("cancelled_at")) and entry.get("state") == "CANCELLED"


def _apply(inst: dict[str, Any], states: dict[str, slurm.JobState]) -> bool:
    """Fold Slurm's answers into one step instance; return True when a state (final or live) is new.

    A live state (PENDING, RUNNING...) is recorded only when it changes: it is the last known one
    ``status`` shows while Slurm is unreachable, and a poll that learns nothing writes nothing.
    """
    changed = False

    def learn(entry: dict[str, Any]) -> None:
        nonlocal changed
        js = states.get(entry["job_id"]) if entry.get("job_id") else None
        if js is None or _final(entry.get("state")):
            return
        if js.terminal:
            entry.update(state=js.state, exit_code=js.exit_code, signal=js.signal, reason=js.reason)
            changed = True
        elif (entry.get("live_state"), entry.get("reason")) != (js.state, js.reason):
            entry.update(live_state=js.state, reason=js.reason)
            changed = True

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
            # One the user cancelled stays CANCELLED (it waits for Slurm to say so).
            and not m.get("cancelled_at")
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
        # A step that was cancelled is CANCELLED, not SKIPPED: its cancel was asked (`cancel`), or
        # its step_start movers were cancelled, not failed (`stop --force`, a scancel by hand).
        cancelled = inst.get("cancelled_at") or (
            inst.get("state") == "CANCELLED" and all(m["state"] == "CANCELLED" for m in failed_start)
        )
        if never and not cancelled:
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
        "user": inst.get("user"),
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


def cancel(ctx, session: dict[str, Any], step: str | None = None, instance: int | None = None) -> list[str]:
    """Cancel the unfinished jobs of one step instance (or of every run of the session) in one scancel.

    The targets are chosen in the current record, under the lock; an instance still SUBMITTING is
    marked so that its `run` cancels its jobs as soon as it has their ids. A user the session is
    shared with cancels their own runs only (one of another user's is Forbidden, exit 12).
    """
    who = slurm.acting_for(ctx.user, ctx.slurm_jwt)  # refused before anything is marked cancelled
    # With Slurm unreachable, exit 8 now: scancel would retry for ~18 s and fail.
    session = refresh(ctx, session, strict=True)
    is_owner = session["owner"] == ctx.user
    if step:
        found = find_instance(session, step, instance)  # SessionNotFound before any write
        if not is_owner and run_user(session, found) != ctx.user:
            raise Forbidden(
                f"instance {found['instance']} of step {step} is {run_user(session, found)}'s run: only "
                f"{session['owner']}, the session's owner, may cancel another user's run"
            )
    now = time.time()
    ids = []
    with ctx.store.transaction() as tx:
        current = _current(tx, session["id"])
        targets = [find_instance(current, step, instance)] if step else current.get("steps", [])
        if not is_owner:
            targets = [i for i in targets if run_user(current, i) == ctx.user]
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
    cancel_jobs(ctx, current, ids, who)
    return ids


def run_user(session: dict[str, Any], inst: dict[str, Any]) -> str:
    """Whose run a step instance is (records from before sharing: the owner's)."""
    return inst.get("user") or session["owner"]


def cancel_jobs(ctx, session: dict[str, Any], ids: list[str], who: slurm.OnBehalf | None) -> None:
    """Cancel jobs of a session: the caller's own with their token (``who``), others' as this process.

    Others' jobs are those of users the session is shared with, cancelled on its owner's word
    (the manager checked it): they are not the owner's in Slurm, so the owner's token cannot
    end them; the site's service can (as root, or as its account through the cancel-job helper).
    """
    owners: dict[str, str] = {}
    for inst in session.get("steps", []):
        for entry in [inst, *inst["datamovers"]]:
            if entry.get("job_id"):
                owners[entry["job_id"]] = run_user(session, inst)
    for acc in session.get("accesses", []):
        if acc.get("job_id"):
            owners[acc["job_id"]] = acc.get("user") or session["owner"]
    mine = [j for j in ids if owners.get(j, ctx.user) == ctx.user]
    others = [j for j in ids if j not in mine]
    if mine:
        slurm.cancel(mine, who)
    site_vars = ctx.site_of(session).variables if others else {}
    if others and privileged.in_use(site_vars):
        # The service's account has no power over them: its cancel-job helper ends each (as root).
        for job_id in others:
            privileged.cancel_job(site_vars, job_id)
    elif others:
        slurm.cancel(others)


def _chain_name(session: dict[str, Any], job_name: str) -> bool:
    """True when a job name is one `run` gives the jobs of this session (any instance)."""
    prefix = f"iosea.{session['name']}."
    if not job_name.startswith(prefix):
        return False
    wdf = session.get("wdf") or {}
    movers = {m.get("name") for m in wdf.get("datamovers", []) if isinstance(m, dict)}
    rest = job_name[len(prefix) :]
    for step in {i["name"] for i in session.get("steps", [])}:
        if not rest.startswith(step + "."):
            continue
        number, _, tail = rest[len(step) + 1 :].partition(".")
        if number.isdigit() and (not tail or (tail.startswith("dm.") and tail[3:] in movers)):
            return True
    return False


def cancel_unrecorded(ctx, session: dict[str, Any]) -> list[str]:
    """Cancel the unfinished jobs of the session's chains that no instance records; return their ids.

    A `run` cut short (interrupted, killed) may have had jobs accepted by Slurm that it never
    recorded: they carry the chain's names, and nothing else may, while the session lives; so
    does an allocation a `start` cut short between sbatch and its record.
    """
    from . import allocations

    if not slurm.controller_up():
        return []
    known = set(active_jobs(session)) | {j for inst in session.get("steps", []) for j in _job_ids(inst)}
    # A recorded allocation is the teardown's to cancel; one a `start` cut short never recorded is a stray.
    known |= set(allocations.recorded(session))
    ids = [
        job_id
        for job_id, name, state in slurm.user_jobs(session["owner"])
        if job_id not in known
        and state not in slurm.TERMINAL_STATES
        and (_chain_name(session, name) or allocations.is_allocation_name(session, name))
    ]
    if ids:
        slurm.cancel(ids, slurm.acting_for(ctx.user, ctx.slurm_jwt))
    return ids
