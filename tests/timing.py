"""Ceilings for the suite's waits that scale with how slow the machine is right now.

A test waits on its condition (a process exits, a row appears); the ceiling is only there so a test that is really
stuck ends with what it was waiting for. On a busy machine (a laptop running other jobs, a shared CI runner, the
suite's own parallel processes) or a slower one, everything takes longer, so every ceiling is multiplied by
:func:`slowdown`, the largest of:

- ``HPO_TEST_SLOWDOWN`` if it is set (then nothing is measured);
- the calibration: a fixed loop of pure-Python work timed once per test session (:func:`calibrate`, about a
  quarter of a second), over the time it takes on the project's idle 2-core machine (:data:`REFERENCE_SECONDS`).
  The first process of a session measures it and leaves it in ``HPO_TEST_SLOWDOWN_MEASURED``, which pytest-xdist's
  workers (and every subprocess) inherit;
- the machine's load per core (the 1-minute load average over the number of cores), read again at each wait, so a
  machine that became busy after the session started counts too.

At most :data:`MAX_SLOWDOWN`. Timing assertions that prove a behaviour (a reap after the grace, a stop within
``--stop-timeout``) compare with the configured value instead, and do not use this.
"""

from __future__ import annotations

import os
import statistics
import time

MAX_SLOWDOWN = 20.0
#: Wall seconds of one :func:`_loop` on the project's idle 2-core machine (its CPU time there, best of 8: 0.048 s).
REFERENCE_SECONDS = 0.048
_ENV, _MEASURED_ENV = "HPO_TEST_SLOWDOWN", "HPO_TEST_SLOWDOWN_MEASURED"


def _loop() -> float:
    start = time.perf_counter()
    x = 0
    for i in range(1_000_000):
        x += i * i % 7
    return time.perf_counter() - start


def calibrate(runs: int = 5) -> float:
    """How many times slower than the reference machine, idle, a fixed loop runs here now (the median of ``runs``)."""
    return statistics.median(_loop() for _ in range(runs)) / REFERENCE_SECONDS


def _load_per_core() -> float:
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:  # no load average on this platform
        return 1.0


def _clamp(x: float) -> float:
    return min(MAX_SLOWDOWN, max(1.0, x))


def _at_start() -> tuple[float, str]:
    """The session's factor and where it came from; measured once, then inherited through the environment."""
    if os.environ.get(_ENV):
        return _clamp(float(os.environ[_ENV])), f"{_ENV}={os.environ[_ENV]}"
    if not os.environ.get(_MEASURED_ENV):
        os.environ[_MEASURED_ENV] = f"{calibrate():.2f}"
    return _clamp(float(os.environ[_MEASURED_ENV])), f"calibrated {os.environ[_MEASURED_ENV]}"


AT_START, SOURCE = _at_start()


def slowdown() -> float:
    """How many times slower than an idle machine to allow for, now (>= 1)."""
    if os.environ.get(_ENV):
        return AT_START
    return max(AT_START, _clamp(_load_per_core()))


def ceiling(seconds: float) -> float:
    """``seconds`` on an idle machine, scaled for this one."""
    return seconds * slowdown()


def describe() -> str:
    """One line for the session header: the factor now and where it comes from."""
    return f"wait ceilings x{slowdown():.1f} ({SOURCE}; load per core {_load_per_core():.1f}; tests/timing.py)"
