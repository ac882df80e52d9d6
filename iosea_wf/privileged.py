"""The ONE place that builds the calls of the site's privileged helpers: ``sudo -n HELPER ARGS``.

A Workflow Manager that does not run as root (its own account, roles/privileged_helpers) does
what only root may do on a node through small root-owned helpers, one per action, that a sudoers
rule allows for that account by name (never a shell: Ansible's ``become`` would run ``/bin/sh``
as root). Each helper re-checks its arguments itself and takes the site's facts from a root-owned
file, so this module only says what is asked; the helpers decide. Arguments are lists, never a
command string. A process that is root does these actions itself, as before.

Roles call the same helpers the same way (roles/nfs_service: export-add, export-remove).
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

from .errors import OrchestrationError, SlurmError
from .identity import current_user

HELPERS_DIR = "/usr/local/libexec/iosea-wf"
# The Workflow Manager's account (roles/privileged_helpers), unless the site names another.
DEFAULT_ACCOUNT = "iosea-wf"
# A helper refuses its arguments with this exit code (roles/privileged_helpers/files/iosea_helper.py).
REFUSED = 2
_TIMEOUT = 60


def in_use(site_variables: dict[str, Any]) -> bool:
    """True when the site has the privileged helpers and this process is its service account.

    Root does the actions itself; any other user (the in-process CLI of a user) does what its own
    rights allow, as without helpers: the sudoers rule is for the service account only.
    """
    if not site_variables.get("iosea_privileged_helpers", False) or os.geteuid() == 0:
        return False
    return current_user() == site_variables.get("iosea_wm_account", DEFAULT_ACCOUNT)


def helpers_dir(site_variables: dict[str, Any]) -> str:
    """Where the site's helpers are (``iosea_privileged_helpers_dir``, else the default)."""
    return str(site_variables.get("iosea_privileged_helpers_dir") or HELPERS_DIR)


def argv(action: str, *args: str, directory: str = HELPERS_DIR) -> list[str]:
    """The argument list that runs helper ``action`` as root through sudo, without a password prompt."""
    if not action.replace("-", "").isalpha():
        raise ValueError(f"not a helper name: {action!r}")
    return ["sudo", "-n", os.path.join(directory, action), *args]


def call(action: str, args: list[str], *, directory: str = HELPERS_DIR, error=OrchestrationError) -> dict:
    """Run one helper; its JSON answer, or ``error`` with the helper's own line (refusal or failure)."""
    words = argv(action, *args, directory=directory)
    try:
        proc = subprocess.run(words, capture_output=True, text=True, timeout=_TIMEOUT, check=False)
    except FileNotFoundError:
        raise error(f"sudo is not installed: the privileged helper {action} cannot run") from None
    except subprocess.TimeoutExpired:
        raise error(f"the privileged helper {action} did not answer within {_TIMEOUT} s") from None
    if proc.returncode != 0:
        said = (proc.stderr or proc.stdout).strip().splitlines()
        raise error(said[-1] if said else f"the privileged helper {action} failed (exit {proc.returncode})")
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {}


def tier_dir(site_variables: dict[str, Any], tier: str, user: str) -> str:
    """Make (or check) ``user``'s 0700 directory on ``tier`` as root; its path."""
    done = call("tier-dir", ["--tier", tier, "--user", user], directory=helpers_dir(site_variables))
    return str(done.get("path", ""))


def cancel_job(site_variables: dict[str, Any], job_id: str) -> None:
    """Cancel one iosea-wf job of another user as root (one the service holds no token for)."""
    call("cancel-job", ["--job", str(job_id)], directory=helpers_dir(site_variables), error=SlurmError)
