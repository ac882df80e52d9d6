"""Build the jobs of one step run: the step's batch script with its services attached, and the
data-mover jobs, as sbatch argument lists and generated scripts. Nothing here runs Slurm.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from .errors import UsageError

# sbatch options that take no value (everything else long without "=" takes the next word).
_SBATCH_FLAGS = {
    "-h", "--help", "-H", "--hold", "--ignore-pbs", "-O", "--overcommit", "-Q", "--quiet", "--requeue",
    "--no-requeue", "--parsable", "--test-only", "--usage", "-V", "--version", "-v", "--verbose",
    "-W", "--wait", "--exclusive", "--contiguous", "--spread-job", "--use-min-nodes", "-k", "--no-kill",
    "--reboot", "-s", "--oversubscribe", "--get-user-env", "--nice",
}  # fmt: skip
# Options iosea-wf sets itself: a WDF command that gives them is refused, since the job would not be
# tracked (--parsable, --wait) or would escape the session's placement (--dependency is ours).
_RESERVED = {"--parsable", "-W", "--wait", "-d", "--dependency", "--test-only"}


# sbatch copies every SLURM_* variable of its environment into the job's, the token root submitted
# with (SLURM_JWT) too: the job's own code never needs it.
_FORGET_TOKEN = "unset SLURM_JWT"


def parse_sbatch(command: str) -> tuple[list[str], list[str], str | None]:
    """Split a WDF ``sbatch ...`` command into (sbatch options, script and its args, --wrap text)."""
    words = shlex.split(command)
    if not words or words[0] != "sbatch":
        raise UsageError(f"a step command must be an sbatch command, got {command!r}")
    options: list[str] = []
    wrap = None
    i = 1
    while i < len(words):
        w = words[i]
        if not w.startswith("-") or w == "-":
            break
        name = w.split("=", 1)[0]
        if name in _RESERVED or (len(w) > 2 and not w.startswith("--") and w[:2] in _RESERVED):
            raise UsageError(
                f"step command option {name} is set by iosea-wf and cannot be given: {command!r}"
            )
        if name == "--wrap":
            wrap = w.split("=", 1)[1] if "=" in w else words[i + 1]
            i += 1 if "=" in w else 2
            continue
        options.append(w)
        if "=" in w or name in _SBATCH_FLAGS or (not w.startswith("--") and len(w) > 2):
            i += 1
        else:
            if i + 1 >= len(words):
                raise UsageError(f"option {w} of the step command needs a value: {command!r}")
            options.append(words[i + 1])
            i += 2
    rest = words[i:]
    if wrap is None and not rest:
        raise UsageError(f"the step command names no batch script: {command!r}")
    return options, rest, wrap


def _gives(options: list[str], *names: str) -> bool:
    return any(o.split("=", 1)[0] in names or (len(o) > 2 and o[:2] in names) for o in options)


def env_name(service: str) -> str:
    """The environment-variable stem of a service name."""
    return "IOSEA_SERVICE_" + re.sub(r"[^A-Za-z0-9]", "_", service).upper()


def service_environment(session: dict[str, Any], attached: list[dict[str, Any]]) -> dict[str, str]:
    """Connection information a job gets for its services."""
    env = {
        "IOSEA_SESSION": session["name"],
        "IOSEA_WORKFLOW": session["workflow"],
        "IOSEA_SERVICES": ",".join(s["name"] for s in attached),
    }
    for s in attached:
        stem = env_name(s["name"])
        env[f"{stem}_URL"] = s["url"]
        env[f"{stem}_MOUNTPOINT"] = s["mountpoint"]
        env[f"{stem}_MODE"] = s["mode"]
        env[f"{stem}_DATANODE"] = s["datanode"]
    return env


def _directives(script: Path) -> list[str]:
    """The #SBATCH lines at the top of a batch script (sbatch reads them only there)."""
    lines = []
    try:
        with open(script, errors="replace") as fh:
            for i, line in enumerate(fh):
                stripped = line.strip()
                if i == 0 and stripped.startswith("#!"):
                    continue
                if stripped.startswith("#SBATCH"):
                    lines.append(stripped)
                elif stripped and not stripped.startswith("#"):
                    break
    except OSError as exc:
        raise UsageError(f"cannot read the step's batch script {script}: {exc.strerror}") from None
    return lines


def _interpreter(script: Path) -> list[str]:
    try:
        with open(script, "rb") as fh:
            first = fh.readline(512).decode(errors="replace").strip()
    except OSError:
        first = ""
    return shlex.split(first[2:]) if first.startswith("#!") else ["/bin/sh"]


def attach_command(attached: list[dict[str, Any]], attach_mode: str, command: list[str]) -> list[str]:
    """``command`` wrapped so that it runs with the services attached the site's way."""
    if attach_mode != "bind" or not attached:
        return list(command)
    binds = []
    for s in attached:
        binds += ["--bind", f"{s['namespace']}:{s['mountpoint']}:{'ro' if s['mode'] == 'RO' else 'rw'}"]
    # iosea_wf.attach makes the job's namespaces itself: as root a private mount namespace, as
    # any other user a user namespace too, then maps the user's own uid back (see attach.py).
    return [sys.executable, "-m", "iosea_wf.attach", *binds, "--", *command]


def write_step_script(
    path: Path,
    *,
    cwd: str,
    script_and_args: list[str],
    wrap: str | None,
    env: dict[str, str],
    attached: list[dict[str, Any]],
    attach_mode: str,
) -> None:
    """Write the batch script that attaches the services and then runs the WDF's own script."""
    if wrap is not None:
        command = ["/bin/sh", "-c", wrap]
        directives: list[str] = []
    else:
        script = Path(cwd, script_and_args[0])
        if not script.is_file():
            raise UsageError(f"the step's batch script {script} does not exist")
        directives = _directives(script)
        command = [*_interpreter(script), str(script), *script_and_args[1:]]
    lines = [
        "#!/bin/bash",
        *directives,
        "# Generated by iosea-wf: attach the session's services, then run the step.",
        _FORGET_TOKEN,
    ]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append("exec " + shlex.join(attach_command(attached, attach_mode, command)))
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)


def step_argv(options: list[str], *, partition: str, job_name: str, cwd: str, script: Path) -> list[str]:
    """The sbatch argument list of the step job (the user's options first, then ours)."""
    argv = ["sbatch", "--parsable", *options]
    if not _gives(options, "-p", "--partition"):
        argv.append(f"--partition={partition}")
    argv += [f"--job-name={job_name}", f"--chdir={cwd}", str(script)]
    return argv


def mover_script(path: Path, tool: list[str], operation: str, source: str, target: str,
                 patterns: list[str], progress: Path | None) -> None:  # fmt: skip
    """Write the batch script of one data-mover job."""
    argv = [*tool, operation, "--source", source, "--target", target]
    if progress is not None:
        argv += ["--progress", str(progress)]
    argv += ["--", *patterns]
    bin_dir = os.path.dirname(sys.executable)
    lines = [
        "#!/bin/bash",
        "# Generated by iosea-wf: one data mover of a step.",
        _FORGET_TOKEN,
        f'export PATH={shlex.quote(bin_dir)}:"$PATH"',
        f"mkdir -p {shlex.quote(target)}",
        "exec " + shlex.join(argv),
    ]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)


def mover_argv(*, partition: str, job_name: str, output: Path, script: Path, cwd: str) -> list[str]:
    """The sbatch argument list of one data-mover job."""
    return [
        "sbatch", "--parsable", f"--partition={partition}", f"--job-name={job_name}", "--ntasks=1",
        f"--output={output}", f"--chdir={cwd}", str(script),
    ]  # fmt: skip
