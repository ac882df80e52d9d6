"""Helpers for tests of the Workflow Manager service: start `iosea-wf serve`, send raw requests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
# The slurmrestd the local site runs for the Workflow Manager's account (roles/slurmrestd).
ACCOUNT_SLURMRESTD = "unix:///run/slurmrestd/slurmrestd.socket"


def munge_works() -> bool:
    """True when munged answers here (the service cannot check anyone without it)."""
    try:
        done = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def need_munge() -> None:
    """Skip without munged, or fail under IOSEA_WF_REQUIRE_SITE=1 (where the site must be up)."""
    if munge_works():
        return
    if os.environ.get("IOSEA_WF_REQUIRE_SITE") == "1":
        pytest.fail("munged does not answer (`make site` starts it)")
    pytest.skip("munged does not answer (run `make site`)")


def _accepts(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


@contextmanager
def running_service(
    sock: Path,
    state: Path,
    *extra: str,
    log: Path | None = None,
    bin_dir: Path = BIN,
    account: str | None = None,
):
    """`iosea-wf serve` on ``sock`` with the store in ``state``, stopped (SIGTERM by pid) afterwards.

    ``bin_dir``: the venv it runs from (this one by default). ``account``: run it as that
    unprivileged account (setpriv execs, as roles/workflow_manager starts it), with slurmrestd
    (roles/slurmrestd) for users' jobs and its own home; the socket's and the store's folders are
    given to it.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("IOSEA_WF_URL", "IOSEA_WF_HOME")}
    prefix: list[str] = []
    if account is not None:
        import pwd

        entry = pwd.getpwnam(account)
        for folder in (sock.parent, state):
            folder.mkdir(parents=True, exist_ok=True)
            os.chown(folder, entry.pw_uid, entry.pw_gid)
        env = {
            "PATH": f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": entry.pw_dir,
            "LANG": "C.UTF-8",
            "IOSEA_WF_SLURMRESTD": ACCOUNT_SLURMRESTD,
            **({"IOSEA_WF_SITE": os.environ["IOSEA_WF_SITE"]} if "IOSEA_WF_SITE" in os.environ else {}),
        }
        prefix = ["setpriv", f"--reuid={account}", f"--regid={account}", "--init-groups"]
    log = log or sock.with_suffix(".log")
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [*prefix, str(bin_dir / "iosea-wf"), "serve", "--socket", str(sock), "--state-dir", str(state)]
            + list(extra),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 60
        while not _accepts(sock):
            if proc.poll() is not None:
                raise AssertionError(f"iosea-wf serve exited {proc.returncode}: {log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"iosea-wf serve did not listen in 60 s: {log.read_text()}")
            time.sleep(0.001)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@contextmanager
def temporary_service(*extra: str):
    """``running_service`` on a socket and store of a fresh folder, removed afterwards: (URL, state dir)."""
    need_munge()
    folder = Path(tempfile.mkdtemp(prefix="iosea-wf-wm-", dir="/tmp"))
    try:
        with running_service(folder / "wm.sock", folder / "state", *extra):
            yield f"unix://{folder / 'wm.sock'}", folder / "state"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def raw_request(sock: Path, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """One HTTP request on the Unix socket, with exactly the headers given: (status, JSON body)."""
    import httpx

    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://wm") as client:
        r = client.request(method, path, content=body, headers=headers or {})
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, r.text
