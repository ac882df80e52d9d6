"""Durations as users write them on the command line: ``90s``, ``30m``, ``12h``, ``7d``."""

from __future__ import annotations

import re

from .errors import UsageError

_DURATION = re.compile(r"^([0-9]{1,9})([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | None, what: str) -> int:
    """Seconds of a positive duration (a whole number and a unit); UsageError naming ``what`` otherwise."""
    m = _DURATION.match((text or "").strip())
    seconds = int(m.group(1)) * _UNIT_S[m.group(2)] if m else 0
    if not m or seconds <= 0:
        raise UsageError(
            f"{what}: {text!r} is not a duration: write a positive number and a unit, "
            "s, m, h or d (e.g. 90s, 30m, 12h, 7d)"
        )
    return seconds
