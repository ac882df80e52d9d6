"""How iosea_wf.slurm reads an sbatch argument list into slurmrestd's v0.0.38 job fields (no Slurm)."""

from __future__ import annotations

import pytest

from iosea_wf import slurm
from iosea_wf.errors import SlurmError

WHO = slurm.OnBehalf(user="alice", uid=1001, gid=1001, home="/home/alice", token="t", rest="/run/s.sock")


def test_an_allocation_keeps_its_name_node_and_size():
    job, script = slurm.rest_job(
        ["sbatch", "--parsable", "--export=NONE", "--job-name=iosea.s.svc.es1", "--partition=datanodes",
         "--nodelist=datanode1", "--nodes=1", "--ntasks=1", "--cpus-per-task=4", "--mem=10000M",
         "--output=/dev/null", "--error=/dev/null", "--chdir=/", "--wrap=exec sleep infinity"],
        None, WHO,
    )  # fmt: skip
    assert script == "#!/bin/sh\nexec sleep infinity\n"
    assert job["name"] == "iosea.s.svc.es1" and job["nodelist"] == "datanode1" and job["nodes"] == [1, 1]
    assert (job["cpus_per_task"], job["memory_per_node"], job["tasks"]) == (4, 10000, 1)
    assert job["current_working_directory"] == "/" and job["standard_error"] == "/dev/null"
    assert job["get_user_environment"] == "1" and "PATH" in job["environment"]


def test_the_scripts_directives_are_read_and_the_command_line_wins():
    text = "#!/bin/bash\n#SBATCH --time=1-02:03:04\n#SBATCH -N 2-3 -o x.out\n#SBATCH --job-name=mine\necho\n"
    job, script = slurm.rest_job(["sbatch", "--job-name=iosea.s.st.1", "--chdir=/w", "/w/step.sh"], text, WHO)
    assert script == text
    assert job["time_limit"] == 1 * 1440 + 2 * 60 + 3 + 1
    assert job["nodes"] == [2, 3] and job["standard_output"] == "x.out" and job["name"] == "iosea.s.st.1"


@pytest.mark.parametrize(("given", "minutes"), [("10", 10), ("10:30", 11), ("1:00:00", 60), ("2-0", 2880)])
def test_times_are_in_minutes(given, minutes):
    assert slurm._minutes(given) == minutes


def test_export_values_reach_the_environment_and_names_alone_are_refused():
    job, _ = slurm.rest_job(["sbatch", "--export=NONE,A=1", "/s.sh"], "#!/bin/sh\n", WHO)
    assert job["environment"]["A"] == "1"
    with pytest.raises(SlurmError, match="give it a value"):
        slurm.rest_job(["sbatch", "--export=HOME", "/s.sh"], "#!/bin/sh\n", WHO)


def test_an_option_slurmrestd_cannot_take_is_refused_by_name():
    with pytest.raises(SlurmError, match="--tmp"):
        slurm.rest_job(["sbatch", "--tmp=10", "/s.sh"], "#!/bin/sh\n", WHO)


def test_root_submits_with_uid_the_account_through_slurmrestd_without():
    assert "--uid=1001" in slurm.OnBehalf("a", 1001, 1001, "/h", "t").sbatch_options()
    assert WHO.sbatch_options() == ["--export=NONE"]
    assert "token" not in repr(WHO)


def test_the_rest_socket_comes_from_the_service_environment(monkeypatch):
    monkeypatch.setenv(slurm.REST_SOCKET_ENV, "unix:///run/slurmrestd/slurmrestd.socket")
    assert slurm.rest_socket() == "/run/slurmrestd/slurmrestd.socket"
    monkeypatch.setenv(slurm.REST_SOCKET_ENV, "http://elsewhere")
    assert slurm.rest_socket() is None
