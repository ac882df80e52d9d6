"""Make the benchmarks time iosea-wf as it runs once installed: byte-compiled.

pip and pipx compile a wheel's modules when they install it. The editable install of this
repository leaves that to Python's first import, which caches nothing where
PYTHONDONTWRITEBYTECODE is set (as on the bench box): every command then compiles each module it
imports, about 70 ms per run of ``iosea-wf-mover``, which is not a cost of the tool.
"""

from __future__ import annotations

import compileall
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "iosea_wf"


def byte_compile() -> None:
    """Write (or refresh) the bytecode of every module of the package; quick when it is current."""
    if not compileall.compile_dir(str(PACKAGE), quiet=1):
        raise RuntimeError(f"could not byte-compile {PACKAGE}")


def inprocess_site(base: Path) -> Path:
    """The local site minus the file naming its Workflow Manager service, under ``base``.

    The local inventory names the site's service, which keeps the site's one store; a benchmark
    of the in-process CLI (with its private ``IOSEA_WF_HOME``) sets ``IOSEA_WF_SITE`` to this twin.
    """
    sys.path.insert(0, str(PACKAGE.parent))
    from tests.sites import inprocess_twin

    return inprocess_twin(base)
