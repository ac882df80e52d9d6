"""Section 4 of issue 12: one contract per WDF key, checked at validate (datanodes, step commands,
service-level data movers, {{ STEP }}), and what start and run then do with it (no Ansible)."""

from __future__ import annotations

from pathlib import Path

import pytest

from iosea_wf import manager, steps
from iosea_wf.errors import UsageError, WDFError
from iosea_wf.site import load_site
from iosea_wf.wdf import load_wdf
from tests.unit.wdf_fixtures import VARIABLES

HERE = Path(__file__).parent
SERVICE_MOVERS = HERE / "wdf_valid" / "design-note-service-datamovers.yaml"
NOTHING_USED = {"cores": 0, "memory_mb": 0, "storage_gb": 0}

ONE_SERVICE = """\
workflow:
  name: wf
services:
  - name: svc1
    type: NFS
    attributes:
      namespace: /tmp/ns1
      mountpoint: /mnt/svc1
      {extra}
steps:
  - name: step_A
    command: "{command}"
    services:
      - name: svc1
"""


@pytest.fixture(scope="module")
def site():
    return load_site("inventories/local")


def write(tmp_path, extra="", command="sbatch job.sh") -> Path:
    path = tmp_path / "wdf.yaml"
    path.write_text(ONE_SERVICE.format(extra=extra, command=command))
    return path


def messages(path, site) -> str:
    with pytest.raises(WDFError) as caught:
        load_wdf(path, VARIABLES, site)
    return "\n".join(str(p) for p in caught.value.problems)


def test_datanodes_one_is_placed_like_the_default(tmp_path, site):
    # Before: `datanodes: 1` reached start's pinning by name (`d.name in 1`) and died with a TypeError.
    workflow = load_wdf(write(tmp_path, "datanodes: 1"), VARIABLES, site)
    assert workflow.services["svc1"].attributes["datanodes"] == 1
    [(service, datanode, need)] = manager.place_services(site, workflow, lambda _: dict(NOTHING_USED))
    assert service.name == "svc1" and datanode.name in site.datanodes and need["cores"] > 0


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("2", "spans exactly one datanode, not 2"),
        ("[datanode1]", "expected an integer, got a list"),
        ("'1'", "expected an integer, got '1'"),
        ("true", "expected an integer, got True"),
    ],
)
def test_datanodes_other_than_one_are_refused_for_nfs(tmp_path, site, value, fragment):
    assert fragment in messages(write(tmp_path, f"datanodes: {value}"), site)


def test_validate_refuses_what_run_would_refuse(tmp_path, site, iosea):
    path = write(tmp_path, command="sbatch --parsable job.sh")
    result = iosea("validate", f"WORKFLOW={path}")
    assert result.code == 2 and "cannot give --parsable" in result.err


def test_service_level_datamovers_are_owned_and_planned(tmp_path, site):
    workflow = load_wdf(SERVICE_MOVERS, VARIABLES, site)
    owners = {m.name: m.service for m in workflow.datamovers.values()}
    assert owners == {
        "datamover1": "ephemeral_service_2",
        "datamover2": "ephemeral_service_2",
        "shared_logs": None,
    }
    placements = manager.place_services(site, workflow, lambda _: dict(NOTHING_USED))
    record = manager.session_record(
        site, workflow, str(SERVICE_MOVERS), "alice", "s1", "f" * 32, placements, 0.0
    )
    record["state"] = "ACTIVE"
    ctx = manager.Context(state_dir=str(tmp_path / "state"), user="alice", _site=site)
    (tmp_path / "My_step_B").write_text("#!/bin/sh\ntrue\n")
    instance, pipeline = steps.plan_run(ctx, record, "step_B", str(tmp_path))
    assert [m["name"] for m in pipeline["start_movers"]] == ["datamover1"]
    assert [m["name"] for m in pipeline["stop_movers"]] == ["datamover2", "shared_logs"]
    assert instance["datamovers"][0]["service"] == "ephemeral_service_2"


def test_step_is_each_steps_own_name(site):
    workflow = load_wdf(SERVICE_MOVERS, VARIABLES, site)
    assert workflow.steps["step_A"].command == "sbatch --output=step_A.out My_Step_A"
    assert workflow.steps["step_B"].command == "sbatch My_step_B"


def test_step_outside_a_step_is_undefined(tmp_path, site):
    path = tmp_path / "wdf.yaml"
    path.write_text(
        ONE_SERVICE.format(extra="", command="sbatch job.sh").replace("/mnt/svc1", "/mnt/{{ STEP }}")
    )
    assert "undefined variable 'STEP'" in messages(path, site)


def test_step_given_on_the_command_line_is_refused():
    with pytest.raises(UsageError, match="STEP is built in"):
        manager.wdf_variables("alice", "wf.yaml", None, {"STEP": "x"})


@pytest.mark.parametrize("value", ["{{ x }}", "a{%", "{# c #}"])
def test_cli_variable_templates_are_refused_naming_the_variable(value):
    with pytest.raises(UsageError, match="variable NS1: its value contains"):
        manager.wdf_variables("alice", "wf.yaml", None, {"NS1": value})


@pytest.mark.parametrize(
    "name, ok", [("step_A", True), ("a.b-c", True), ("..", False), ("a/b", False), ("x" * 65, False)]
)
def test_step_names_follow_the_name_rule(name, ok):
    if ok:
        assert steps.check_step_name(name) == name
    else:
        with pytest.raises(UsageError, match="invalid step name"):
            steps.check_step_name(name)
