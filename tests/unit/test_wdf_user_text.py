"""User text never becomes code: template code in every place a user can put text is refused
with exit 2 and a message naming the key or variable, and never runs (no marker file appears).

Site-free: the refusals happen before anything reaches Ansible (tests/integration/
test_untrusted_extravars.py shows Ansible would not run it either).
"""

from __future__ import annotations

import copy

import pytest
import yaml

BASE = {
    "workflow": {"name": "wf"},
    "services": [
        {
            "name": "svc1",
            "type": "NFS",
            "attributes": {
                "namespace": "/tmp/replaced-by-wdf_with",
                "mountpoint": "/mnt/svc1",
                "flavor": "small",
            },
            "datamovers": [
                {
                    "name": "own1",
                    "trigger": "step_start",
                    "target": "flash",
                    "operation": "copy",
                    "elements": ["in/*"],
                }
            ],
        }
    ],
    "datamovers": [
        {"name": "dm1", "trigger": "step_stop", "target": "tape", "operation": "move", "elements": "out/*"}
    ],
    "steps": [
        {
            "name": "step_A",
            "location": "cpu_module",
            "command": "sbatch job.sh",
            "services": [{"name": "svc1 RW", "datamovers": ["own1", "dm1"]}],
        }
    ],
}

# Every string a WDF holds, as (path in BASE, how the message names it).
PLACES = [
    (("workflow", "name"), "workflow.name"),
    (("services", 0, "name"), "services[0].name"),
    (("services", 0, "type"), "services[0].type"),
    (("services", 0, "attributes", "namespace"), "services[0].attributes.namespace"),
    (("services", 0, "attributes", "mountpoint"), "services[0].attributes.mountpoint"),
    (("services", 0, "attributes", "flavor"), "services[0].attributes.flavor"),
    (("services", 0, "datamovers", 0, "name"), "services[0].datamovers[0].name"),
    (("services", 0, "datamovers", 0, "elements", 0), "services[0].datamovers[0].elements[0]"),
    (("datamovers", 0, "name"), "datamovers[0].name"),
    (("datamovers", 0, "trigger"), "datamovers[0].trigger"),
    (("datamovers", 0, "target"), "datamovers[0].target"),
    (("datamovers", 0, "operation"), "datamovers[0].operation"),
    (("datamovers", 0, "elements"), "datamovers[0].elements"),
    (("steps", 0, "name"), "steps[0].name"),
    (("steps", 0, "location"), "steps[0].location"),
    (("steps", 0, "command"), "steps[0].command"),
    (("steps", 0, "services", 0, "name"), "steps[0].services[0].name"),
    (("steps", 0, "services", 0, "datamovers", 0), "steps[0].services[0].datamovers[0]"),
]


def payloads(marker) -> dict[str, str]:
    """Template code that would create ``marker``.* if anything rendered it."""
    return {
        "lookup": f"x{{{{ lookup('pipe', 'touch {marker}.lookup') }}}}",
        "query": f"x{{{{ query('pipe', 'touch {marker}.query') }}}}",
        "attribute": f"x{{{{ WORKFLOW.__class__.__mro__ }}}}{{{{ lookup('pipe', 'touch {marker}.attr') }}}}",
        "filter": f"x{{{{ 'touch {marker}.filter' | pipe }}}}",
        "statement": f"x{{% set _ = lookup('pipe', 'touch {marker}.stmt') %}}",
    }


def _set(data, path, value):
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


@pytest.fixture
def wdf_with(tmp_path):
    """A copy of BASE with ``value`` at ``path``, written as YAML; returns its path."""

    def make(path, value):
        data = copy.deepcopy(BASE)
        # A namespace must be an existing directory under the site's roots (/tmp is one).
        namespace = tmp_path / "ns1"
        namespace.mkdir(exist_ok=True)
        data["services"][0]["attributes"]["namespace"] = str(namespace)
        _set(data, path, value)
        target = tmp_path / "wdf.yaml"
        target.write_text(yaml.safe_dump(data, sort_keys=False))
        return target

    return make


def test_base_is_valid(iosea, wdf_with):
    wdf = wdf_with(("workflow", "name"), "wf")
    assert iosea("validate", f"WORKFLOW={wdf}").code == 0


@pytest.mark.parametrize("kind", ["lookup", "query", "attribute", "filter", "statement"])
@pytest.mark.parametrize("path, key", PLACES, ids=[k for _, k in PLACES])
def test_template_code_in_the_wdf_is_refused_and_never_runs(iosea, wdf_with, tmp_path, path, key, kind):
    marker = tmp_path / "MARKER"
    wdf = wdf_with(path, payloads(marker)[kind])
    for command in ("validate", "start"):
        result = iosea(command, f"WORKFLOW={wdf}", "SESSION=s1")
        assert result.code == 2, (command, result.err)
        assert key in result.err, result.err
        assert "Traceback" not in result.err
    assert not list(tmp_path.glob("MARKER*"))


@pytest.mark.parametrize("kind", ["lookup", "query", "attribute", "filter", "statement"])
def test_template_code_in_a_cli_variable_is_refused_and_never_runs(iosea, wdf_with, tmp_path, kind):
    marker = tmp_path / "MARKER"
    wdf = wdf_with(("services", 0, "attributes", "namespace"), "{{ NS1 }}")
    value = "/tmp/" + payloads(marker)[kind]
    for argv in (
        ("validate", f"WORKFLOW={wdf}", f"NS1={value}"),
        ("validate", f"WORKFLOW={wdf}", "-d", f"NS1={value}"),
        ("start", f"WORKFLOW={wdf}", "SESSION=s1", f"NS1={value}"),
    ):
        result = iosea(*argv)
        assert result.code == 2, (argv, result.err)
        assert "variable NS1" in result.err and "never a template" in result.err, result.err
    assert not list(tmp_path.glob("MARKER*"))


@pytest.mark.parametrize("kind", ["lookup", "query", "attribute", "filter", "statement"])
def test_template_code_in_session_and_step_names_is_refused(iosea, wdf_with, tmp_path, kind):
    marker = tmp_path / "MARKER"
    code = payloads(marker)[kind]
    wdf = wdf_with(("workflow", "name"), "wf")
    for argv, named in (
        (("validate", f"WORKFLOW={wdf}", f"SESSION=s{code}"), "invalid session name"),
        (("start", f"WORKFLOW={wdf}", f"SESSION=s{code}"), "invalid session name"),
        (("status", f"SESSION=s{code}"), "invalid session name"),
        (("run", "SESSION=s1", f"STEP=a{code}"), "invalid step name"),
        (("validate", f"WORKFLOW={wdf}{code}"), "variable WORKFLOW"),
    ):
        result = iosea(*argv)
        assert result.code == 2, (argv, result.err)
        assert named in result.err, result.err
    assert not list(tmp_path.glob("MARKER*"))


def test_step_is_built_in_and_cannot_be_given(iosea, wdf_with):
    wdf = wdf_with(("workflow", "name"), "wf")
    result = iosea("validate", f"WORKFLOW={wdf}", "-d", "STEP=x")
    assert result.code == 2 and "STEP is built in" in result.err
