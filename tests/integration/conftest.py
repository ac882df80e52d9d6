"""Integration tests run against the real local site (`make site`): real Slurm, real nfs-ganesha."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import site_is_up

# Real users through a service (module-scoped: one venv, one service, one pair of users per module).
from tests.integration.service_users import as_user, client_bin, service, user_venv, users  # noqa: F401

BIN = Path(sys.executable).parent


def pytest_collection_modifyitems(config, items):
    """Mark every test here `site`; without the site, skip them, or fail under IOSEA_WF_REQUIRE_SITE=1."""
    up = None
    for item in items:
        if "integration" not in str(item.fspath):
            continue
        item.add_marker(pytest.mark.site)
        if up is None:
            up = site_is_up()
        if not up and os.environ.get("IOSEA_WF_REQUIRE_SITE") != "1":
            item.add_marker(pytest.mark.skip(reason="the local site is not up (run `make site`)"))


@pytest.fixture
def cli_env(state_dir):
    """Environment for running the console script as a separate process."""
    env = dict(os.environ)
    env["IOSEA_WF_HOME"] = str(state_dir)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture
def iosea_proc(cli_env):
    """Run `iosea-wf ...` as a real process: iosea_proc("start", ...) -> CompletedProcess."""

    def run(*argv, timeout=180, **kw):
        return subprocess.run(
            [str(BIN / "iosea-wf"), *map(str, argv)],
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            **kw,
        )

    return run


def nfs_read(url: str, name: str) -> subprocess.CompletedProcess:
    """Read one file of an NFS export through its libnfs URL with a real NFS client (nfs-cat)."""
    base, _, query = url.partition("?")
    full = f"{base}/{name}" + (f"?{query}" if query else "")
    return subprocess.run(["nfs-cat", full], capture_output=True, text=True, timeout=30)


def nfs_list(url: str) -> subprocess.CompletedProcess:
    """List an NFS export through its URL with nfs-ls."""
    return subprocess.run(["nfs-ls", url], capture_output=True, text=True, timeout=30)


WDF_ONE = """\
workflow:
  name: wf_{tag}
services:
{services}
steps:
  - name: step1
    location: cpu_module
    command: "sbatch job.sh"
    services:
{refs}
"""


def write_wdf(
    path: Path, namespaces: list[Path], *, flavor: str | None = None, tag: str = "t", create: bool = True
) -> Path:
    """A WDF with one NFS service per namespace (made if missing and ``create``), all used by one step."""
    services, refs = [], []
    for i, ns in enumerate(namespaces, 1):
        # Namespaces are the users' and must exist: iosea-wf never creates them.
        if create:
            Path(ns).mkdir(parents=True, exist_ok=True)
        flavor_line = f"\n      flavor: {flavor}" if flavor else ""
        services.append(
            f"  - name: es{i}\n    type: NFS\n    attributes:\n      namespace: {ns}\n"
            f"      mountpoint: /mnt/iosea-test/{{{{ SESSION }}}}/es{i}{flavor_line}"
        )
        refs.append(f"      - name: es{i} RW")
    path.write_text(WDF_ONE.format(tag=tag, services="\n".join(services), refs="\n".join(refs)))
    return path
