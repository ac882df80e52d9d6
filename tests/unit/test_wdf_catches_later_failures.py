"""Issue 14, "validation catches what would fail later": colliding environment stems, names over
64 characters, reserved sbatch options in every spelling sbatch takes (in-process; the same WDFs
through the service are in tests/unit/test_api.py)."""

from __future__ import annotations

import pytest

STEMS_WDF = """\
workflow:
  name: wf
services:
  - name: data-1
    type: NFS
    attributes: {namespace: "{{ NS1 }}", mountpoint: /mnt/a}
  - name: data_1
    type: NFS
    attributes: {namespace: "{{ NS2 }}", mountpoint: /mnt/b}
steps:
  - name: s
    command: "sbatch job.sh"
    services: [{name: data-1}, {name: data_1}]
"""


def long_names_wdf(kind: str) -> str:
    """A valid WDF whose name of ``kind`` (workflow, service, mover, step) is 65 characters long."""
    names = dict.fromkeys(("workflow", "service", "mover", "step"), "x")
    names[kind] = "n" * 65
    return f"""\
workflow:
  name: {names["workflow"]}
services:
  - name: {names["service"]}
    type: NFS
    attributes: {{namespace: "{{{{ NS1 }}}}", mountpoint: /mnt/a}}
datamovers:
  - {{name: {names["mover"]}, trigger: step_start, target: flash, operation: copy, elements: "x"}}
steps:
  - name: {names["step"]}
    command: "sbatch job.sh"
    services: [{{name: {names["service"]}, datamovers: [{names["mover"]}]}}]
"""


def namespaces(tmp_path) -> list[str]:
    """NS1= and NS2= naming two existing directories."""
    for name in ("ns1", "ns2"):
        (tmp_path / name).mkdir(exist_ok=True)
    return [f"NS1={tmp_path / 'ns1'}", f"NS2={tmp_path / 'ns2'}"]


def test_services_whose_environment_stems_collide_are_refused_naming_both(tmp_path, iosea):
    # Before: data-1 and data_1 both validated; the job got one set of IOSEA_SERVICE_DATA_1_*.
    path = tmp_path / "wdf.yaml"
    path.write_text(STEMS_WDF)
    result = iosea("validate", f"WORKFLOW={path}", *namespaces(tmp_path))
    assert result.code == 2, result.err
    assert "Traceback" not in result.err
    assert (
        f"{path}:7:11: services[1].name: services 'data-1' and 'data_1' both give the job the "
        "variables IOSEA_SERVICE_DATA_1_*"
    ) in result.err


@pytest.mark.parametrize("kind", ["workflow", "service", "mover", "step"])
def test_names_over_64_characters_are_refused_at_validate(tmp_path, iosea, kind):
    path = tmp_path / "wdf.yaml"
    path.write_text(long_names_wdf(kind))
    result = iosea("validate", f"WORKFLOW={path}", *namespaces(tmp_path))
    assert result.code == 2 and "Traceback" not in result.err
    assert result.err.count("problem") == 1, result.err
    assert "a name has at most 64 characters, this one 65" in result.err


def test_session_and_step_names_over_64_characters_are_refused(tmp_path, iosea):
    path = tmp_path / "wdf.yaml"
    path.write_text(long_names_wdf("none"))
    ns = namespaces(tmp_path)
    assert iosea("validate", f"WORKFLOW={path}", *ns).code == 0
    for argv in (
        ["validate", f"WORKFLOW={path}", "SESSION=" + "s" * 65, *ns],
        ["start", f"WORKFLOW={path}", "SESSION=" + "s" * 65, *ns],
        ["run", "SESSION=s", "STEP=" + "p" * 300],
    ):
        result = iosea(*argv)
        assert result.code == 2 and "Traceback" not in result.err, argv
        assert "invalid s" in result.err
