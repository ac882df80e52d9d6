"""Nowhere is SSH host key checking turned off; the multi-host site checks keys against its known_hosts."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from iosea_wf.site import load_site

REPO = Path(__file__).resolve().parents[2]
# Spellings that turn checking off: Ansible's setting and variable, and OpenSSH's option.
OFF = re.compile(
    r"host_key_checking\s*[=:]\s*(false|no|0)|ANSIBLE_HOST_KEY_CHECKING|StrictHostKeyChecking\s*=\s*(no|off)",
    re.IGNORECASE,
)


def _project_files():
    tops = ("ansible.cfg", "iosea_wf", "inventories", "playbooks", "roles", "molecule", "tools", "Makefile")
    for top in tops:
        path = REPO / top
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            if "__pycache__" not in file.parts and file.suffix not in (".pyc", ".whl"):
                yield file


def test_no_file_of_the_project_turns_host_key_checking_off():
    offending = [
        f"{p.relative_to(REPO)}: {m.group(0)}"
        for p in _project_files()
        for m in OFF.finditer(p.read_text(errors="replace"))
    ]
    assert offending == []


def test_the_multihost_site_checks_host_keys_against_one_known_hosts():
    hosts = yaml.safe_load((REPO / "inventories" / "multihost" / "hosts.yml").read_text())
    common = hosts["all"]["vars"]
    args = common["ansible_ssh_common_args"].split()
    known = common["iosea_ssh_known_hosts"]
    assert f"UserKnownHostsFile={known}" in args
    assert "StrictHostKeyChecking=yes" in args


def test_the_multihost_site_is_a_valid_site_of_separate_hosts():
    site = load_site(REPO / "inventories" / "multihost")
    assert {d.name: d.address for d in site.datanodes.values()} == {
        "datanode1": "127.0.50.11",
        "datanode2": "127.0.50.12",
    }
    # The only NFS clients an export admits: the compute hosts and the datanodes, by address.
    assert set(site.nfs_clients) == {"127.0.50.21", "127.0.50.22", "127.0.50.11", "127.0.50.12", "127.0.50.2"}
    assert {m.name: m.nodes for m in site.modules.values()} == {
        "cpu_module": ("compute1",),
        "gpu_module": ("compute2",),
    }
