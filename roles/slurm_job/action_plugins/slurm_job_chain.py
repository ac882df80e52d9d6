"""Action plugin: submit one step pipeline to Slurm as jobs chained by dependencies.

Why an action plugin rather than three ``ansible.builtin.command`` loops: each ``command`` task
starts a Python interpreter on the target to run its module (about 0.4 s a task here), which
made submission the largest cost of ``iosea-wf run``. This action runs every ``sbatch`` of the
chain through the host's connection (``_low_level_execute_command``, as ``raw`` does), so it
works the same over ``local`` and SSH connections and costs only what ``sbatch`` costs.

Each command is an argument list joined with ``shlex.join``: the shell only ever sees quoted
words, never text from a WDF spliced into a command string.

Arguments (see ../README.md): ``pipeline`` with ``cwd``, ``start_movers``, ``step`` and
``stop_movers``; every argv is a full ``sbatch --parsable`` argument list whose last word is the
batch script (``--dependency`` is inserted before it: after it, sbatch would pass it to the
script). Returns ``job_ids``: ``{start_movers: [...], step: ID, stop_movers: [...]}``. When an
``sbatch`` is refused, what was already submitted is cancelled and the task fails with sbatch's
own message; ``sbatch_refused`` is then true when sbatch itself answered (it rejected an option,
or slurmctld refused the job or could not be reached), false when the shell or connection failed
before sbatch ran (e.g. a missing ``cwd``): the caller maps the first to a Slurm error.
"""

from __future__ import annotations

import shlex

from ansible.plugins.action import ActionBase


class SubmissionRefused(Exception):
    """sbatch (or the connection) refused one job of the chain."""

    def __init__(self, reason: str, by_sbatch: bool):
        super().__init__(reason)
        self.by_sbatch = by_sbatch


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _VALID_ARGS = frozenset(("pipeline",))

    def _sh(self, argv: list[str], cwd: str) -> dict:
        command = f"cd {shlex.quote(cwd)} && {shlex.join(argv)}"
        return self._low_level_execute_command(command, sudoable=False)

    def _sbatch(self, argv: list[str], cwd: str, dependency: list[str]) -> str:
        words = [str(w) for w in argv]
        if dependency:
            words = words[:-1] + ["--dependency=afterok:" + ":".join(dependency)] + words[-1:]
        out = self._sh(words, cwd)
        job_id = (out.get("stdout") or "").strip().split(";")[0]
        if out.get("rc") != 0 or not job_id.isdigit():
            reason = (out.get("stderr") or out.get("stdout") or f"rc={out.get('rc')}").strip()
            # Every refusal of sbatch's own (bad option, job slurmctld will not take) says so.
            raise SubmissionRefused(reason, by_sbatch="sbatch: error:" in reason)
        return job_id

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        del tmp
        pipeline = self._task.args.get("pipeline") or {}
        step = pipeline.get("step") or {}
        argv = step.get("argv") or []
        cwd = pipeline.get("cwd")
        if not cwd or not argv or argv[0] != "sbatch" or str(argv[-1]).startswith("-"):
            result.update(
                failed=True,
                msg="pipeline needs cwd and step.argv starting with sbatch and ending with the batch script",
            )
            return result
        if self._task.check_mode:
            result.update(skipped=True, msg="not submitted in check mode")
            return result

        submitted: list[str] = []
        ids = {"start_movers": [], "step": None, "stop_movers": []}
        try:
            for mover in pipeline.get("start_movers") or []:
                ids["start_movers"].append(self._sbatch(mover["argv"], cwd, []))
                submitted.append(ids["start_movers"][-1])
            ids["step"] = self._sbatch(argv, cwd, ids["start_movers"])
            submitted.append(ids["step"])
            for mover in pipeline.get("stop_movers") or []:
                ids["stop_movers"].append(self._sbatch(mover["argv"], cwd, [ids["step"]]))
                submitted.append(ids["stop_movers"][-1])
        except SubmissionRefused as exc:
            if submitted:
                self._sh(["scancel", *submitted], "/")
            result.update(
                failed=True,
                changed=bool(submitted),
                msg=f"sbatch refused the job: {exc}",
                sbatch_refused=exc.by_sbatch,
                cancelled=submitted,
            )
            return result
        result.update(changed=True, job_ids=ids)
        return result
