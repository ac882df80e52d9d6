"""The Workflow Manager as its own unprivileged account: not root, and alice's workflow still runs.

The service here is `iosea-wf serve` started as the site's account (iosea-wf, roles/
privileged_helpers) the way roles/workflow_manager starts it when the site sets
iosea_wm_run_as_account: setpriv, slurmrestd for users' jobs. Its process is not uid 0; alice's
design-note workflow runs end to end through it (the test of test_service_workflow, with this
module's service): exports through the privileged helpers, every job alice's, submitted with her
token only, every file alice's.
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.api_service import need_munge, running_service
from tests.integration.test_service_workflow import (  # noqa: F401 (the same test, this module's service)
    nothing_left,
    test_alice_runs_the_design_notes_workflow_through_the_service,
)

ACCOUNT = "iosea-wf"
_RUNNING: dict[str, int] = {}


@pytest.fixture(scope="module")
def service(user_venv):
    """The service as the account, its socket in a folder every user can reach: unix:// URL."""
    need_munge()
    try:
        pwd.getpwnam(ACCOUNT)
    except KeyError:
        pytest.fail(f"no account {ACCOUNT}: run `make site` (role privileged_helpers)")
    folder = Path(tempfile.mkdtemp(prefix="iosea-wf-wm-account-", dir="/tmp"))
    folder.chmod(0o755)
    try:
        sock, state = folder / "wm.sock", folder / "state"
        with running_service(sock, state, bin_dir=user_venv, account=ACCOUNT) as proc:
            _RUNNING["pid"] = proc.pid
            yield f"unix://{folder / 'wm.sock'}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_the_services_process_is_the_account_not_root(service):
    status = Path(f"/proc/{_RUNNING['pid']}/status").read_text()
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert set(uids) == {str(pwd.getpwnam(ACCOUNT).pw_uid)} and "0" not in uids
    assert os.stat(Path(service.removeprefix("unix://"))).st_uid == pwd.getpwnam(ACCOUNT).pw_uid
