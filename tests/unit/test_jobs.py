"""Building the jobs of a step run: sbatch command parsing and generated scripts (no Slurm)."""

from __future__ import annotations

import subprocess

import pytest

from iosea_wf import jobs
from iosea_wf.errors import UsageError


@pytest.mark.parametrize(
    "command, options, rest, wrap",
    [
        ("sbatch My_Step_A", [], ["My_Step_A"], None),
        ("sbatch -N 2 -t 10 job.sh a b", ["--nodes=2", "--time=10"], ["job.sh", "a", "b"], None),
        (
            "sbatch -N2 --time=10 --exclusive job.sh",
            ["--nodes=2", "--time=10", "--exclusive"],
            ["job.sh"],
            None,
        ),
        ("sbatch --mem 100 --hold job.sh -x", ["--mem=100", "--hold"], ["job.sh", "-x"], None),
        ("sbatch -p gpu --wrap 'echo hi'", ["--partition=gpu"], [], "echo hi"),
        ("sbatch --wrap='echo hi'", [], [], "echo hi"),
        # Unambiguous prefixes, as sbatch's getopt accepts them, come back spelled out.
        (
            "sbatch --cpus-per-t 2 --ntasks-per-n=4 --wr=true",
            ["--cpus-per-task=2", "--ntasks-per-node=4"],
            [],
            "true",
        ),
        ("sbatch -vHN1 job.sh", ["--verbose", "--hold", "--nodes=1"], ["job.sh"], None),
        ("sbatch --nice --exclusive=user -- -job.sh", ["--nice", "--exclusive=user"], ["-job.sh"], None),
    ],
)
def test_parse_sbatch(command, options, rest, wrap):
    assert jobs.parse_sbatch(command) == (options, rest, wrap)


@pytest.mark.parametrize(
    "command, fragment",
    [
        ("srun job.sh", "must be an sbatch command"),
        ("sbatch", "names no batch script"),
        ("sbatch 'job.sh", "cannot split"),
        ("sbatch --parsable job.sh", "cannot give --parsable: iosea-wf sets it"),
        ("sbatch --wait job.sh", "cannot give --wait"),
        ("sbatch -W job.sh", "cannot give -W (that is --wait)"),
        ("sbatch -vW job.sh", "cannot give -W (that is --wait)"),
        ("sbatch -d afterok:1 job.sh", "cannot give -d (that is --dependency)"),
        ("sbatch --dependency=afterok:1 job.sh", "cannot give --dependency"),
        ("sbatch --depend=afterok:1 job.sh", "cannot give --depend (that is --dependency)"),
        ("sbatch --test-on job.sh", "cannot give --test-on (that is --test-only)"),
        ("sbatch --te job.sh", "cannot give --te (that is --test-only)"),
        ("sbatch --job-name=x job.sh", "cannot give --job-name"),
        ("sbatch -Jx job.sh", "cannot give -J (that is --job-name)"),
        ("sbatch --chdir /x job.sh", "cannot give --chdir"),
        ("sbatch --array=1-3 job.sh", "job array"),
        ("sbatch -M other job.sh", "another cluster"),
        ("sbatch --uid=0 job.sh", "session's owner"),
        ("sbatch --pa job.sh", "ambiguous: it could be --parsable, --partition"),
        ("sbatch --frobnicate job.sh", "sbatch has no option --frobnicate"),
        ("sbatch -Z job.sh", "sbatch has no option -Z"),
        ("sbatch --hold=1 job.sh", "takes no value"),
        ("sbatch -t", "needs a value"),
        ("sbatch --time", "needs a value"),
        ("sbatch -N1 : -N2 job.sh", "heterogeneous"),
        ("sbatch --wrap=true job.sh", "both --wrap and a batch script"),
    ],
)
def test_parse_sbatch_refuses(command, fragment):
    with pytest.raises(UsageError) as exc:
        jobs.parse_sbatch(command)
    assert fragment in str(exc.value)


@pytest.mark.parametrize(
    "command", ["sbatch -p gpu job.sh", "sbatch --part=gpu job.sh", "sbatch -pgpu job.sh"]
)
def test_partition_is_refused_only_when_the_step_gives_a_location(command):
    assert jobs.parse_sbatch(command).gives("partition")
    with pytest.raises(UsageError) as exc:
        jobs.parse_sbatch(command, location_given=True)
    assert "the step gives a `location`" in str(exc.value)


def test_every_reserved_option_is_an_sbatch_option():
    assert set(jobs.RESERVED_OPTIONS) <= set(jobs.SBATCH_OPTIONS)
    assert set(jobs.SBATCH_SHORT.values()) <= set(jobs.SBATCH_OPTIONS)


def test_step_argv_keeps_user_partition_and_adds_ours():
    options = jobs.parse_sbatch("sbatch -p mine job.sh").options
    argv = jobs.step_argv(options, partition="gpu", job_name="iosea.s.a.1", cwd="/w", script="/x/step.sh")
    assert argv[:3] == ["sbatch", "--parsable", "--partition=mine"]
    assert "--partition=gpu" not in argv
    argv = jobs.step_argv([], partition="gpu", job_name="iosea.s.a.1", cwd="/w", script="/x/step.sh")
    assert "--partition=gpu" in argv and "--job-name=iosea.s.a.1" in argv and argv[-1] == "/x/step.sh"
    # A #PBS line anywhere in the generated script (from a --wrap's text) would be read by sbatch.
    assert "--ignore-pbs" in argv


def test_service_environment_names():
    session = {"name": "s1", "workflow": "wf"}
    env = jobs.service_environment(
        session,
        [{"name": "es-1", "url": "nfs://h/p", "mountpoint": "/mnt/x", "mode": "RO", "datanode": "dn1"}],
    )
    assert env["IOSEA_SESSION"] == "s1"
    assert env["IOSEA_SERVICE_ES_1_URL"] == "nfs://h/p"
    assert env["IOSEA_SERVICE_ES_1_MODE"] == "RO"


def test_step_script_copies_directives_and_runs_the_script(tmp_path):
    user = tmp_path / "job.sh"
    user.write_text('#!/bin/bash\n#SBATCH --time=5\n#SBATCH -o out-%j\necho "args: $*" "$IOSEA_SESSION"\n')
    out = tmp_path / "step.sh"
    jobs.write_step_script(
        out,
        cwd=str(tmp_path),
        script_and_args=["job.sh", "a b", "c"],
        wrap=None,
        env={"IOSEA_SESSION": "it's"},
        attached=[],
        attach_mode="env",
    )
    text = out.read_text()
    assert "#SBATCH --time=5" in text and "#SBATCH -o out-%j" in text
    res = subprocess.run([str(out)], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "args: a b c it's"


def test_step_script_binds_services_read_only(tmp_path):
    ns = tmp_path / "ns"
    ns.mkdir()
    (ns / "data.txt").write_text("payload\n")
    user = tmp_path / "job.sh"
    user.write_text(
        '#!/bin/sh\ncat "$M/data.txt"\n'
        'if touch "$M/new" 2>/dev/null; then echo writable; else echo readonly; fi\n'
    )
    mnt = tmp_path / "mnt" / "ES1"
    out = tmp_path / "step.sh"
    jobs.write_step_script(
        out,
        cwd=str(tmp_path),
        script_and_args=["job.sh"],
        wrap=None,
        env={"M": str(mnt)},
        attached=[{"name": "es", "namespace": str(ns), "mountpoint": str(mnt), "mode": "RO"}],
        attach_mode="bind",
    )
    res = subprocess.run([str(out)], capture_output=True, text=True)
    if "unshare failed" in res.stderr or "Operation not permitted" in res.stderr:
        pytest.skip("no mount namespaces here")
    assert res.stdout.split() == ["payload", "readonly"], res.stderr
    assert not (ns / "new").exists()
    # The bind, and the mountpoint made for it, lived only in the job's mount namespace.
    assert not mnt.exists() and not mnt.parent.exists()


def test_mover_script_is_an_argument_list(tmp_path):
    out = tmp_path / "mover.sh"
    jobs.mover_script(
        out, ["iosea-wf-mover"], "move", "/ns x", "/tier/t", ["gauges/*.hdf5"], tmp_path / "p.json"
    )
    last = out.read_text().splitlines()[-1]
    assert last.startswith("exec iosea-wf-mover move --source '/ns x' --target /tier/t --progress ")
    assert last.endswith("-- 'gauges/*.hdf5'")


@pytest.mark.parametrize(
    "directive, refused",
    [
        ("#SBATCH --wait", True),
        ("#SBATCH -W", True),
        ("#SBATCH --test-on", True),
        ("#SBATCH --depend=afterok:1", True),
        ("#SBATCH --array=1-4 # a comment", True),
        ("#SBATCH --job-name=mine", False),  # the command line's --job-name wins
        ("#SBATCH -p gpu --time=5", False),
        ("#SBATCH --time=5 # --wait in a comment", False),
        # Short options in a cluster, as sbatch reads them (measured with `sbatch -v --test-only`).
        ("#SBATCH -QW", True),
        ("#SBATCH -Qa 1-2", True),
        ("#SBATCH -vvM other", True),
        ("#SBATCH -p gpu -W", True),
        ("#SBATCH -J -W", False),  # -W is the job's name
        ("#SBATCH -QJW", False),  # W is the job's name
        ("#SBATCH --comment -W", False),
    ],
)
def test_step_script_directives_are_checked(tmp_path, directive, refused):
    (tmp_path / "job.sh").write_text(f"#!/bin/sh\n{directive}\necho hi\n")
    write = lambda: jobs.write_step_script(  # noqa: E731
        tmp_path / "step.sh", cwd=str(tmp_path), script_and_args=["job.sh"], wrap=None, env={},
        attached=[], attach_mode="env",
    )  # fmt: skip
    if refused:
        with pytest.raises(UsageError) as exc:
            write()
        assert "cannot be given" in str(exc.value)
    else:
        write()
        assert directive.split(" #")[0] in (tmp_path / "step.sh").read_text()
