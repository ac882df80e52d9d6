"""Inventories for tests and benchmarks: the local site as one that names no Workflow Manager."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCAL_SITE = ROOT / "inventories" / "local"
# The file of the local inventory that names the site's Workflow Manager service (iosea_wm_url).
SERVICE_FILE = "workflow_manager.yml"


def inprocess_twin(base: Path, site: Path = LOCAL_SITE) -> Path:
    """``base/<site name>``: the files of ``site`` linked, all but the one naming its service.

    The CLI on that twin works in-process, with a private store (``IOSEA_WF_HOME``), on the same
    modules, datanodes, flavors and tiers as the site itself.
    """
    twin = base / site.name
    for source in sorted(site.rglob("*")):
        target = twin / source.relative_to(site)
        if source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif source.name != SERVICE_FILE:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source)
    return twin
