"""Build the jobs of one step run: the step's batch script with its services attached, and the
data-mover jobs, as sbatch argument lists and generated scripts. Nothing here runs Slurm.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from .errors import UsageError

# sbatch's options (Slurm 22.05, as its getopt table accepts them on this site): long name -> how
# it takes a value: "required" (``--name=V`` or ``--name V``), "optional" (only ``--name=V``) or
# "none". Measured with sbatch itself (``--test-only``, one probe per option).
_REQUIRED = (
    "account acctg-freq array batch bb bbf begin chdir cluster cluster-constraint clusters comment "
    "constraint container context core-spec cores-per-socket cpu-freq cpus-per-gpu cpus-per-task "
    "deadline delay-boot dependency distribution error exclude export export-file extra-node-info gid "
    "gpu-bind gpu-freq gpus gpus-per-node gpus-per-socket gpus-per-task gres gres-flags hint input "
    "job-name kill-on-invalid-dep licenses mail-type mail-user mcs-label mem mem-bind mem-per-cpu "
    "mem-per-gpu mincpus network nodefile nodelist nodes ntasks ntasks-per-core ntasks-per-gpu "
    "ntasks-per-node ntasks-per-socket ntasks-per-tres open-mode output partition power prefer "
    "priority profile qos reservation signal sockets-per-node switches tasks-per-node thread-spec "
    "threads-per-core time time-min tmp uid wait-all-nodes wckey wrap"
)
_NONE = (
    "contiguous help hold ignore-pbs no-requeue overcommit oversubscribe parsable quiet reboot requeue "
    "spread-job test-only usage use-min-nodes verbose version wait"
)
_OPTIONAL = "exclusive get-user-env nice no-kill propagate"
SBATCH_OPTIONS: dict[str, str] = {
    **dict.fromkeys(_REQUIRED.split(), "required"),
    **dict.fromkeys(_NONE.split(), "none"),
    **dict.fromkeys(_OPTIONAL.split(), "optional"),
}
# Short options and the long option each stands for; those in _SHORT_WITH_VALUE take a value.
SBATCH_SHORT = {
    "a": "array", "b": "begin", "c": "cpus-per-task", "d": "dependency", "e": "error", "i": "input",
    "m": "distribution", "n": "ntasks", "o": "output", "p": "partition", "q": "qos", "t": "time",
    "w": "nodelist", "x": "exclude", "A": "account", "B": "extra-node-info", "C": "constraint",
    "D": "chdir", "F": "nodefile", "G": "gpus", "J": "job-name", "L": "licenses", "M": "clusters",
    "N": "nodes", "S": "core-spec", "h": "help", "k": "no-kill", "s": "oversubscribe", "v": "verbose",
    "H": "hold", "O": "overcommit", "Q": "quiet", "V": "version", "W": "wait",
}  # fmt: skip
_SHORT_WITH_VALUE = set("abcdeimnopqtwxABCDFGJLMNS")

# Options a WDF step command may not give, and why. iosea-wf sets some itself, the others would
# make a job it cannot track or run as the session's owner.
RESERVED_OPTIONS = {
    "parsable": "iosea-wf sets it itself to read the job id",
    "dependency": "iosea-wf sets it itself to chain the step after its data movers",
    "job-name": "iosea-wf names the job after the session, step and instance",
    "chdir": "the job runs in the directory `run` is called from",
    "wait": "sbatch would block until the job ends instead of returning its id",
    "test-only": "no job would be submitted",
    "array": "a job array cannot be tracked as one step instance",
    "clusters": "the job would run on another cluster, where iosea-wf cannot track it",
    "cluster": "the job would run on another cluster, where iosea-wf cannot track it",
    "uid": "the job runs as the session's owner",
    "gid": "the job runs with the session owner's groups",
    "help": "sbatch would print help and submit nothing",
    "usage": "sbatch would print its usage and submit nothing",
    "version": "sbatch would print its version and submit nothing",
}
_PARTITION_REASON = "the step gives a `location`, which chooses the partition"


class SbatchCommand(NamedTuple):
    """A step command split by :func:`parse_sbatch`: options (``--name[=value]``), script, --wrap."""

    options: list[str]
    script_and_args: list[str]
    wrap: str | None

    def gives(self, name: str) -> bool:
        """True if the options set the long option ``name``."""
        return _gives(self.options, name)


def _resolve(given: str, command: str) -> str:
    """The long option ``given`` (without ``--``) stands for, as sbatch's getopt resolves prefixes."""
    if given in SBATCH_OPTIONS:
        return given
    matches = [name for name in SBATCH_OPTIONS if name.startswith(given)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        # sbatch itself refuses an ambiguous prefix.
        raise UsageError(
            f"option --{given} of the step command is ambiguous: it could be "
            + ", ".join(f"--{m}" for m in sorted(matches))
        )
    raise UsageError(f"sbatch has no option --{given} (step command {command!r})")


def _check_option(name: str, spelled: str, command: str, *, location_given: bool) -> None:
    reason = RESERVED_OPTIONS.get(name)
    if reason is None and name == "partition" and location_given:
        reason = _PARTITION_REASON
    if reason is not None:
        shown = spelled if spelled == f"--{name}" else f"{spelled} (that is --{name})"
        raise UsageError(f"the step command cannot give {shown}: {reason}")


def parse_sbatch(command: str, *, location_given: bool = False) -> SbatchCommand:
    """Split and check a WDF ``sbatch ...`` command: the one place its options are judged.

    ``validate``, ``start`` and ``run`` all come here, so a command ``run`` would refuse never
    validates. Long options may be abbreviated as sbatch allows (``--depend`` is
    ``--dependency``); the options come back as ``--name[=value]``. UsageError says why not.
    """
    try:
        words = shlex.split(command)
    except ValueError as exc:
        raise UsageError(f"cannot split the step command into words: {exc}") from None
    if not words or words[0] != "sbatch":
        first = words[0] if words else ""
        raise UsageError(
            f"a step command must be an sbatch command, not {first!r}: the job of any other command "
            "could not be tracked by the workflow manager"
        )
    options: list[str] = []
    wrap = None
    i = 1
    while i < len(words):
        w = words[i]
        if w == "--":
            i += 1
            break
        if not w.startswith("-") or w == "-":
            break
        if w.startswith("--"):
            given, eq, value = w[2:].partition("=")
            name = _resolve(given, command)
            _check_option(name, f"--{given}", command, location_given=location_given)
            kind = SBATCH_OPTIONS[name]
            if kind == "none" and eq:
                raise UsageError(f"option --{name} of the step command takes no value: {command!r}")
            if kind == "required" and not eq:
                if i + 1 >= len(words):
                    raise UsageError(f"option --{name} of the step command needs a value: {command!r}")
                value, eq = words[i + 1], "="
                i += 1
            i += 1
        else:
            # A cluster of short options (-vQ), the last of which may take a value (-N2, -N 2).
            j, name, eq, value = 1, "", "", ""
            while j < len(w):
                letter = w[j]
                if letter not in SBATCH_SHORT:
                    raise UsageError(f"sbatch has no option -{letter} (step command {command!r})")
                name = SBATCH_SHORT[letter]
                _check_option(name, f"-{letter}", command, location_given=location_given)
                j += 1
                if letter in _SHORT_WITH_VALUE:
                    if j < len(w):
                        value, eq = w[j:], "="
                    elif i + 1 < len(words):
                        value, eq = words[i + 1], "="
                        i += 1
                    else:
                        raise UsageError(f"option -{letter} of the step command needs a value: {command!r}")
                    break
                if j < len(w):
                    options.append(f"--{name}")
            i += 1
        if name == "wrap":
            wrap = value
        else:
            options.append(f"--{name}={value}" if eq else f"--{name}")
    rest = words[i:]
    if ":" in rest[:1]:
        raise UsageError(f"heterogeneous jobs (':' between option groups) are not supported: {command!r}")
    if wrap is not None and rest:
        raise UsageError(f"the step command gives both --wrap and a batch script: {command!r}")
    if wrap is None and not rest:
        raise UsageError(f"the step command names no batch script: {command!r}")
    return SbatchCommand(options, rest, wrap)


# In a script's #SBATCH lines, options iosea-wf also gives on the command line are overridden by
# it (sbatch: the command line wins); the others would still break tracking.
_OVERRIDDEN_IN_SCRIPT = {"parsable", "job-name", "chdir", "partition"}


def check_directives(directives: list[str], script: str) -> None:
    """Refuse ``#SBATCH`` lines of the step's script that give a reserved option (UsageError).

    Each line is read as sbatch reads it: long options by unambiguous prefix, short options in
    clusters (``-QW`` is ``--quiet --wait``), a value taken from the rest of its word or the next.
    """
    for name, _value, spelled, line in _read_directives(directives):
        _refuse_in_script(name, spelled, line, script)


def script_directives(text: str) -> list[str]:
    """The options of a batch script's #SBATCH lines as ``--name[=value]``, read as sbatch reads them.

    For a job submitted through slurmrestd, which does not read them (iosea_wf.slurm): the same
    reading as :func:`check_directives` (prefixes, short clusters, values in the next word).
    """
    return [
        f"--{name}={value}" if value is not None else f"--{name}"
        for name, value, _spelled, _line in _read_directives(_directive_lines(text.splitlines()))
    ]


def _read_directives(directives: list[str]) -> Iterator[tuple[str, str | None, str, str]]:
    """(option's full name, its value or None, the word that gave it, the line) of #SBATCH lines.

    Read as sbatch reads them; what sbatch itself refuses (bad quoting, an unknown or ambiguous
    option) is skipped: sbatch says what is wrong with it.
    """
    for line in directives:
        try:
            words = shlex.split(line[len("#SBATCH") :], comments=True)
        except ValueError:
            continue
        i = 0
        while i < len(words):
            w = words[i]
            i += 1
            if not w.startswith("-") or w == "-":
                continue
            if w.startswith("--"):
                given, eq, value = w[2:].partition("=")
                try:
                    name = _resolve(given, line)
                except UsageError:
                    continue
                if SBATCH_OPTIONS[name] == "required" and not eq:
                    value, eq = (words[i], "=") if i < len(words) else ("", "")
                    i += 1
                yield name, (value if eq else None), w, line
                continue
            for j, letter in enumerate(w[1:], start=2):
                if letter not in SBATCH_SHORT:
                    break
                name = SBATCH_SHORT[letter]
                if letter in _SHORT_WITH_VALUE:
                    if j < len(w):
                        yield name, w[j:], w, line
                    else:  # no value left in the word: it is the next one
                        if i < len(words):
                            yield name, words[i], w, line
                        else:
                            yield name, None, w, line
                        i += 1
                    break
                yield name, None, w, line


def _directive_lines(lines) -> list[str]:
    """The #SBATCH lines at the top of a script's lines (sbatch reads them only there)."""
    found = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if i == 0 and stripped.startswith("#!"):
            continue
        if stripped.startswith("#SBATCH"):
            found.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return found


def _refuse_in_script(name: str, spelled: str, line: str, script: str) -> None:
    if name in RESERVED_OPTIONS and name not in _OVERRIDDEN_IN_SCRIPT:
        raise UsageError(
            f"the step's batch script {script} has '{line}': {spelled} cannot be given "
            f"({RESERVED_OPTIONS[name]})"
        )


def _gives(options: list[str], *names: str) -> bool:
    """True if ``options`` (as :func:`parse_sbatch` returns them) set any of the long ``names``."""
    wanted = {n.lstrip("-") for n in names}
    return any(o[2:].split("=", 1)[0] in wanted for o in options)


# sbatch copies every SLURM_* variable of its environment into the job's, the token root submitted
# with (SLURM_JWT) too: the job's own code never needs it.
_FORGET_TOKEN = "unset SLURM_JWT"


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
    try:
        with open(script, errors="replace") as fh:
            return _directive_lines(fh)
    except OSError as exc:
        raise UsageError(f"cannot read the step's batch script {script}: {exc.strerror}") from None


def _interpreter(script: Path) -> list[str]:
    try:
        with open(script, "rb") as fh:
            first = fh.readline(512).decode(errors="replace").strip()
    except OSError:
        first = ""
    return shlex.split(first[2:]) if first.startswith("#!") else ["/bin/sh"]


# What needs iosea_wf.attach inside the job (``env`` only sets variables).
ATTACH_WRAPPED = ("bind", "nfs")


def attach_command(attached: list[dict[str, Any]], attach_mode: str, command: list[str]) -> list[str]:
    """``command`` wrapped so that it runs with the services attached the site's way.

    ``bind``: each namespace bound at its mountpoint; ``nfs``: each service's export mounted there
    through the user's FUSE NFS client, so the job's I/O goes through the service's server.
    """
    if attach_mode not in ATTACH_WRAPPED or not attached:
        return list(command)
    specs = []
    for s in attached:
        mode = "ro" if s["mode"] == "RO" else "rw"
        if attach_mode == "nfs":
            specs += ["--nfs", f"{s['url']}:{s['mountpoint']}:{mode}"]
        else:
            specs += ["--bind", f"{s['namespace']}:{s['mountpoint']}:{mode}"]
    # iosea_wf.attach makes the job's namespaces itself: as root a private mount namespace, as
    # any other user a user namespace too, then maps the user's own uid back (see attach.py).
    return [sys.executable, "-m", "iosea_wf.attach", *specs, "--", *command]


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
        check_directives(directives, str(script))
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
    if not _gives(options, "partition"):
        argv.append(f"--partition={partition}")
    # sbatch also reads #PBS lines anywhere in a script (``#PBS -t 1-3`` makes a job array): in the
    # generated script such a line can only come from a command's own text (a --wrap or an
    # argument holding a newline), never from the step's script, whose directives are not copied.
    argv += [f"--job-name={job_name}", f"--chdir={cwd}", "--ignore-pbs", str(script)]
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
