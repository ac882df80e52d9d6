"""Shared fixtures: every test points the state dir into a temporary directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from iosea_wf import cli
from tests.sites import ROOT, inprocess_twin

EXAMPLE_SITE = ROOT / "inventories" / "example"


@dataclass
class Result:
    """What one in-process CLI call returned and printed."""

    code: int
    out: str
    err: str

    def json(self):
        """stdout parsed as JSON."""
        return json.loads(self.out)


@pytest.fixture(scope="session")
def inprocess_site() -> Iterator[Path]:
    """The local site as an inventory that names no Workflow Manager: the CLI works in-process.

    The local site's inventory names its service (iosea_wm_url), so every command through it goes
    to the one store the service keeps; a test with a private store uses this twin instead: the
    same files (linked), all but the one naming the service. In a folder every user can read:
    tests run the CLI as real users too.
    """
    base = Path(tempfile.mkdtemp(prefix="iosea-wf-inprocess-site-", dir="/tmp"))
    base.chmod(0o755)
    twin = inprocess_twin(base)
    yield twin
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def state_dir(tmp_path, monkeypatch, inprocess_site):
    """A private state dir for the test (also exported as IOSEA_WF_HOME), on the in-process site."""
    d = tmp_path / "state"
    monkeypatch.setenv("IOSEA_WF_HOME", str(d))
    monkeypatch.setenv("IOSEA_WF_SITE", str(inprocess_site))
    # In-process tests stay in-process even where the shell names a Workflow Manager service.
    monkeypatch.delenv("IOSEA_WF_URL", raising=False)
    return d


@pytest.fixture
def iosea(state_dir, capsys):
    """Call the CLI in-process: iosea("start", "SESSION=x", ...) -> Result."""

    def call(*argv: str) -> Result:
        code = cli.main([str(a) for a in argv])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return call


def site_is_up() -> bool:
    """True when the local site's Slurm answers (brought up by `make site`)."""
    if not shutil.which("sinfo"):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0 and bool(out.stdout.strip())


def _site_service_sessions() -> set[str] | None:
    """Names of root's live sessions in the local site's own service, or None if it is not up."""
    env = {k: v for k, v in os.environ.items() if k not in ("IOSEA_WF_URL", "IOSEA_WF_SITE", "IOSEA_WF_HOME")}
    try:
        done = subprocess.run(
            [str(Path(sys.executable).parent / "iosea-wf"), "list", "--json"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        return None
    return {s["session"] for s in json.loads(done.stdout)["sessions"]}


@pytest.fixture(scope="session", autouse=True)
def site_service_untouched():
    """No test leaves a live session in the site's own store (tests keep private stores)."""
    before = _site_service_sessions()
    yield
    after = _site_service_sessions()
    if before is not None and after is not None:
        assert after <= before, f"tests left live sessions in the site's service: {sorted(after - before)}"
