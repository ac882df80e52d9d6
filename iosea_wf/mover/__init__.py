"""Data movers: copy or move a service namespace's elements (glob patterns) to a storage tier.

:func:`iosea_wf.mover.engine.transfer` is the API; ``iosea-wf-mover`` (:mod:`iosea_wf.mover.cli`)
is the console script the orchestrator runs inside a Slurm job. The integrity argument is in
:mod:`iosea_wf.mover.engine`, the exit codes in :mod:`iosea_wf.mover.errors`.
"""
