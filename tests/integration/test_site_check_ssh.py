"""`iosea-wf site check` over real SSH: a throwaway sshd of the test's own on a 127.0.x.y address.

The sshd has its own host key and authorises one user key of its own; it runs as root on this
machine, so hosts of a twin of the local inventory that go through it see the real local site.
Host keys are checked: a known-hosts file with another key for that address, or without it, is
refused, and the file is never written.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.test_site_check import failed, lines, site_check, twin

SSHD = "/usr/sbin/sshd"
ADDRESS = "127.0.77.1"


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30)
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """(address, port, dir) of a running sshd with its own host key and one authorised user key."""
    if not os.path.exists(SSHD):
        pytest.fail(f"{SSHD} is missing: `make install` installs openssh-server")
    d = tmp_path_factory.mktemp("sshd")
    host_key = _keygen(d / "host_key")
    _keygen(d / "user_key")
    _keygen(d / "other_user_key")
    _keygen(d / "other_host_key")
    (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
    (d / "authorized_keys").chmod(0o600)
    port = _free_port(ADDRESS)
    (d / "sshd_config").write_text(
        f"ListenAddress {ADDRESS}\nPort {port}\nHostKey {d}/host_key\n"
        f"AuthorizedKeysFile {d}/authorized_keys\n"
        f"PidFile {d}/sshd.pid\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        # The key files live under /tmp (mode 1777), which StrictModes refuses as a parent.
        "StrictModes no\nPermitRootLogin prohibit-password\n"
    )
    (d / "known_hosts").write_text(f"[{ADDRESS}]:{port} {host_key}\n")
    other = " ".join((d / "other_host_key.pub").read_text().split()[:2])
    (d / "known_hosts_other").write_text(f"[{ADDRESS}]:{port} {other}\n")
    (d / "known_hosts_empty").write_text("")
    Path("/run/sshd").mkdir(exist_ok=True)  # its privilege separation directory
    proc = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
        stderr=open(d / "sshd.log", "w"),  # noqa: SIM115
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection((ADDRESS, port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, (d / "sshd.log").read_text()
            assert time.monotonic() < deadline, "sshd did not listen"
            time.sleep(0.05)
    yield ADDRESS, port, d
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    shutil.rmtree(d, ignore_errors=True)


def ssh_site(tmp_path: Path, sshd, known: str = "known_hosts", key: str = "user_key") -> Path:
    """The local site, with datanode1 and cpu-node1 reached over SSH through the test's sshd."""
    address, port, d = sshd
    over_ssh = {
        "ansible_connection": "ssh",
        "ansible_host": address,
        "ansible_port": port,
        "ansible_user": "root",
        "ansible_ssh_private_key_file": str(d / key),
        "iosea_ssh_known_hosts": str(d / known),
        "ansible_python_interpreter": "/usr/bin/python3",
    }
    return twin(tmp_path, hosts={"datanode1": over_ssh, "cpu-node1": over_ssh})


def test_hosts_over_ssh_are_reached_and_checked(tmp_path, sshd):
    address, port, d = sshd
    code, report, _ = site_check(site=ssh_site(tmp_path, sshd))
    assert code == 0, [c for c in report["checks"] if c["status"] == "FAIL"]
    reach = lines(report, "reachable")
    for host in ("datanode1", "cpu-node1"):
        assert reach[host]["detail"].startswith(f"ssh root@{address}:{port}, host key checked against {d}")
    assert reach["datanode2"]["detail"].startswith("local connection")
    # What the probe saw over SSH is judged like the rest: the same munge key, a running or ready ganesha.
    assert lines(report, "munge")["datanode1"]["status"] == "ok"
    assert lines(report, "ganesha")["datanode1"]["status"] == "ok"
    assert lines(report, "tier flash")["datanode1"]["status"] == "ok"


def test_a_changed_host_key_is_refused(tmp_path, sshd):
    _, _, d = sshd
    before = (d / "known_hosts_other").read_text()
    code, report, _ = site_check(site=ssh_site(tmp_path, sshd, known="known_hosts_other"))
    assert code == 13
    detail = lines(report, "reachable")["datanode1"]["detail"]
    assert "host key MISMATCH" in detail and "refused" in detail
    assert ("datanode1", "reachable") in failed(report) and ("cpu-node1", "reachable") in failed(report)
    # Nothing of those hosts is trusted: their own checks are not passed either.
    assert lines(report, "munge")["datanode1"]["status"] == "FAIL"
    assert (d / "known_hosts_other").read_text() == before


def test_an_unknown_host_key_is_refused_and_never_added(tmp_path, sshd):
    _, _, d = sshd
    code, report, _ = site_check(site=ssh_site(tmp_path, sshd, known="known_hosts_empty"))
    assert code == 13
    assert "host key unknown to" in lines(report, "reachable")["cpu-node1"]["detail"]
    assert (d / "known_hosts_empty").read_text() == ""


def test_a_key_the_host_does_not_authorise_is_refused(tmp_path, sshd):
    code, report, _ = site_check(site=ssh_site(tmp_path, sshd, key="other_user_key"))
    assert code == 13
    assert "authentication refused with key" in lines(report, "reachable")["datanode1"]["detail"]
