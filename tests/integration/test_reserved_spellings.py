"""Reserved sbatch options in every spelling sbatch 22.05 takes, on the real local site: a step's
job is one job that `run` returns from, whatever the command's text or the caller's environment
says, in-process and through the Workflow Manager service (issue 14, finding 13).

Spellings measured with `sbatch -v --test-only` (its "defined options" dump): a `#PBS -t 1-3` line
anywhere in the submitted script makes a job array, so do SBATCH_ARRAY_INX in sbatch's
environment and `-Qa 1-2` in a #SBATCH line; SBATCH_WAIT and `-QW` make sbatch wait for the job.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.api_service import need_munge, running_service
from tests.integration.conftest import BIN
from tests.integration.sides import cli

WDF = """\
workflow:
  name: wf_spellings
steps:
  - name: pbs_in_wrap
    location: cpu_module
    command: "sbatch -o /dev/null --wrap 'sleep 4\\n#PBS -t 1-3\\n'"
  - name: clustered
    location: cpu_module
    command: "sbatch -o /dev/null job.sh"
"""
# What sbatch reads from its environment as a reserved option (made a job array / made it wait).
RESERVED_ENV = {"SBATCH_ARRAY_INX": "1-2", "SBATCH_WAIT": "1"}


def _scontrol(job_id: str) -> str:
    return subprocess.run(
        ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30
    ).stdout


def _check_one_plain_job(run, session: str) -> None:
    """``run(*argv)`` -> (code, out, err): the wrap step is submitted at once as one job, no array."""
    began = time.monotonic()
    code, out, err = run("run", f"SESSION={session}", "STEP=pbs_in_wrap", "--json")
    took = time.monotonic() - began
    assert code == 0, err
    job_id = json.loads(out)["job_id"]
    shown = _scontrol(job_id)
    # Before: ArrayJobId=... ArrayTaskId=1-3 (the #PBS line), and run waited for the job (SBATCH_WAIT).
    assert "ArrayJobId=" not in shown and "ArrayTaskId=" not in shown, shown
    assert "JobState=PENDING" in shown or "JobState=RUNNING" in shown, shown
    assert took < 4, f"run took {took:.1f} s: sbatch waited for the job"
    subprocess.run(["scancel", job_id], check=False, timeout=30)


def _check_clustered_directives_refused(run, work: Path, session: str) -> None:
    for line, reason in (("#SBATCH -QW", "would block"), ("#SBATCH -Qa 1-2", "job array")):
        (work / "job.sh").write_text(f"#!/bin/sh\n{line}\ntrue\n")
        code, _, err = run("run", f"SESSION={session}", "STEP=clustered")
        assert code == 2 and reason in err and "Traceback" not in err, (line, err)


def test_reserved_spellings_in_process(iosea, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, value in RESERVED_ENV.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "wdf.yaml").write_text(WDF)
    session = f"spell-{os.getpid()}"
    assert iosea("start", "WORKFLOW=wdf.yaml", f"SESSION={session}").code == 0

    def run(*argv):
        r = iosea(*argv)
        return r.code, r.out, r.err

    try:
        _check_one_plain_job(run, session)
        _check_clustered_directives_refused(run, tmp_path, session)
    finally:
        assert iosea("stop", f"SESSION={session}", "--force").code == 0


@pytest.fixture(scope="module")
def service_with_reserved_env():
    """The service on a temporary socket, started with the reserved SBATCH_* variables set."""
    need_munge()
    folder = Path(tempfile.mkdtemp(prefix="iosea-wf-wm-", dir="/tmp"))
    saved = {k: os.environ.get(k) for k in RESERVED_ENV}
    os.environ.update(RESERVED_ENV)
    try:
        with running_service(folder / "wm.sock", folder / "state"):
            yield f"unix://{folder / 'wm.sock'}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(folder, ignore_errors=True)


def test_reserved_spellings_through_the_service(service_with_reserved_env, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "IOSEA_WF_HOME"}
    env.update(IOSEA_WF_URL=service_with_reserved_env, PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")

    def run(*argv):
        p = cli(env, tmp_path, *argv, timeout=180)
        return p.returncode, p.stdout, p.stderr

    (tmp_path / "wdf.yaml").write_text(WDF)
    session = f"spell-svc-{os.getpid()}"
    code, _, err = run("start", "WORKFLOW=wdf.yaml", f"SESSION={session}")
    assert code == 0, err
    try:
        _check_one_plain_job(run, session)
        _check_clustered_directives_refused(run, tmp_path, session)
    finally:
        assert run("stop", f"SESSION={session}", "--force")[0] == 0


def _sbatch_reads(word: str) -> str:
    """The long option sbatch takes ``--WORD`` for, "ambiguous", "unknown" or "takes-it" (an
    option with an optional value, whose name getopt does not print). Nothing reaches slurmctld:
    each call ends at option parsing or at the empty script read from /dev/null."""
    err = subprocess.run(
        ["sbatch", f"--{word}"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30
    ).stderr
    if "is ambiguous" in err:
        return "ambiguous"
    if "unrecognized option" in err:
        return "unknown"
    if "requires an argument" in err:
        return err.split("option '--")[1].split("'")[0]
    err = subprocess.run(
        ["sbatch", f"--{word}=1"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30
    ).stderr
    if "doesn't allow an argument" in err:
        return err.split("option '--")[1].split("'")[0]
    return "takes-it"


def test_every_prefix_of_a_reserved_option_is_judged_as_sbatch_reads_it():
    # parse_sbatch resolves prefixes over jobs.SBATCH_OPTIONS: that table must be sbatch's own.
    from iosea_wf import jobs
    from iosea_wf.errors import UsageError

    for name, kind in jobs.SBATCH_OPTIONS.items():
        assert _sbatch_reads(name) == (name if kind != "optional" else "takes-it"), name
    for reserved in jobs.RESERVED_OPTIONS:
        for end in range(1, len(reserved) + 1):
            prefix = reserved[:end]
            try:
                ours = jobs._resolve(prefix, "sbatch")
            except UsageError as exc:
                ours = "ambiguous" if "ambiguous" in exc.message else "unknown"
            assert ours == _sbatch_reads(prefix), prefix
            if ours == reserved:
                with pytest.raises(UsageError, match=f"cannot give --{prefix}"):
                    jobs.parse_sbatch(
                        f"sbatch --{prefix}{'=1' if jobs.SBATCH_OPTIONS[ours] == 'required' else ''} job.sh"
                    )
