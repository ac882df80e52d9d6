"""The `nfs` attach method without a server: the wrapped command, and a clear, clean failure."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from iosea_wf import jobs

URL = "nfs://127.0.0.1/srv/ns?nfsport=20491&mountport=20492"


def test_nfs_attach_mounts_each_service_by_its_url():
    attached = [
        {"name": "a", "namespace": "/srv/ns", "mountpoint": "/mnt/a", "mode": "RO", "url": URL},
        {"name": "b", "namespace": "/srv/nb", "mountpoint": "/mnt/b", "mode": "RW", "url": URL},
    ]
    argv = jobs.attach_command(attached, "nfs", ["job.sh", "x"])
    assert argv == [
        sys.executable, "-m", "iosea_wf.attach",
        "--nfs", f"{URL}:/mnt/a:ro", "--nfs", f"{URL}:/mnt/b:rw", "--", "job.sh", "x",
    ]  # fmt: skip
    assert jobs.attach_command(attached, "env", ["job.sh"]) == ["job.sh"]
    assert jobs.attach_command([], "nfs", ["job.sh"]) == ["job.sh"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_server_fails_the_job_before_its_command_and_leaves_nothing(tmp_path):
    port = _closed_port()
    url = f"nfs://127.0.0.1/srv/ns?nfsport={port}&mountport={port}"
    marker = tmp_path / "ran"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "iosea_wf.attach", "--nfs-timeout", "5", "--nfs", f"{url}:{tmp_path}/mnt:rw",
         "--", "touch", str(marker)],
        capture_output=True, text=True, timeout=60, env={"TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert time.monotonic() - t0 < 20
    assert proc.returncode == 1
    assert proc.stderr.startswith(
        f"iosea_wf.attach: cannot attach the NFS export 127.0.0.1:/srv/ns (port {port}) at {tmp_path}/mnt: "
        f"iosea-wf-nfsfuse: cannot mount the NFS export 127.0.0.1:/srv/ns (port {port}): "
    ), proc.stderr
    assert "refused" in proc.stderr
    assert not marker.exists()
    # Its private mount directory is gone, and no client is left running.
    assert list(tmp_path.iterdir()) == []
    left = subprocess.run(["pgrep", "-f", f"iosea_wf.nfsfuse {url}"], capture_output=True, text=True)
    assert left.stdout == ""
