"""Defence in depth: a value that slipped past validation reaches Ansible as data, never as a template.

The playbooks are run for real (ansible-runner, the local site's inventory) with values carrying
Jinja code; the code would create a marker file if Ansible ever rendered it.
"""

from __future__ import annotations

from iosea_wf.orchestrator import run_playbook
from tests.sites import LOCAL_SITE


def _payloads(marker) -> dict[str, str]:
    return {
        "lookup": f"{{{{ lookup('pipe', 'touch {marker}.lookup') }}}}",
        "query": f"{{{{ query('pipe', 'touch {marker}.query') }}}}",
        "filter": f"{{{{ 'touch {marker}.filter' | ansible.builtin.pipe }}}}",
        "attribute": f"{{{{ lookup('pipe', 'touch {marker}.attr') if ''.__class__ else '' }}}}",
    }


def _created(tmp_path) -> list[str]:
    return sorted(p.name for p in tmp_path.glob("MARKER*"))


def test_service_values_are_never_rendered(tmp_path, state_dir):
    """session_services (status and stop) with template code in every field of a service."""
    marker = tmp_path / "MARKER"
    code = _payloads(marker)
    service = {
        "name": "svc1",
        "type": "NFS",
        "datanode": "datanode1",
        "session": "s" + code["query"],
        "owner": "u" + code["filter"],
        "namespace": "/tmp/x" + code["lookup"],
        "export_key": "k" + code["attribute"],
        "export_id": 4242,
        "pseudo": "/iosea/x" + code["lookup"],
        "access": "RW",
    }
    for action in ("status", "stop"):
        result = run_playbook(
            "session_services",
            site_path=LOCAL_SITE,
            state_dir=state_dir,
            ident=f"untrusted-{action}",
            extravars={"iosea_action": action, "iosea_services": [service]},
        )
        assert _created(tmp_path) == [], f"{action}: Ansible rendered a value: {_created(tmp_path)}"
        # The playbook ran (it did not stop at a parse error): the service's host was reached.
        assert "svc1" in result.hosts, result.hosts


def test_pipeline_values_are_never_rendered(tmp_path, state_dir):
    """step_submit with template code in the pipeline: refused by the plugin, never rendered."""
    marker = tmp_path / "MARKER"
    code = _payloads(marker)
    pipeline = {
        "cwd": "/tmp/x" + code["lookup"],
        "start_movers": [{"name": "dm" + code["query"], "argv": ["sbatch", code["filter"]]}],
        "stop_movers": [],
        # Ends with an option: the plugin refuses it before any sbatch runs.
        "step": {"name": "s", "argv": ["sbatch", code["attribute"], code["lookup"], "--x"]},
    }
    result = run_playbook(
        "step_submit",
        site_path=LOCAL_SITE,
        state_dir=state_dir,
        ident="untrusted-submit",
        extravars={"iosea_pipeline": pipeline},
    )
    assert _created(tmp_path) == [], f"Ansible rendered a value: {_created(tmp_path)}"
    assert not result.ok
    messages = " ".join(h.message for h in result.hosts.values())
    assert "pipeline needs cwd and step.argv" in messages, messages
