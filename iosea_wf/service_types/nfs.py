"""The NFS service type: one nfs-ganesha export per service on a datanode (roles/nfs_service).

Its probe asks each NFS server a session uses, once and all at once, for the NFSv4 pseudo
directory that holds the owner's exports (``/iosea/<owner>``), with the real NFS client ``nfs-ls``
(as the control script checks an export it adds): a server that does not answer within the
timeout has lost every export of the session there; one that answers has lost the exports missing
from that directory (ganesha lists only what it serves). Each ``nfs-ls`` costs a few
milliseconds.
"""

from __future__ import annotations

import posixpath
import shutil
import socket
import subprocess
import time
from typing import Any

PROBE_TIMEOUT = 2.0


def _server(svc: dict[str, Any]) -> str:
    port = svc.get("port") or 2049
    return f"{svc['address']}:{port}"


def _listing_url(svc: dict[str, Any]) -> str:
    """The NFSv4 URL of the pseudo directory holding this service's export (its owner's)."""
    url = f"nfs://{svc['address']}{posixpath.dirname(svc['pseudo'])}?version=4"
    return url + (f"&nfsport={svc['port']}" if svc.get("port") else "")


def probe(services: list[dict[str, Any]], timeout: float = PROBE_TIMEOUT) -> dict[str, str]:
    """Why each of these NFS services does not answer, by name: one bounded ``nfs-ls`` per server."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for svc in services:
        groups.setdefault(_listing_url(svc), []).append(svc)
    if shutil.which("nfs-ls") is None:
        return _probe_tcp(groups, timeout)
    running = {
        url: subprocess.Popen(
            ["nfs-ls", url],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for url in groups
    }
    deadline = time.monotonic() + timeout
    lost: dict[str, str] = {}
    for url, proc in running.items():
        members = groups[url]
        where = f"the NFS server of datanode {members[0]['datanode']} ({_server(members[0])})"
        try:
            # A server that answered while an earlier one was awaited is still read, past the deadline.
            out, err = proc.communicate(timeout=max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            lost.update((s["name"], f"{where} did not answer within {timeout:g} s") for s in members)
            continue
        said = " ".join((err or out).split())
        if proc.returncode == 0:
            served = {line.split()[-1] for line in out.splitlines() if line.strip()}
        elif "NFS4ERR_NOENT" in said:
            served = set()  # the server answers, and serves no export of this owner
        else:
            lost.update((s["name"], f"{where} does not answer: {said or 'nfs-ls failed'}") for s in members)
            continue
        for svc in members:
            if posixpath.basename(svc["pseudo"]) not in served:
                lost[svc["name"]] = f"{where} no longer serves its export {svc['pseudo']}"
    return lost


def _probe_tcp(groups: dict[str, list[dict[str, Any]]], timeout: float) -> dict[str, str]:
    """Without an NFS client here: whether each server accepts a TCP connection (less, but honest)."""
    lost: dict[str, str] = {}
    for members in groups.values():
        svc = members[0]
        try:
            socket.create_connection((svc["address"], svc.get("port") or 2049), timeout=timeout).close()
        except OSError as exc:
            why = f"the NFS server of datanode {svc['datanode']} ({_server(svc)}) does not answer: {exc}"
            lost.update((s["name"], why) for s in members)
    return lost
