"""Ceilings for the suite's waits that scale with how busy the machine is.

A test waits on its condition (a process exits, a row appears); the ceiling is only there so a test that is really
stuck ends with what it was waiting for. On a busy machine (a laptop running other jobs, a shared CI runner, the
suite's own parallel processes) everything takes longer, so every ceiling is multiplied by :func:`slowdown`:
``HPO_TEST_SLOWDOWN`` if it is set, else the machine's load per core (the 1-minute load average over the number of
cores) when that is above 1, taken at the session's start and again at each wait, whichever is larger (at most 20).
Timing assertions that prove a behaviour (a reap after the grace, a stop within ``--stop-timeout``) compare with the
configured value instead, and do not use this.
"""

from __future__ import annotations

import os

MAX_SLOWDOWN = 20.0


def _load_per_core() -> float:
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:  # no load average on this platform
        return 1.0


def _measured() -> float:
    env = os.environ.get("HPO_TEST_SLOWDOWN")
    if env:
        return min(MAX_SLOWDOWN, max(1.0, float(env)))
    return min(MAX_SLOWDOWN, max(1.0, _load_per_core()))


AT_START = _measured()


def slowdown() -> float:
    """How many times slower than an idle machine to allow for, now (>= 1)."""
    return max(AT_START, _measured())


def ceiling(seconds: float) -> float:
    """``seconds`` on an idle machine, scaled for this one."""
    return seconds * slowdown()
