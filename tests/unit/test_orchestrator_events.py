"""The orchestrator without a site: event folding, run-directory pruning, a real local playbook."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iosea_wf import orchestrator as orch
from iosea_wf.errors import OrchestrationError


def _event(kind, host="svc", task="t", res=None, **data):
    return {"event": kind, "event_data": {"host": host, "task": task, "res": res or {}, **data}}


def test_report_tasks_become_results_and_callbacks():
    hosts, seen = {}, []
    orch.handle_event(
        _event("runner_on_ok", task="iosea service ready", res={"msg": {"url": "nfs://x"}}),
        hosts,
        lambda *a: seen.append(a),
    )
    orch.handle_event(
        _event("runner_on_ok", host="ctl", task="iosea jobs submitted", res={"msg": "not a dict"}),
        hosts,
        lambda *a: seen.append(a),
    )
    orch.handle_event(_event("runner_on_ok", host="other", task="any task"), hosts)
    orch.handle_event({"event": "playbook_on_stats"}, hosts)
    assert hosts["svc"].results == {"url": "nfs://x"} and hosts["svc"].ok
    assert hosts["ctl"].results == {"msg": "not a dict"}
    assert set(hosts) == {"svc", "ctl", "other"}
    assert seen == [("svc", "ready", {"url": "nfs://x"}), ("ctl", "submitted", {"msg": "not a dict"})]


def test_failures_name_the_task_and_tell_slurm_refusals_apart():
    hosts, seen = {}, []
    orch.handle_event(
        _event(
            "runner_on_failed",
            host="ctl",
            task="Submit the pipeline",
            res={"msg": "sbatch refused the job: x", "sbatch_refused": True},
        ),
        hosts,
        lambda *a: seen.append(a),
    )
    orch.handle_event(
        _event("runner_on_unreachable", host="dn", task="Ping", res={"msg": "no route"}),
        hosts,
        lambda *a: seen.append(a),
    )
    orch.handle_event(
        _event("runner_on_failed", host="ign", res={"msg": "ignored"}, ignore_errors=True), hosts
    )
    assert (
        hosts["ctl"].message == "Submit the pipeline: sbatch refused the job: x"
        and hosts["ctl"].refused_by_slurm
    )
    assert not hosts["dn"].ok and not hosts["dn"].refused_by_slurm
    assert "ign" not in hosts
    assert [k for _, k, _ in seen] == ["failed", "unreachable"]
    result = orch.PlaybookResult("i", "failed", 2, "/a", hosts)
    assert not result.ok and result.refused_by_slurm
    del hosts["ctl"]
    assert not result.refused_by_slurm  # an unreachable host is an orchestration failure (exit 7)


@pytest.mark.parametrize(
    "res, expected",
    [
        ({"msg": "boom", "stderr": "why\n"}, "boom: why"),
        ({"stderr": "only stderr"}, "only stderr"),
        ({"module_stderr": "trace"}, "trace"),
        ({}, "failed without a message"),
        ({"msg": "x" * 2100 + "\nlast line"}, "last line"),
    ],
)
def test_failure_message_picks_the_telling_part(res, expected):
    assert orch._failure_message(res) == expected


def _run_dir(runs: Path, ident: str, finished_at: float | None, started_at: float) -> Path:
    d = runs / ident
    (d / "artifacts" / ident).mkdir(parents=True)
    if finished_at is not None:
        status = d / "artifacts" / ident / "status"
        status.write_text("successful")
        os.utime(status, (finished_at, finished_at))
    os.utime(d, (started_at, started_at))
    return d


def test_prune_keeps_the_newest_finished_runs_and_every_run_in_progress(tmp_path):
    runs = tmp_path / "runs"
    now = time.time()
    for i in range(5):
        _run_dir(runs, f"done-{i}", finished_at=now - 100 + i, started_at=now - 200)
    _run_dir(runs, "in-progress", finished_at=None, started_at=now - 3600)
    _run_dir(runs, "killed-long-ago", finished_at=None, started_at=now - orch.STALE_RUN_SECONDS - 10)
    removed = orch.prune_runs(tmp_path, keep=2, now=now)
    assert [Path(p).name for p in removed] == ["done-0", "done-1", "done-2", "killed-long-ago"]
    assert sorted(p.name for p in runs.iterdir()) == ["done-3", "done-4", "in-progress"]
    assert orch.prune_runs(tmp_path, keep=2, now=now) == []
    assert orch.prune_runs(tmp_path / "nowhere") == []


def test_end_orphaned_run_stops_the_processes_of_that_run(tmp_path):
    marker = tmp_path / "runs" / "s1-start-1"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", str(marker / "x")])
    other = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", str(tmp_path / "runs" / "s2")]
    )
    try:
        assert orch.end_orphaned_run(tmp_path, "s1-start-1", grace=5) == 1
        assert proc.wait(5) is not None
        assert other.poll() is None
    finally:
        other.kill()
        proc.kill()
        other.wait()


PLAYBOOK = """\
- name: A service that gets ready and one that fails
  hosts: all
  gather_facts: false
  tasks:
    - name: iosea service ready
      ansible.builtin.debug:
        msg: {url: "nfs://{{ inventory_hostname }}/x", echo: "{{ iosea_value }}"}
      when: inventory_hostname == 'good'
    - name: Break
      ansible.builtin.fail:
        msg: broken on purpose
      when: inventory_hostname == 'bad'
"""


def test_run_playbook_runs_ansible_and_reports_per_host(tmp_path, monkeypatch):
    playbooks = tmp_path / "playbooks"
    playbooks.mkdir()
    (playbooks / "unit.yml").write_text(PLAYBOOK)
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(
        "all:\n  vars:\n    ansible_connection: local\n"
        "    ansible_python_interpreter: '{{ ansible_playbook_python }}'\n"
        "  hosts:\n    good:\n    bad:\n"
    )
    monkeypatch.setattr(orch, "PLAYBOOKS_DIR", playbooks)
    monkeypatch.setenv("IOSEA_WF_WARM_ANSIBLE", "0")
    seen = []
    result = orch.run_playbook(
        "unit",
        site_path=inventory,
        state_dir=tmp_path / "state",
        ident="unit-1",
        extravars={"iosea_value": "plain data"},
        on_event=lambda *a: seen.append(a[:2]),
    )
    assert result.status == "failed" and not result.ok and not result.refused_by_slurm
    assert result.hosts["good"].results == {"url": "nfs://good/x", "echo": "plain data"}
    assert result.hosts["bad"].message == "Break: broken on purpose"
    assert sorted(seen) == [("bad", "failed"), ("good", "ready")]
    assert Path(result.artifacts, "status").read_text() == "failed"


def test_run_playbook_that_cannot_start_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(orch, "PLAYBOOKS_DIR", tmp_path)
    monkeypatch.setenv("IOSEA_WF_WARM_ANSIBLE", "0")
    (tmp_path / "broken.yml").write_text("- hosts: all\n  tasks: [\n")
    inventory = tmp_path / "inv.yml"
    inventory.write_text("all:\n  hosts:\n    h:\n      ansible_connection: local\n")
    result = orch.run_playbook(
        "broken", site_path=inventory, state_dir=tmp_path / "s", ident="b-1", extravars={}
    )
    assert not result.ok and "broken ended failed" in result.hosts["(playbook)"].message
    with pytest.raises(OrchestrationError, match="cannot run the playbook"):
        orch.run_playbook(
            "x", site_path=inventory, state_dir=tmp_path / "s", ident="b-2", extravars={"a": object()}
        )


SUBMIT = """\
- name: Submit through the real slurm_job role
  hosts: all
  gather_facts: false
  roles:
    - role: slurm_job
      vars:
        slurm_job_action: submit
        slurm_job_pipeline: "{{ iosea_pipeline }}"
"""


def test_a_submission_that_fails_before_sbatch_is_not_a_slurm_refusal(tmp_path, monkeypatch):
    # The working directory is gone: the shell fails at `cd`, sbatch never runs (no Slurm needed).
    (tmp_path / "submit.yml").write_text(SUBMIT)
    inventory = tmp_path / "inv.yml"
    inventory.write_text(
        "all:\n  hosts:\n    localhost:\n      ansible_connection: local\n"
        "      ansible_python_interpreter: '{{ ansible_playbook_python }}'\n"
    )
    monkeypatch.setattr(orch, "PLAYBOOKS_DIR", tmp_path)
    monkeypatch.setenv("IOSEA_WF_WARM_ANSIBLE", "0")
    pipeline = {
        "cwd": str(tmp_path / "gone"),
        "start_movers": [],
        "step": {"name": "s", "argv": ["sbatch", "--parsable", "job.sh"]},
        "stop_movers": [],
    }
    result = orch.run_playbook(
        "submit",
        site_path=inventory,
        state_dir=tmp_path / "s",
        ident="sub-1",
        extravars={"iosea_pipeline": pipeline},
    )
    assert not result.ok and not result.refused_by_slurm
    assert "sbatch refused the job" in result.hosts["localhost"].message  # the role's wording, rc of cd


def test_closing_an_ended_playbook_pty_does_not_sleep():
    """ptyprocess sleeps 0.1 s in close(); ansible-runner closes only ended children (orchestrator)."""
    import time as _time

    import ptyprocess

    from iosea_wf import orchestrator

    orchestrator._no_delay_after_close()
    child = ptyprocess.PtyProcess.spawn(["true"])
    while child.isalive():
        _time.sleep(0.01)
    t0 = _time.perf_counter()
    child.close()
    assert _time.perf_counter() - t0 < 0.05
