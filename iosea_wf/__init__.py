"""iosea-wf: a workflow manager for HPC sessions with ephemeral I/O services."""

import os as _os
import sys as _sys

if _os.path.basename(_sys.argv[0] if _sys.argv else "") == "iosea-wf":
    # Loaded by the console script: until cli.main handles SIGINT and SIGTERM (its imports take
    # a few tens of ms), one of them ends it with a line, never a KeyboardInterrupt traceback.
    import signal as _signal

    def _before_main(signum, _frame):
        what = "terminated" if signum == _signal.SIGTERM else "interrupted"
        _os.write(2, f"iosea-wf: {what}: nothing was done\n".encode())
        _os._exit(128 + signum)

    for _sig in (_signal.SIGINT, _signal.SIGTERM):
        _signal.signal(_sig, _before_main)
