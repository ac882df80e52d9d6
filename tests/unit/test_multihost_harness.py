"""The multi-host harness's pure parts: addresses, and that `down` can never reach the machine's processes."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("harness", REPO / "tools" / "multihost" / "harness.py")
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)


def test_a_holder_in_the_machines_own_namespaces_matches_no_process():
    # The switch holder shares the root mount namespace: `down` must not take that for its own.
    assert harness.namespace_pids(os.getpid()) == []


def test_the_harness_builds_the_hosts_the_inventory_describes():
    hosts = yaml.safe_load((REPO / "inventories" / "multihost" / "hosts.yml").read_text())
    described = {}

    def walk(group):
        for name, hv in (group.get("hosts") or {}).items():
            described[name] = (hv or {}).get("ansible_host", described.get(name))
        for child in (group.get("children") or {}).values():
            walk(child or {})

    walk(hosts["all"])
    assert described == {h: harness.address(h) for h in harness.HOSTS}
