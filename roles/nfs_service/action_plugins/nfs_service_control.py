"""Action plugin: run the ganesha control script (an argument list) through the host's connection.

Why not ``ansible.builtin.command``: that starts a Python interpreter on the datanode to run
the command module (about 0.35 s of CPU a call), once per service and action; several services
of a session started at once on a small host then queue for CPU behind those interpreters. The
control script is itself the program to run, so this action runs it the way ``raw`` would, through
the connection (``local`` or SSH alike), with every word quoted by ``shlex.join``: the shell
never sees a spliced string.

Arguments: ``argv`` (list, required), ``removes`` (path: when it does not exist the script is
not run, as with ``command``'s ``removes``). Returns ``rc``, ``stdout``, ``stderr`` (and ``msg``
when skipped), like ``command``, so the tasks that register it read the same keys.
"""

from __future__ import annotations

import shlex

from ansible.plugins.action import ActionBase

_SKIP_MARK = "__nfs_service_control_skipped__"


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _VALID_ARGS = frozenset(("argv", "removes"))

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        del tmp
        argv = [str(word) for word in self._task.args.get("argv") or []]
        removes = self._task.args.get("removes")
        if not argv:
            result.update(failed=True, msg="argv is required")
            return result
        if self._task.check_mode:
            result.update(skipped=True, msg="not run in check mode")
            return result
        command = shlex.join(argv)
        if removes:
            q = shlex.quote(str(removes))
            command = f"if test -e {q}; then {command}; else echo {_SKIP_MARK}; fi"
        out = self._low_level_execute_command(command, sudoable=True)
        stdout = (out.get("stdout") or "").rstrip("\n")
        if removes and stdout == _SKIP_MARK:
            result.update(
                changed=False,
                rc=0,
                stdout=f"skipped, since {removes} does not exist",
                stderr="",
                msg=f"Did not run command since '{removes}' does not exist",
            )
            return result
        result.update(
            changed=True, rc=out.get("rc"), stdout=stdout, stderr=(out.get("stderr") or "").rstrip("\n")
        )
        return result
