"""The CLI two ways, as subprocesses: in-process (a private store) and through a private service."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.api_service import need_munge, running_service
from tests.integration.conftest import BIN


@pytest.fixture
def sides(tmp_path, cli_env):
    """{"in-process": env, "service": env}: the environments of the CLI each way, same site."""
    need_munge()
    folder = tmp_path / "svc"
    folder.mkdir()
    remote = {k: v for k, v in cli_env.items() if k != "IOSEA_WF_HOME"}
    remote["IOSEA_WF_URL"] = f"unix://{folder / 'wm.sock'}"
    with running_service(folder / "wm.sock", folder / "state", "--site", cli_env["IOSEA_WF_SITE"]):
        yield {"in-process": cli_env, "service": remote}


def cli(env: dict[str, str], cwd: Path, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `iosea-wf ARGV` in ``cwd`` with ``env``."""
    return subprocess.run(
        [str(BIN / "iosea-wf"), *argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
