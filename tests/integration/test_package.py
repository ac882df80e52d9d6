"""The wheel is a complete tool: built, installed into a fresh venv, run on the local site.

The venv is made from Debian's own /usr/bin/python3 and the commands run with only its bin/ and
/usr/bin:/bin on PATH, from a directory outside the checkout: everything (playbooks, roles, the
local inventory, iosea-wf-mover in the jobs) must come from the installed package. The site is a
copy of the packaged local inventory minus the file that names the site's Workflow Manager
service, so the commands run in-process, on what the wheel carries.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.packaging import ROOT, SYSTEM_PYTHON, build_wheel, system_venv

WDF = """\
workflow:
  name: packaged
services:
  - name: es1
    type: NFS
    attributes:
      namespace: {ns}
      mountpoint: /mnt/iosea-test/{{{{ SESSION }}}}/es1
datamovers:
  - name: stage
    trigger: step_start
    target: flash
    operation: copy
    elements: "*.dat"
steps:
  - name: look
    location: cpu_module
    command: "sbatch job.sh"
    services:
      - name: es1 RO
        datamovers: [stage]
"""

JOB = """\
#!/bin/bash
ls "$IOSEA_SERVICE_ES1_MOUNTPOINT" > listing.txt
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """bin/ of a fresh venv (Debian's python3) with the project's wheel installed (not editable)."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.fail(f"{SYSTEM_PYTHON} is missing: `make install` installs Debian's python3-venv")
    base = tmp_path_factory.mktemp("package")
    wheel = build_wheel(base)
    bin_dir = system_venv(base / "venv")
    # Dependencies come from the index pip is configured with; pip's wheel cache keeps this fast.
    subprocess.run([str(bin_dir / "pip"), "install", "-q", str(wheel)], check=True, timeout=600)
    return bin_dir


@pytest.fixture(scope="module")
def packaged_site(installed, tmp_path_factory):
    """The packaged local inventory without the file naming the site's service: in-process.

    The packaged inventory names the local site's Workflow Manager (its ``iosea_wm_url``); this
    module is about what the wheel carries (playbooks, roles, inventory, mover) working on its own.
    """
    where = subprocess.run(
        [str(installed / "python"), "-c", "import iosea_wf.site as s; print(s.LOCAL_SITE)"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    packaged = Path(where.stdout.strip())
    assert (packaged / "group_vars" / "all" / "workflow_manager.yml").is_file()
    twin = tmp_path_factory.mktemp("packaged-site") / "local"
    shutil.copytree(packaged, twin, ignore=shutil.ignore_patterns("workflow_manager.yml"))
    return twin


@pytest.fixture
def outside(tmp_path, installed, packaged_site):
    """Run an installed command from a work dir outside the checkout, with a minimal PATH."""
    work = tmp_path / "work"
    work.mkdir()
    env = {
        "HOME": os.environ.get("HOME", "/root"),
        "PATH": f"{installed}:/usr/bin:/bin",
        "IOSEA_WF_HOME": str(tmp_path / "state"),
        "IOSEA_WF_SITE": str(packaged_site),
        "IOSEA_WF_WARM_ANSIBLE": "20",
        "LANG": "C.UTF-8",
    }

    def run(*argv: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), cwd=work, env=env, capture_output=True, text=True, timeout=timeout)

    return work, run


def test_installed_package_needs_nothing_from_the_checkout(outside, installed):
    _, run = outside
    r = run(
        "python", "-c", "import iosea_wf, iosea_wf.site as s; print(iosea_wf.__file__); print(s.LOCAL_SITE)"
    )
    assert r.returncode == 0, r.stderr
    module, local_site = r.stdout.split()
    assert module.startswith(str(installed.parent)) and not module.startswith(str(ROOT))
    assert Path(local_site, "hosts.yml").is_file() and not Path(local_site).is_symlink()
    r = run("iosea-wf", "--version")
    assert r.returncode == 0 and r.stdout.startswith("iosea-wf 0.")


def test_validate_show_start_run_stop_from_the_wheel(outside, installed, tmp_path):
    work, run = outside
    ns = tmp_path / "ns"
    ns.mkdir()
    (ns / "a.dat").write_text("dataset\n")
    (work / "wf.yaml").write_text(WDF.format(ns=ns))
    (work / "job.sh").write_text(JOB)
    session = f"pkg{os.getpid()}"

    r = run("iosea-wf", "validate", "WORKFLOW=wf.yaml")
    assert r.returncode == 0, r.stderr
    assert "valid: workflow packaged" in r.stdout and "on site local" in r.stdout
    r = run("iosea-wf", "show", "flavors", "--json")
    assert r.returncode == 0, r.stderr
    assert "small" in {f["name"] for f in json.loads(r.stdout)["flavors"]}

    r = run("iosea-wf", "start", "WORKFLOW=wf.yaml", f"SESSION={session}", "--json")
    assert r.returncode == 0, r.stderr
    try:
        assert json.loads(r.stdout)["state"] == "ACTIVE"
        r = run("iosea-wf", "run", f"SESSION={session}", "STEP=look", "--wait", "--json")
        assert r.returncode == 0, r.stderr
        view = json.loads(r.stdout)
        assert view["state"] == "COMPLETED"
        assert [m["state"] for m in view["datamovers"]] == ["COMPLETED"]  # the installed mover ran
        assert (work / "listing.txt").read_text().split() == ["a.dat"]  # the service was attached
    finally:
        r = run("iosea-wf", "stop", f"SESSION={session}")
    assert r.returncode == 0, r.stderr
    assert f"session {session}: STOPPED" in r.stdout
