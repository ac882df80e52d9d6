"""Ephemeral service types: what iosea-wf knows of each beyond its role (today: whether it answers).

A type is a module here plus a role that provisions it (``nfs`` and roles/nfs_service). ``PROBES``
maps a type's name (as a WDF writes it) to its probe: the services of one session in, why each one
that does not answer is lost out, bounded in time.
"""

from __future__ import annotations

from typing import Any

from . import nfs

PROBES = {"NFS": nfs.probe}


def lost(services: list[dict[str, Any]]) -> dict[str, str]:
    """Why each of these (ACTIVE) services of a session does not answer, by name ({}: all do)."""
    found: dict[str, str] = {}
    for kind, probe in PROBES.items():
        of_kind = [s for s in services if s.get("type") == kind]
        if of_kind:
            found.update(probe(of_kind))
    return found
