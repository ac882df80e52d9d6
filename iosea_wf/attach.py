"""Attach a session's services inside a job, then run the job's own command.

The local site attaches services by bind-mounting each service's namespace at its WDF mountpoint
in a private mount namespace of the job (read-only for ``RO``), since this kernel has no NFS
client. A generated batch script runs::

    unshare --mount --propagation private -- python -m iosea_wf.attach \
        --bind NAMESPACE:MOUNTPOINT:ro ... -- COMMAND ARGS...

How a site attaches is its ``iosea_service_attach`` setting (``bind`` or ``env``), not code here.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def _bind(source: str, target: str, mode: str) -> None:
    os.makedirs(target, exist_ok=True)
    subprocess.run(["mount", "--bind", source, target], check=True)
    if mode == "ro":
        # A bind mount only becomes read-only through a remount.
        subprocess.run(["mount", "-o", "remount,bind,ro", target], check=True)


def main(argv: list[str] | None = None) -> int:
    """Bind every ``--bind SRC:DST:MODE`` then exec the command after ``--``."""
    parser = argparse.ArgumentParser(prog="iosea_wf.attach", description=__doc__)
    parser.add_argument("--bind", action="append", default=[], metavar="SRC:DST:ro|rw")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("iosea_wf.attach: no command to run", file=sys.stderr)
        return 2
    for spec in args.bind:
        source, target, mode = spec.rsplit(":", 2)
        try:
            _bind(source, target, mode)
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"iosea_wf.attach: cannot attach {source} at {target}: {exc}", file=sys.stderr)
            return 1
    os.execvp(command[0], command)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
