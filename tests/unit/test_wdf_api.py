"""The public API of iosea_wf.wdf: the model, site defaults, variables, sizes and the registry."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest
import voluptuous as vol
import yaml

from iosea_wf.errors import WDFError
from iosea_wf.site import load_site
from iosea_wf.wdf import (
    SERVICE_TYPES,
    SESSION_PLACEHOLDER,
    DataMover,
    Service,
    Step,
    StepService,
    WDFProblem,
    Workflow,
    load_wdf,
)
from iosea_wf.wdf.loader import _yaml_problem
from iosea_wf.wdf.problems import Problems
from iosea_wf.wdf.schema import size
from iosea_wf.wdf.variables import template_problem
from tests.unit.wdf_fixtures import VARIABLES

HERE = Path(__file__).parent
SAMPLE = HERE / "wdf_valid" / "sample-wdf.yaml"
V16 = HERE / "wdf_valid" / "iosea-wm-v1.6-style.yaml"

MINIMAL = """\
workflow:
  name: mini
services:
  - name: svc
    type: {type}
    attributes: {attributes}
steps:
  - name: only
    command: "sbatch job.sh"
    services:
      - name: svc
"""


@pytest.fixture(scope="module")
def site():
    return load_site("inventories/local")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "wdf.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path, variables=VARIABLES, site=None) -> list[WDFProblem]:
    with pytest.raises(WDFError) as caught:
        load_wdf(path, variables, site)
    return caught.value.problems


def test_sample_model(site):
    wf = load_wdf(SAMPLE, VARIABLES, site)
    assert wf.name == "My_Workflow" and wf.source == str(SAMPLE) and wf.variables == VARIABLES
    assert list(wf.steps) == ["step_A", "step_B"]
    assert wf.services["ephemeral_service_1"] == Service(
        "ephemeral_service_1",
        "NFS",
        {"namespace": "/datasets/ns1", "mountpoint": "/mnt/USER/My_Workflow/s1/ES1", "flavor": "medium"},
    )
    assert wf.datamovers["datamover2"] == DataMover(
        "datamover2", "step_stop", "tape", "move", ("gauges/*.hdf5",)
    )
    assert wf.steps["step_A"] == Step(
        "step_A", ("gpu_module",), "sbatch My_Step_A", (StepService("ephemeral_service_1", "RO", ()),)
    )
    assert wf.steps["step_B"].services == (
        StepService("ephemeral_service_2", "RW", ("datamover1", "datamover2")),
    )


def test_site_defaults_fill_flavor_and_location(site):
    wf = load_wdf(V16, VARIABLES, site)
    lqcd = wf.services["lqcd-ns"]
    assert lqcd.flavor == site.default_flavor
    assert lqcd.storagesize_bytes == 2 * 2**30
    assert lqcd.namespace == "/datasets/alice/lqcd" and lqcd.mountpoint == "/mnt/alice/s1/lqcd"
    assert wf.services["results-ns"].storagesize_bytes == 500 * 10**9
    assert all(step.location == (site.default_module,) for step in wf.steps.values())
    assert wf.steps["compute"].services[1] == StepService("results-ns", "RW", ())


def test_without_site_nothing_is_defaulted_nor_checked_against_a_site(tmp_path):
    wf = load_wdf(V16, VARIABLES)
    assert wf.services["lqcd-ns"].flavor is None
    assert wf.steps["compute"].location == ()
    text = (
        SAMPLE.read_text()
        .replace("flavor: medium", "flavor: galactic")
        .replace("target: tape", "target: moon")
    )
    wf = load_wdf(write(tmp_path, text), VARIABLES)
    assert wf.services["ephemeral_service_1"].flavor == "galactic"
    assert wf.datamovers["datamover2"].target == "moon"


def test_to_dict_is_json_and_round_trips(site):
    wf = load_wdf(V16, VARIABLES, site)
    data = json.loads(json.dumps(wf.to_dict()))
    assert data["schema_version"] == 1
    assert Workflow.from_dict(data) == wf


@pytest.mark.parametrize("record", [None, [], {"schema_version": 99}, {"schema_version": 1, "name": "x"}])
def test_from_dict_rejects_what_to_dict_does_not_make(record):
    with pytest.raises(WDFError):
        Workflow.from_dict(record)


def test_problem_fields_and_one_line_text(tmp_path):
    text = SAMPLE.read_text().replace("- datamover2", "- dm9")
    path = write(tmp_path, text)
    (problem,) = problems_of(path)
    line = text.splitlines().index("        - dm9") + 1
    assert problem == WDFProblem(
        file=str(path),
        line=line,
        column=11,
        path="steps[1].services[0].datamovers[1]",
        value="dm9",
        message="unknown data mover 'dm9'",
        expected="one of: datamover1, datamover2",
    )
    assert str(problem) == (
        f"{path}:{line}:11: steps[1].services[0].datamovers[1]: unknown data mover 'dm9' "
        "(expected one of: datamover1, datamover2)"
    )


def test_undefined_variables_are_each_reported_with_their_place():
    problems = problems_of(SAMPLE, {"SESSION": "s"})
    assert [(p.line, p.path, p.value) for p in problems] == [
        (11, "services[0].attributes.namespace", "{{ NS1 }}"),
        (17, "services[1].attributes.namespace", "{{ NS2 }}"),
    ]
    assert all("undefined variable" in p.message for p in problems)


def test_extra_variables_are_fine_and_the_placeholder_session_validates(site):
    wf = load_wdf(SAMPLE, {**VARIABLES, "SESSION": SESSION_PLACEHOLDER, "UNUSED": "x"}, site)
    assert wf.services["ephemeral_service_2"].mountpoint == f"/mnt/USER/My_Workflow/{SESSION_PLACEHOLDER}/ES2"


def test_values_are_substituted_once_and_never_rendered(monkeypatch, tmp_path):
    def forbidden(*args, **kwargs):
        raise AssertionError("a WDF must never be rendered by Jinja")

    monkeypatch.setattr(jinja2.Environment, "from_string", forbidden)
    monkeypatch.setattr(jinja2.Template, "render", forbidden)
    text = SAMPLE.read_text().replace('"sbatch My_Step_A"', '"sbatch {{USER}} {{ WORKFLOW }}"')
    wf = load_wdf(write(tmp_path, text), {**VARIABLES, "USER": "{{ NS1.__class__ }}"})
    assert wf.steps["step_A"].command == "sbatch {{ NS1.__class__ }} wf"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("plain", None),
        ("{{ A }} and {{B}} and {{\tC\n}}", None),
        ("}} {", None),
        ("{{ a.b }}", "attribute or item access"),
        ("{{ a['b'] }}", "attribute or item access"),
        ("{{ a|lower }}", "a filter"),
        ("{{ range(10) }}", "a call"),
        ("{{ 1 + 1 }}", "an expression"),
        ("{{ }}", "an empty expression"),
        ("{{- a }}", "whitespace control"),
        ("{% set x = 1 %}", "statement"),
        ("{% raw %}{{ a }}{% endraw %}", "statement"),
        ("{# hidden #}", "comment"),
        ("{{ a", "not closed"),
        ("{{ a ) }}", "invalid template syntax"),
    ],
)
def test_only_plain_references_are_allowed(text, fragment):
    problem = template_problem(text)
    assert (problem is None) if fragment is None else (fragment in problem)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2Gi", 2 * 2**30),
        ("2GiB", 2 * 2**30),
        ("500GB", 500 * 10**9),
        ("1.5T", 15 * 10**11),
        ("10k", 10_000),
        ("512", 512),
        ("100B", 100),
        (4096, 4096),
        (1.5, 2),
    ],
)
def test_sizes_are_normalized_to_bytes(value, expected):
    assert size(value) == expected


@pytest.mark.parametrize(
    "value", ["2 apples", "Gi", "", "-1Gi", "0", 0, -5, True, None, [], "1e999", float("nan"), 10**30]
)
def test_bad_sizes_are_rejected(value):
    with pytest.raises(vol.Invalid):
        size(value)


def test_a_new_service_type_is_one_registry_entry(monkeypatch, tmp_path, site):
    monkeypatch.setitem(SERVICE_TYPES, "SCRATCH", vol.Schema({vol.Required("capacity"): str}))
    path = write(tmp_path, MINIMAL.format(type="SCRATCH", attributes="{capacity: big}"))
    assert load_wdf(path, VARIABLES).services["svc"].attributes == {"capacity": "big"}
    (problem,) = problems_of(path, site=site)
    assert problem.path == "services[0].type" and "not offered by the site" in problem.message
    assert problem.expected == "one of: NFS"


def test_unknown_attribute_of_a_type_lists_the_accepted_ones(tmp_path):
    path = write(
        tmp_path, MINIMAL.format(type="NFS", attributes="{namespace: /a, mountpoint: /b, colour: red}")
    )
    (problem,) = problems_of(path)
    assert problem.path == "services[0].attributes.colour" and problem.message == "unknown key 'colour'"
    assert problem.expected == "one of: namespace, mountpoint, flavor, storagesize, datanodes, location"


@pytest.mark.parametrize("name", ["svc", "svc RW", "svc  RO"])
def test_access_mode_defaults_to_rw(tmp_path, name):
    text = MINIMAL.format(type="NFS", attributes="{namespace: /a, mountpoint: /b}")
    text = text.replace("      - name: svc\n", f"      - name: {name}\n")
    step = load_wdf(write(tmp_path, text), VARIABLES).steps["only"]
    assert step.services == (StepService("svc", name.split()[-1] if " " in name else "RW", ()),)


def test_missing_file_is_a_wdf_error(tmp_path):
    with pytest.raises(WDFError, match="cannot read"):
        load_wdf(tmp_path / "absent.yaml", VARIABLES)


MISINDENTED = """\
steps:
- name: a
  services:
    - name: svc RW
    datamovers:
      - dm1
"""


@pytest.mark.parametrize("loader", [yaml.SafeLoader, getattr(yaml, "CSafeLoader", yaml.SafeLoader)])
def test_indentation_hint_with_either_yaml_parser(loader):
    # libyaml and pure-Python PyYAML word this error differently; both get the hint.
    with pytest.raises(yaml.YAMLError) as caught:
        yaml.compose(MISINDENTED, Loader=loader)
    problems = Problems("wdf.yaml")
    _yaml_problem(caught.value, MISINDENTED, problems)
    (problem,) = problems.found
    assert (problem.line, problem.column) == (5, 5)
    assert "`datamovers:` is probably indented one level too little" in problem.message


ATTACHED = """\
workflow:
  name: att
services:
  - name: svc
    type: NFS
    attributes: {{namespace: /tmp, mountpoint: /mnt/att}}
steps:
  - name: only
    command: "sbatch job.sh"
    attach: {attach}
    services:
      - name: svc
"""


def test_a_step_may_choose_an_attach_method_the_site_offers(tmp_path, site):
    wf = load_wdf(write(tmp_path, ATTACHED.format(attach="nfs")), VARIABLES, site)
    assert wf.steps["only"].attach == "nfs"
    assert Workflow.from_dict(json.loads(json.dumps(wf.to_dict()))) == wf
    plain = MINIMAL.format(type="NFS", attributes="{namespace: /tmp, mountpoint: /m}")
    assert load_wdf(write(tmp_path, plain), VARIABLES, site).steps["only"].attach is None


def test_an_attach_method_the_site_does_not_offer_is_refused(tmp_path, site_copy_offering_bind):
    (problem,) = problems_of(write(tmp_path, ATTACHED.format(attach="nfs")), site=site_copy_offering_bind)
    assert problem.path == "steps[0].attach"
    assert "attach method 'nfs' is not offered by the site" in problem.message
    assert problem.expected == "one of: bind"


def test_an_unknown_attach_method_is_refused_without_a_site(tmp_path):
    (problem,) = problems_of(write(tmp_path, ATTACHED.format(attach="9p")))
    assert problem.path == "steps[0].attach" and "bind, nfs, env" in (problem.expected or problem.message)


@pytest.fixture
def site_copy_offering_bind(tmp_path):
    import shutil

    dst = tmp_path / "site"
    shutil.copytree("inventories/local", dst)
    conf = dst / "group_vars" / "all" / "iosea.yml"
    data = yaml.safe_load(conf.read_text())
    data["iosea_service_attach_methods"] = ["bind"]
    conf.write_text(yaml.safe_dump(data))
    return load_site(dst)
