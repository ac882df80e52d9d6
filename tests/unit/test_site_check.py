"""`iosea-wf site check` without a site: inventory parsing, the probe's local parts, judging, output."""

from __future__ import annotations

import http.server
import json
import os
import shlex
import shutil
import socket
import socketserver
import threading
import time
from pathlib import Path

import pytest

from iosea_wf import site_check, site_probe, slurm
from iosea_wf.errors import EXIT_CODES, EXIT_UNHEALTHY, SiteError
from iosea_wf.site import load_site_hosts
from tests.sites import LOCAL_SITE, ROOT


def _soon() -> float:
    """A probe's deadline, 10 s from now."""
    return time.monotonic() + 10


def _twin(tmp_path: Path, hosts_yml: str) -> Path:
    """A copy of the local inventory with another hosts.yml."""
    twin = tmp_path / "site"
    shutil.copytree(LOCAL_SITE, twin)
    (twin / "hosts.yml").write_text(hosts_yml)
    return twin


SSH_HOSTS = """\
all:
  vars:
    ansible_user: root
  children:
    slurm_controller:
      hosts:
        ctl:
          ansible_host: 127.0.66.1
          ansible_port: 2201
          ansible_ssh_private_key_file: ~/keys/site
          iosea_ssh_known_hosts: /etc/iosea/known_hosts
    workflow_manager:
      hosts:
        ctl:
    compute:
      children:
        cpu_module:
          hosts:
            cn1:
              ansible_host: 127.0.66.2
              ansible_ssh_common_args: "-o UserKnownHostsFile=/h/known -o StrictHostKeyChecking=yes"
              ansible_python_interpreter: /opt/python/bin/python3
              munge_key_file: /etc/munge/other.key
        gpu_module:
          hosts:
            gn1:
              ansible_connection: local
    datanodes:
      hosts:
        dn1:
          ansible_host: 127.0.66.3
          ansible_become: true
          iosea_datanode_address: 127.0.66.3
          iosea_datanode_cores: 8
          iosea_datanode_memory_mb: 8000
          iosea_datanode_storage_gb: 100
          iosea_datanode_modules: [cpu_module, gpu_module]
          nfs_ganesha_port: 20491
"""


def test_local_site_hosts_are_all_local_with_the_roles_settings():
    site, hosts, groups = load_site_hosts(LOCAL_SITE)
    assert set(hosts) == {
        "localhost",
        "datanode1",
        "datanode2",
        "cpu-node1",
        "cpu-node2",
        "gpu-node1",
        "gpu-node2",
    }
    assert all(h.local for h in hosts.values())
    assert hosts["localhost"].groups == ("slurm_controller", "workflow_manager")
    assert hosts["cpu-node1"].groups == ("compute", "cpu_module")
    dn = hosts["datanode2"].settings
    # Role defaults (roles/nfs_ganesha, roles/munge) templated with the host's own variables.
    assert dn["nfs_ganesha_instance_dir"] == "/var/lib/iosea-wf/local/ganesha/datanode2"
    assert (dn["nfs_ganesha_address"], dn["nfs_ganesha_port"], dn["nfs_ganesha_mount_port"]) == (
        "127.0.0.1",
        20591,
        20592,
    )
    assert dn["munge_key_file"] == "/etc/munge/munge.key"
    assert site.tiers["flash"].path == "/var/lib/iosea-wf/local/tiers/flash"
    assert groups["datanodes"] == ["datanode1", "datanode2"]


def test_ssh_hosts_take_the_inventorys_standard_variables(tmp_path):
    _, hosts, _ = load_site_hosts(_twin(tmp_path, SSH_HOSTS))
    ctl, cn1, gn1, dn1 = hosts["ctl"], hosts["cn1"], hosts["gn1"], hosts["dn1"]
    assert (ctl.local, ctl.address, ctl.port, ctl.user) == (False, "127.0.66.1", 2201, "root")
    assert ctl.key_file == os.path.expanduser("~/keys/site")
    assert ctl.known_hosts == ("/etc/iosea/known_hosts",)
    # The multihost harness's way: ssh's own option in ansible_ssh_common_args.
    assert cn1.known_hosts == ("/h/known",)
    assert cn1.python == "/opt/python/bin/python3" and ctl.python == "/usr/bin/python3"
    assert cn1.settings["munge_key_file"] == "/etc/munge/other.key"
    assert cn1.port == 22 and cn1.key_file is None
    assert gn1.local
    assert dn1.become and not ctl.become
    assert dn1.settings["nfs_ganesha_address"] == "127.0.66.3"
    # Without any: ssh's own files.
    _, example, _ = load_site_hosts(ROOT / "inventories" / "example")
    first = example["mgmt01.example.org"]
    assert not first.local and first.user == "iosea"
    assert first.known_hosts == (os.path.expanduser("~/.ssh/known_hosts"), "/etc/ssh/ssh_known_hosts")
    assert len(example) == 128 + 16 + 4 + 1


def test_a_connection_the_check_cannot_make_is_a_site_error(tmp_path):
    twin = _twin(tmp_path, SSH_HOSTS.replace("ansible_connection: local", "ansible_connection: docker"))
    with pytest.raises(SiteError, match="gn1: ansible_connection 'docker'"):
        load_site_hosts(twin)


@pytest.mark.parametrize(
    ("state", "reason", "problem"),
    [
        ("idle", "none", None),
        ("mixed", "none", None),
        ("allocated", "", None),
        ("drained", "maintenance", "drained in Slurm (maintenance)"),
        ("draining", "swap", "draining in Slurm (swap)"),
        ("down*", "Not responding", "slurmd not registered with slurmctld: state down* (Not responding)"),
        ("idle*", "none", "slurmd not registered with slurmctld: state idle*"),
        ("unknown", "", "slurmd not registered with slurmctld: state unknown"),
        ("maint", "", "maint in Slurm"),
    ],
)
def test_node_states_say_what_is_wrong(state, reason, problem):
    assert slurm.NodeState("n1", state, reason).problem == problem


def test_node_states_parse_one_line_per_node_once():
    out = "cpu-node1 |idle |none |\ndatanode1 |drained |maint by root |\ncpu-node1 |idle |none |\n"
    states = slurm.parse_node_states(out)
    assert list(states) == ["cpu-node1", "datanode1"]
    assert states["datanode1"].reason == "maint by root"
    assert slurm.node_states_argv()[0] == "sinfo"
    with pytest.raises(slurm.SlurmUnreachable):
        slurm.node_states_answer(["sinfo"], 1, "", "sinfo: error: Unable to contact slurm controller")


def test_the_munge_key_never_leaves_the_host(tmp_path):
    key = tmp_path / "munge.key"
    secret = os.urandom(128)
    key.write_bytes(secret)
    a = site_probe.munge({"key_file": str(key), "socket": str(tmp_path / "none")}, "11" * 16, _soon())
    b = site_probe.munge({"key_file": str(key), "socket": str(tmp_path / "none")}, "22" * 16, _soon())
    text = json.dumps(a)
    assert secret.hex() not in text and secret.hex()[:16] not in text
    # The value compared is bound to the run's nonce: another run's says nothing of this one's.
    assert a["key_hmac"] != b["key_hmac"] and len(a["key_hmac"]) == 64
    assert "munged" in a["munged_error"]  # no munged on that socket
    key.chmod(0)
    if os.geteuid() != 0:
        assert (
            "cannot read the munge key"
            in site_probe.munge({"key_file": str(key)}, "11" * 16, _soon())["key_error"]
        )
    missing = site_probe.munge({"key_file": str(tmp_path / "gone")}, "11" * 16, _soon())
    assert "cannot read the munge key" in missing["key_error"] and "No such file" in missing["key_error"]


def _outcome(answer=None, error="", sent=1000.0, received=1000.1):
    return site_check._Outcome(answer=answer, error=error, sent=sent, received=received)


def test_munge_keys_are_judged_together():
    hosts = {n: None for n in ("a", "b", "c", "d")}
    outcomes = {
        "a": _outcome({"munge": {"key_hmac": "x"}}),
        "b": _outcome({"munge": {"key_hmac": "x"}}),
        "c": _outcome({"munge": {"key_hmac": "y"}}),
        "d": _outcome(error="ssh d: cannot connect"),
    }
    lines = site_check._munge_checks(hosts, outcomes, controller="a")
    assert [lines[n].status for n in "abcd"] == ["ok", "ok", "FAIL", "FAIL"]
    assert "differs from the one of 2 other host(s) (a, b)" in lines["c"].detail
    assert "x" not in lines["c"].detail.split("(")[0]
    assert "identical on all 2 hosts" in lines["a"].detail
    # A tie: the controller's key is the reference.
    tie = site_check._munge_checks({"a": None, "c": None}, {"a": outcomes["a"], "c": outcomes["c"]}, "c")
    assert tie["c"].status == "ok" and tie["a"].status == "FAIL"
    broken = {"a": _outcome({"munge": {"key_hmac": "x", "munged_error": "munged does not encode: down"}})}
    assert site_check._munge_checks({"a": None}, broken, "a")["a"].detail == "munged does not encode: down"


def test_clocks_are_judged_against_the_sites_median():
    # This machine's clock is 100 s behind the site's: the hosts' clocks are judged among themselves.
    outcomes = {
        "a": _outcome({"time": 1100.05}),
        "b": _outcome({"time": 1100.15}),
        "c": _outcome({"time": 1100.05 + site_check.CLOCK_TOLERANCE_S + 1}),
        "d": _outcome({"time": 1100.05 - 3}),
        "e": _outcome(error="unreachable"),
    }
    lines = site_check._clock_checks(outcomes)
    assert [lines[n].status for n in "abcde"] == ["ok", "ok", "FAIL", "ok", "FAIL"]
    assert lines["c"].detail.startswith("clock off: +15.950 s from the site's median")
    assert "tolerance 15 s" in lines["a"].detail and "±0.050 s" in lines["a"].detail
    assert site_check.CLOCK_TOLERANCE_S == 15
    assert "half the 60 s TTL" in site_check.Report("s", []).clock_rule()


def test_tiers_present_writable_and_enterable(tmp_path):
    good, closed, afile = tmp_path / "flash", tmp_path / "tape", tmp_path / "disk"
    good.mkdir(mode=0o1777)
    good.chmod(0o1777)
    closed.mkdir()
    closed.chmod(0o700)
    afile.write_text("")
    found = site_probe.tiers(
        [
            {"name": "flash", "path": str(good)},
            {"name": "tape", "path": str(closed)},
            {"name": "disk", "path": str(afile)},
            {"name": "gone", "path": str(tmp_path / "gone")},
        ]
    )
    by = {t["name"]: t for t in found}
    assert "error" not in by["flash"] and by["flash"]["mode"] == "1777" and by["flash"]["free_bytes"] > 0
    assert "other users cannot enter it" in by["tape"]["error"]
    assert by["disk"]["error"] == "not a directory"
    assert by["gone"]["error"].startswith("missing")
    assert sorted(os.listdir(good)) == []  # the probe's file is gone again


def _instance(tmp_path: Path, port: int, mount_port: int, exports: int = 0) -> Path:
    d = tmp_path / "instance"
    (d / "exports.d").mkdir(parents=True)
    (d / "instance.json").write_text(
        json.dumps({"address": "127.0.0.1", "port": port, "mount_port": mount_port})
    )
    for i in range(exports):
        (d / "exports.d" / f"e{i}.conf").write_text("")
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ganesha_prepared_down_drifted_or_blocked(tmp_path):
    port, mount_port = _free_port(), _free_port()
    ask = {"address": "127.0.0.1", "port": port, "mount_port": mount_port}
    none = site_probe.ganesha({"instance_dir": str(tmp_path / "none"), **ask}, _soon())
    assert none["error"].startswith(f"no prepared instance at {tmp_path / 'none'}")
    down = site_probe.ganesha(
        {"instance_dir": str(_instance(tmp_path, port, mount_port, exports=2)), **ask}, _soon()
    )
    assert (
        down["state"] == "down" and "ganesha is not running, yet 2 export(s) are configured" in down["error"]
    )
    drifted = site_probe.ganesha(
        {"instance_dir": str(tmp_path / "instance"), **ask, "port": port + 1}, _soon()
    )
    assert f"port {port!r} where the inventory says {port + 1!r}" in drifted["error"]
    shutil.rmtree(tmp_path / "instance")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        idle = site_probe.ganesha(
            {"instance_dir": str(_instance(tmp_path, port, mount_port)), **ask}, _soon()
        )
    assert idle["state"] == "idle"
    assert f"another process listens on 127.0.0.1:{port}: ganesha could not start" in idle["error"]


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        body = json.dumps(
            {"openapi": "3.1.0", "info": {"title": "iosea-wf Workflow Manager", "version": "1"}}
        )
        self.send_response(200 if self.path == "/v1/openapi.json" else 404)
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):
        conn, _ = super().get_request()
        return conn, ("local", 0)


def test_workflow_manager_answers_or_not(tmp_path):
    path = tmp_path / "wm.sock"
    server = _UnixServer(str(path), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        found = site_probe.workflow_manager(f"unix://{path}", 2)
    finally:
        server.shutdown()
        server.server_close()
    assert (found["title"], found["version"]) == ("iosea-wf Workflow Manager", "1")
    dead = site_probe.workflow_manager(f"unix://{tmp_path}/dead.sock", 2)
    assert dead["error"].startswith(f"no answer at unix://{tmp_path}/dead.sock")
    assert "not a Workflow Manager URL" in site_probe.workflow_manager("ftp://x", 1)["error"]
    line = site_check._wm_check("wm", "unix:///x", dead, None)
    assert line.status == "FAIL" and line.check == "workflow_manager"


def test_the_probe_needs_nothing_but_the_standard_library():
    import ast
    import sys

    tree = ast.parse(Path(site_probe.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {
        n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0
    }
    assert names - {"__future__"} <= sys.stdlib_module_names, names - sys.stdlib_module_names


def test_the_remote_command_is_one_absolute_python_and_the_request_one_word(tmp_path):
    _, hosts, _ = load_site_hosts(_twin(tmp_path, SSH_HOSTS))
    request = {"nonce": "ab" * 16, "tiers": [{"name": "t", "path": "/x; rm -rf / $(id) 'q'"}]}
    words = shlex.split(site_check._probe_command(hosts["ctl"], request))
    assert words[:3] == ["/usr/bin/python3", "-I", "-"] and json.loads(words[3]) == request
    assert shlex.split(site_check._probe_command(hosts["dn1"], request))[:4] == [
        "sudo",
        "-n",
        "--",
        "/usr/bin/python3",
    ]
    assert site_probe.main([]) == 2


def test_a_host_without_known_hosts_is_not_contacted(tmp_path):
    _, hosts, _ = load_site_hosts(_twin(tmp_path, SSH_HOSTS))
    outcome = site_check._ssh_probe(hosts["ctl"], {}, 2)
    assert "no known-hosts file (/etc/iosea/known_hosts): its host key cannot be checked" in outcome.error


def _report(failing: bool) -> site_check.Report:
    report = site_check.Report(site="/sites/s", hosts=["a", "b"], seconds=0.5)
    report.checks = [
        site_check.Check("a", "reachable", "ok", "local"),
        site_check.Check("b", "reachable", "FAIL" if failing else "ok", "ssh b: refused"),
        site_check.Check("b", "munge", "FAIL" if failing else "ok", "not checked"),
        site_check.Check("a", "workflow_manager", "skip", "none"),
    ]
    return report


def test_output_one_line_per_host_and_check_and_exit_13(iosea, monkeypatch):
    assert EXIT_UNHEALTHY == 13 and 13 in EXIT_CODES
    monkeypatch.setattr(site_check, "check_site", lambda site, timeout: _report(failing=True))
    r = iosea("site", "check")
    assert r.code == 13, r.err
    lines = r.out.splitlines()
    assert lines[1].split() == ["HOST", "CHECK", "RESULT", "DETAIL"]
    assert lines[3].split()[:3] == ["b", "reachable", "FAIL"]
    assert lines[-1] == "summary: 3 checks on 2 hosts in 0.50 s: 2 FAILED: b (unreachable)"
    r = iosea("site", "check", "--json")
    data = r.json()
    assert r.code == 13 and data["ok"] is False and data["failed"] == 2
    assert data["checks"][1] == {
        "host": "b",
        "check": "reachable",
        "status": "FAIL",
        "detail": "ssh b: refused",
    }
    monkeypatch.setattr(site_check, "check_site", lambda site, timeout: _report(failing=False))
    r = iosea("site", "check")
    assert r.code == 0 and r.out.splitlines()[-1] == "summary: 3 checks on 2 hosts in 0.50 s: all passed"
    assert iosea("site", "check", "--timeout", "0").code == 2
    assert iosea("site").code == 2
    assert "13   site check: at least one check of a host failed" in iosea("--help").out


def test_a_host_that_accepts_and_says_nothing_is_given_up_within_the_timeout(tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text("")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel completes the handshake; nobody ever speaks SSH
        port = silent.getsockname()[1]
        hosts_yml = SSH_HOSTS.replace("127.0.66.1", "127.0.0.1").replace("2201", str(port))
        _, hosts, _ = load_site_hosts(
            _twin(tmp_path, hosts_yml.replace("/etc/iosea/known_hosts", str(known)))
        )
        started = time.monotonic()
        outcome = site_check._ssh_probe(hosts["ctl"], {}, 2)
        took = time.monotonic() - started
    assert outcome.error.startswith(f"ssh root@127.0.0.1:{port}: ")
    assert took < 4, took


def test_ganesha_is_probed_under_its_instance_lock(tmp_path):
    # A control-script command in progress (it holds the instance's lock exclusively) is waited for:
    # an export written while its server starts is never taken for a server that is down.
    import fcntl

    port, mount_port = _free_port(), _free_port()
    instance = _instance(tmp_path, port, mount_port, exports=1)
    lock = open(instance / ".lock", "a")  # noqa: SIM115
    fcntl.flock(lock, fcntl.LOCK_EX)

    def command_ends():
        time.sleep(0.5)
        (instance / "exports.d" / "e0.conf").unlink()
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()

    threading.Thread(target=command_ends).start()
    ask = {"instance_dir": str(instance), "address": "127.0.0.1", "port": port, "mount_port": mount_port}
    found = site_probe.ganesha(ask, _soon())
    assert found["state"] == "idle" and found["exports"] == 0


def test_ctrl_c_ends_the_check_at_once(tmp_path):
    # Every host over SSH to a socket that never speaks: without Ctrl-C the check would take --timeout.
    import signal
    import subprocess
    import sys

    known = tmp_path / "known_hosts"
    known.write_text("")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        reach = f"ansible_host: 127.0.0.1, ansible_port: {port}, iosea_ssh_known_hosts: '{known}'"
        datanode = (
            "iosea_datanode_address: 127.0.0.1, iosea_datanode_cores: 8, iosea_datanode_memory_mb: 8000"
        )
        datanode += ", iosea_datanode_storage_gb: 100, iosea_datanode_modules: [cpu_module, gpu_module]"
        site = _twin(
            tmp_path,
            "all:\n  children:\n"
            f"    slurm_controller: {{hosts: {{ctl: {{{reach}}}}}}}\n"
            "    compute:\n      children:\n"
            f"        cpu_module: {{hosts: {{c1: {{{reach}}}}}}}\n"
            f"        gpu_module: {{hosts: {{g1: {{{reach}}}}}}}\n"
            f"    datanodes: {{hosts: {{d1: {{{reach}, {datanode}}}}}}}\n",
        )
        env = {k: v for k, v in os.environ.items() if k not in ("IOSEA_WF_URL",)}
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "iosea-wf"),
                "--site",
                str(site),
                "site",
                "check",
                "--timeout",
                "20",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(3)  # past the inventory's reading: the probes wait on the silent socket
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - started
    assert proc.returncode == 130, err
    assert took < 2, took
    assert "iosea-wf: interrupted" in err and "Traceback" not in err


def test_an_rpc_null_call_goes_to_the_port_itself():
    # A tiny ONC RPC server: accepts program 100005 version 3, answers PROG_UNAVAIL to others.
    import struct

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve():
        for _ in range(2):
            conn, _ = server.accept()
            with conn:
                data = conn.recv(4096)
                xid, _, _, program, version = struct.unpack(">5I", data[4:24])
                accept = 0 if (program, version) == (100005, 3) else 1
                body = struct.pack(">6I", xid, 1, 0, 0, 0, accept)
                conn.sendall(struct.pack(">I", 0x80000000 | len(body)) + body)

    threading.Thread(target=serve, daemon=True).start()
    port = server.getsockname()[1]
    try:
        assert site_probe.rpc_null("127.0.0.1", port, 100005, 3, 2) == ""
        assert site_probe.rpc_null("127.0.0.1", port, 100003, 4, 2) == "program unavailable"
    finally:
        server.close()
    assert site_probe.rpc_null("127.0.0.1", _free_port(), 100005, 3, 2) == "Connection refused"
