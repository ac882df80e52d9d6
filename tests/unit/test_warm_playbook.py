"""The warm ansible-playbook (iosea_wf/warm_playbook.py): same results as the real one, faster, and
nothing left running when its client goes away. Real Ansible, real fork server; no Slurm needed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iosea_wf import warm_playbook as wp
from iosea_wf.procs import alive

CLIENT = str(Path(sys.executable).parent / "iosea-wf-ansible-playbook")
INTERPRETER = "ansible_python_interpreter={{ ansible_playbook_python }}"

PLAYBOOK = """
- hosts: localhost
  gather_facts: false
  tasks:
    - name: say
      ansible.builtin.debug:
        msg: "warm-{{ word }}"
    - name: fail when asked
      ansible.builtin.fail:
        msg: asked to fail
      when: fail | default(false) | bool
    - name: wait when asked
      ansible.builtin.command:
        argv: [sleep, "{{ nap | default(0) }}"]
      when: (nap | default(0) | float) > 0
      changed_when: false
"""


@pytest.fixture
def warm(tmp_path, monkeypatch):
    """A private runtime dir (so these tests get their own servers) and a playbook dir."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    books = tmp_path / "books"
    books.mkdir()
    (books / "p.yml").write_text(PLAYBOOK)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime), IOSEA_WF_WARM_ANSIBLE="60", ANSIBLE_NOCOLOR="1")
    env.pop("ANSIBLE_FORKS", None)
    yield {"env": env, "books": books, "runtime": runtime}
    for log in runtime.glob("*.log"):
        pid = _server_pid(log)
        if pid:
            os.kill(pid, signal.SIGTERM)
            _wait(lambda p=pid: not alive(p), 10)


def _server_pid(log: Path) -> int | None:
    m = re.search(r"\(pid (\d+),", log.read_text())
    return int(m.group(1)) if m else None


def _wait(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def _run(warm, *extra, env_extra=None, **kw):
    env = dict(warm["env"], **(env_extra or {}))
    return subprocess.run(
        [CLIENT, "p.yml", "-i", "localhost,", "-c", "local", "-e", INTERPRETER, *extra],
        cwd=warm["books"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        **kw,
    )


def _served(warm) -> list[str]:
    return [
        line
        for log in warm["runtime"].glob("*.log")
        for line in log.read_text().splitlines()
        if re.search(r" run \d+: ", line)
    ]


def _up(warm) -> bool:
    return any(warm["runtime"].glob("*.sock"))


def test_first_run_is_cold_and_starts_a_server_later_runs_are_served_warm(warm):
    first = _run(warm, "-e", "word=one")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "warm-one" in first.stdout
    assert _served(warm) == []  # the first run was the real ansible-playbook
    assert _wait(lambda: _up(warm), 30), "no server came up after the cold run"

    second = _run(warm, "-e", "word=two")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "warm-two" in second.stdout  # the child wrote to the client's own stdout
    assert len(_served(warm)) == 1 and "p.yml" in _served(warm)[0]


def test_a_failing_run_reports_ansible_playbooks_own_exit_code(warm):
    _run(warm, "-e", "word=x")
    assert _wait(lambda: _up(warm), 30)
    failed = _run(warm, "-e", "word=x", "-e", "fail=true")
    assert failed.returncode == 2, failed.stdout  # ansible-playbook: 2 = a host failed
    assert "asked to fail" in failed.stdout
    assert any(
        "ended: 2" in line for log in warm["runtime"].glob("*.log") for line in log.read_text().splitlines()
    )


def test_another_ansible_configuration_never_uses_the_server(warm):
    _run(warm, "-e", "word=x")
    assert _wait(lambda: _up(warm), 30)
    other = _run(warm, "-e", "word=y", env_extra={"ANSIBLE_FORKS": "3"})
    assert other.returncode == 0
    assert _served(warm) == []  # served cold; a second server is started for that configuration
    assert _wait(lambda: len(list(warm["runtime"].glob("*.sock"))) == 2, 30)


def _napping_run(warm, nap: str) -> tuple[subprocess.Popen, int]:
    """A warm run parked in its `sleep NAP` task: (the client, the served child's pid)."""
    _run(warm, "-e", "word=x")
    assert _wait(lambda: _up(warm), 30)
    argv = [
        CLIENT,
        "p.yml",
        "-i",
        "localhost,",
        "-c",
        "local",
        "-e",
        INTERPRETER,
        "-e",
        "word=x",
        "-e",
        f"nap={nap}",
    ]
    client = subprocess.Popen(
        argv, cwd=warm["books"], env=warm["env"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    assert _wait(lambda: len(_served(warm)) == 1, 30)
    child = int(re.search(r"run (\d+):", _served(warm)[0]).group(1))
    assert _wait(lambda: _sleepers(nap), 30), "the playbook never reached its sleep task"
    return client, child


def test_a_killed_client_leaves_no_playbook_running(warm):
    client, child = _napping_run(warm, "117.31")
    client.kill()  # kill -9: the client cannot forward anything
    client.wait()
    assert _wait(lambda: not alive(child) and not _sleepers("117.31"), 15), "the run outlived its client"


def test_sigterm_to_the_client_reaches_the_playbook(warm):
    client, child = _napping_run(warm, "117.32")
    client.terminate()
    assert client.wait(timeout=30) != 0
    assert _wait(lambda: not alive(child) and not _sleepers("117.32"), 15)


def test_an_unsafe_runtime_dir_means_cold_runs_only(warm, tmp_path):
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    env = {"XDG_RUNTIME_DIR": str(open_dir)}
    ran = _run(warm, "-e", "word=z", env_extra=env)
    assert ran.returncode == 0 and "warm-z" in ran.stdout
    time.sleep(1)
    assert list(open_dir.iterdir()) == []  # no socket, no server, nothing written there


def test_off_switch(warm):
    ran = _run(warm, "-e", "word=z", env_extra={"IOSEA_WF_WARM_ANSIBLE": "0"})
    assert ran.returncode == 0 and "warm-z" in ran.stdout
    time.sleep(1)
    assert list(warm["runtime"].iterdir()) == []
    assert wp.idle_seconds({"IOSEA_WF_WARM_ANSIBLE": "0"}) == 0
    assert wp.idle_seconds({}) == wp.DEFAULT_IDLE
    assert wp.idle_seconds({"IOSEA_WF_WARM_ANSIBLE": "junk"}) == wp.DEFAULT_IDLE


def _sleepers(nap: str) -> bool:
    """True while the playbook's `sleep NAP` (a duration unique to the test) exists."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z" and cmd == f"sleep\0{nap}\0".encode():
            return True
    return False


def test_the_server_preloads_what_runs_need_and_a_warm_run_reads_as_a_cold_one(warm):
    cold = _run(warm, "-e", "word=same")
    assert _wait(lambda: _up(warm), 30)
    warm_run = _run(warm, "-e", "word=same")
    assert len(_served(warm)) == 1
    logs = "".join(log.read_text() for log in warm["runtime"].glob("*.log"))
    preloaded = re.search(r"preloaded: (.*)", logs).group(1)
    assert {"connection/local", "strategy/linear", "inventory/yaml"} <= set(preloaded.split(", ")), preloaded
    # The collection loader the server set up is the run's: nothing more is said, nothing differs.
    assert warm_run.returncode == cold.returncode == 0
    assert warm_run.stdout == cold.stdout and warm_run.stderr == cold.stderr == ""
