"""Progress of a transfer: the JSON file others read, and the numbers behind the terminal bar.

The JSON document (``--progress FILE``), replaced atomically (temp file + rename) at most
:data:`MIN_INTERVAL_S` apart, and once more with the final state::

    {"schema_version": 1, "operation": "copy"|"move",
     "state": "running"|"completed"|"failed"|"cancelled",
     "files_total": int, "files_done": int, "files_failed": int, "files_left": int,
     "bytes_total": int, "bytes_done": int,
     "throughput_bytes_per_s": float, "eta_s": float|null,
     "errors": [str, ...], "warnings": [str, ...], "started_at": float, "updated_at": float}

``files_done``/``bytes_done`` count elements already complete at the target (verified by this run
or found complete from an earlier one), ``files_failed`` those that failed (each has its reason in
``errors``), ``files_left`` those neither done nor failed: still to do while running, and at the
end those a cancelled or stopped run (target full, a worker died) did not reach, which a rerun
finishes. ``files_done + files_failed + files_left == files_total`` always; a run that ends
``completed`` or ``failed`` without stopping early leaves ``files_left == 0``.
``errors`` holds at most :data:`MAX_ERRORS` messages, one per failed element or failure of the
run; ``warnings`` (as many at most) what was not transferred as asked without being an error:
metadata the target could not keep, entries skipped because they are named like the mover's own
files, patterns that matched nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import deque

SCHEMA_VERSION = 1
MIN_INTERVAL_S = 0.25
MAX_ERRORS = 1000
_WINDOW_S = 5.0  # throughput over the last seconds, so the ETA follows the current speed


class Snapshot:
    """The counters of a transfer at one moment."""

    __slots__ = (
        "operation",
        "state",
        "files_total",
        "files_done",
        "files_failed",
        "files_left",
        "bytes_total",
        "bytes_done",
        "errors",
        "warnings",
    )

    def __init__(
        self,
        operation: str,
        state: str,
        files_total: int,
        files_done: int,
        files_failed: int,
        bytes_total: int,
        bytes_done: int,
        errors: list[str] | None = None,
        warnings: list[str] | None = None,
        files_left: int | None = None,
    ):
        self.operation = operation
        self.state = state
        self.files_total = files_total
        self.files_done = files_done
        self.files_failed = files_failed
        self.files_left = files_total - files_done - files_failed if files_left is None else files_left
        self.bytes_total = bytes_total
        self.bytes_done = bytes_done
        self.errors = [] if errors is None else errors
        self.warnings = [] if warnings is None else warnings


class ProgressReporter:
    """Turns snapshots into throughput/ETA and writes the JSON file, rate-limited."""

    def __init__(self, path: str | None):
        self.path = path
        self.started_at = time.time()
        self._t0 = time.monotonic()
        self._samples: deque[tuple[float, int]] = deque()
        self._last_write = -1.0
        self.throughput = 0.0
        self.eta_s: float | None = None
        self.write_error: str | None = None

    def update(self, snap: Snapshot, force: bool = False) -> None:
        """Record ``snap``; write the JSON file if forced or enough time has passed."""
        now = time.monotonic()
        self._samples.append((now, snap.bytes_done))
        while len(self._samples) > 2 and now - self._samples[0][0] > _WINDOW_S:
            self._samples.popleft()
        t_first, b_first = self._samples[0]
        if now - t_first > 0.05:
            self.throughput = max(0.0, (snap.bytes_done - b_first) / (now - t_first))
        elif snap.state != "running":
            elapsed = now - self._t0
            self.throughput = snap.bytes_done / elapsed if elapsed > 0 else 0.0
        remaining = snap.bytes_total - snap.bytes_done
        if snap.state != "running" or remaining <= 0:
            self.eta_s = 0.0
        else:
            self.eta_s = remaining / self.throughput if self.throughput > 0 else None
        if self.path and (force or now - self._last_write >= MIN_INTERVAL_S):
            self._last_write = now
            self._write(snap)

    def document(self, snap: Snapshot) -> dict:
        """Return the JSON document for ``snap``."""
        return {
            "schema_version": SCHEMA_VERSION,
            "operation": snap.operation,
            "state": snap.state,
            "files_total": snap.files_total,
            "files_done": snap.files_done,
            "files_failed": snap.files_failed,
            "files_left": snap.files_left,
            "bytes_total": snap.bytes_total,
            "bytes_done": snap.bytes_done,
            "throughput_bytes_per_s": round(self.throughput, 1),
            "eta_s": None if self.eta_s is None else round(self.eta_s, 2),
            "errors": snap.errors[:MAX_ERRORS],
            "warnings": snap.warnings[:MAX_ERRORS],
            "started_at": self.started_at,
            "updated_at": time.time(),
        }

    def _write(self, snap: Snapshot) -> None:
        tmp = f"{self.path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.document(snap), f)
            os.replace(tmp, self.path)
        except OSError as e:
            # A progress file we cannot write must not fail the transfer itself: warn once, go on.
            self.write_error = self.write_error or f"cannot write progress file {self.path}: {e.strerror}"
            with contextlib.suppress(OSError):
                os.unlink(tmp)
