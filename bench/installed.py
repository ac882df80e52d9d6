"""Make the benchmarks time iosea-wf as it runs once installed: byte-compiled.

pip and pipx compile a wheel's modules when they install it. The editable install of this
repository leaves that to Python's first import, which caches nothing where
PYTHONDONTWRITEBYTECODE is set (as on the bench box): every command then compiles each module it
imports, about 70 ms per run of ``iosea-wf-mover``, which is not a cost of the tool.
"""

from __future__ import annotations

import compileall
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "iosea_wf"


def byte_compile() -> None:
    """Write (or refresh) the bytecode of every module of the package; quick when it is current."""
    if not compileall.compile_dir(str(PACKAGE), quiet=1):
        raise RuntimeError(f"could not byte-compile {PACKAGE}")
