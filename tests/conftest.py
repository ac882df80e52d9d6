"""Shared fixtures: every test points the state dir into a temporary directory."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from iosea_wf import cli

ROOT = Path(__file__).resolve().parent.parent
LOCAL_SITE = ROOT / "inventories" / "local"
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


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    """A private state dir for the test (also exported as IOSEA_WF_HOME)."""
    d = tmp_path / "state"
    monkeypatch.setenv("IOSEA_WF_HOME", str(d))
    monkeypatch.delenv("IOSEA_WF_SITE", raising=False)
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
