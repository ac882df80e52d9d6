"""Run one manager operation as root on behalf of another user, as the Workflow Manager service does.

Used by test_jobs_as_user.py with the shared venv's Python (a Python every user can run, so the
jobs submitted for the user can run the attach helper and the data mover). The user's Slurm token
comes in the environment variable IOSEA_TEST_JWT (never on the command line).

    python manager_for_user.py OPERATION USER STATE_DIR ARGS...
      start WORKFLOW SESSION | run SESSION STEP | cancel SESSION STEP | stop SESSION
      | access SESSION COMMAND...

Prints the operation's result as JSON; an IoseaError exits with its code and message.
"""

from __future__ import annotations

import json
import os
import sys

from iosea_wf import manager
from iosea_wf.errors import IoseaError


def main(argv: list[str]) -> int:
    """Run the operation named by argv[0] for the user argv[1] with the store in argv[2]."""
    op, user, state_dir, *rest = argv
    token = os.environ.pop("IOSEA_TEST_JWT", "") or None
    ctx = manager.Context(user=user, state_dir=state_dir, slurm_jwt=token)
    try:
        if op == "start":
            result = {"state": manager.start(ctx, rest[0], rest[1], {})["state"]}
        elif op == "run":
            result = manager.run(ctx, rest[0], rest[1])
        elif op == "cancel":
            result = {"cancelled": manager.cancel(ctx, rest[0], rest[1])}
        elif op == "access":
            result = {"rc": manager.access(ctx, rest[0], rest[1:], immediate=True)}
        elif op == "stop":
            result = {"state": manager.stop(ctx, rest[0], force=True)["state"]}
        else:
            print(f"unknown operation {op}", file=sys.stderr)
            return 2
    except IoseaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
