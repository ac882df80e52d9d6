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

``pipeline.user_dirs`` (``[{path, user}]``): directories (a storage tier's directory of the user)
made before anything is submitted: created 0700 and given to the user when missing, never
through a symlink, and checked to be a 0700 directory of that user (else nothing is submitted).

``token_file`` (optional): a file on this (the Ansible controller's) side holding the Slurm token
of the user the jobs are submitted for. It is read and removed at once; the token then travels
to each ``sbatch``/``scancel`` on its standard input and into its environment as ``SLURM_JWT``,
never on a command line, and is never part of the result.

``report`` (instead of the others): the registered result of a submission whose task had
``no_log`` and did not fail. When it submitted, this returns its ``job_ids`` as ``msg`` (what the
orchestrator reads); otherwise this fails with its message, ``sbatch_refused`` and ``cancelled``
(none of which can hold the token), so the failure reaches the caller's events.
"""

from __future__ import annotations

import contextlib
import os
import shlex

from ansible.plugins.action import ActionBase

# Reads the token from stdin into the environment of the command that follows (not its argv).
_WITH_TOKEN = "IFS= read -r SLURM_JWT && export SLURM_JWT && "

# sbatch's input variables that set an option the step command may not give (iosea_wf.jobs
# RESERVED_OPTIONS), measured with `sbatch -v --test-only` on 22.05: the caller's environment
# reaches sbatch in-process, so `SBATCH_ARRAY_INX=1-2 iosea-wf run ...` made a job array.
_RESERVED_ENV = ("SBATCH_ARRAY_INX", "SBATCH_CLUSTERS", "SLURM_CLUSTERS", "SBATCH_WAIT")

# Arguments: pairs of (directory, user). mkdir is atomic, so a directory this shell created is
# changed (chown -h) before anyone else can touch it (a tier is sticky, like /tmp). One that
# existed with another mode is re-moded from inside it (chmod .), after checking that the
# directory entered is the user's: a symlink planted in its place can never make root change
# a file that is not the user's.
_USER_DIRS = r"""
me=$(id -un)
while [ $# -ge 2 ]; do
  d=$1; u=$2; shift 2
  if mkdir -m 700 -- "$d" 2>/dev/null && [ "$me" != "$u" ]; then
    chown -h -- "$u:" "$d" || exit 1
  fi
  found=$(stat -c '%F|%U|%a' -- "$d" 2>&1) || { echo "cannot create $d: $found" >&2; exit 1; }
  if [ "$found" = "directory|$u|${found##*|}" ] && [ "${found##*|}" != 700 ]; then
    (cd -- "$d" && [ "$(stat -c %U .)" = "$u" ] && chmod 700 .)
    found=$(stat -c '%F|%U|%a' -- "$d")
  fi
  [ "$found" = "directory|$u|700" ] || {
    echo "$d must be a directory of $u with mode 0700, found: $found" >&2; exit 1; }
done
"""


class SubmissionRefused(Exception):
    """sbatch (or the connection) refused one job of the chain."""

    def __init__(self, reason: str, by_sbatch: bool):
        super().__init__(reason)
        self.by_sbatch = by_sbatch


def _read_token(path: str) -> str:
    """The token in ``path``; the file is removed whatever happens."""
    if not path:
        return ""
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read().strip()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _VALID_ARGS = frozenset(("pipeline", "token_file", "report"))
    _token = ""

    def _sh(self, argv: list[str], cwd: str) -> dict:
        command = f"cd {shlex.quote(cwd)} && unset {' '.join(_RESERVED_ENV)} && {shlex.join(argv)}"
        if not self._token:
            return self._low_level_execute_command(command, sudoable=False)
        return self._low_level_execute_command(
            _WITH_TOKEN + command, sudoable=False, in_data=(self._token + "\n").encode()
        )

    def _user_dirs(self, dirs: list[dict]) -> str | None:
        """Make each user directory; return what went wrong, or None."""
        if not dirs:
            return None
        words = [w for d in dirs for w in (str(d["path"]), str(d["user"]))]
        out = self._low_level_execute_command(shlex.join(["sh", "-c", _USER_DIRS, "user-dirs", *words]))
        if out.get("rc") != 0:
            return (out.get("stderr") or out.get("stdout") or f"rc={out.get('rc')}").strip()
        return None

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
        report = self._task.args.get("report")
        if report is not None:
            if isinstance(report.get("job_ids"), dict) and not report.get("failed"):
                result.update(changed=False, msg=report["job_ids"])
                return result
            result.update(
                failed=True,
                msg=str(report.get("msg") or "the submission failed without a message"),
                sbatch_refused=bool(report.get("sbatch_refused")),
                cancelled=list(report.get("cancelled") or []),
            )
            return result
        try:
            self._token = _read_token(str(self._task.args.get("token_file") or ""))
        except OSError as exc:
            result.update(failed=True, msg=f"cannot read the user's Slurm token: {exc.strerror}")
            return result
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
        problem = self._user_dirs(pipeline.get("user_dirs") or [])
        if problem:
            result.update(failed=True, msg=f"nothing submitted: {problem}")
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
