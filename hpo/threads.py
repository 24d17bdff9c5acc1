"""How many torch threads a trial uses: one rule for single-trial, population and grokking modes.

1. The worker's thread budget: the ``--threads`` it was given (``hpo run --workers N`` gives each worker its share),
   never above the cores it may use; else the cores this process may use (``os.sched_getaffinity``) divided by the local workers sharing them, and
   lowered to the cores left free by other work when the worker starts (the 1-minute load average): on a machine
   busy with other jobs a second thread only waits for a core (measured: benchmarks/README.md, "Threads").
2. One thread where a step's kernels are too small to split: below :data:`SMALL_WORK` (parameters x rows per step;
   a population's stacked members count together), splitting each kernel costs more than it saves.

The trial's ``threads`` user attribute records what torch ran with (read back from ``torch.get_num_threads()``).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator

#: Parameters x rows of one training step below which the step runs on one thread (benchmarks/README.md, "Threads"):
#: the lesson's model (41 parameters x 16 rows), a population of it (41 x 4096 rows a tick) are far below; the grokking
#: MLP (108k parameters, full batch of 5107 rows) is above.
SMALL_WORK = 10_000_000


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, as a container or Slurm restricts it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def busy_cores() -> float:
    """Cores kept busy by other work now: the 1-minute load average (0 where the system does not say)."""
    try:
        return max(0.0, os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def default_threads(local_workers: int = 1, load: float | None = None) -> int:
    """Threads per worker when none were asked for: the cores this process may use divided by the local workers
    sharing them, no more than the cores left free by other work, at least 1.

    Example:
        >>> default_threads(2, load=0.0) == max(1, available_cores() // 2)
        True
    """
    workers = max(1, local_workers)
    cores = available_cores()
    share = cores // workers
    busy = busy_cores() if load is None else load
    free = math.floor(cores - busy + 0.5)  # a core more than half free counts as free
    return max(1, min(share, free // workers))


def budget(requested: int | None = None, local_workers: int = 1) -> int:
    """A worker's thread budget: ``requested`` (``--threads``, the study file's ``threads``) up to the cores this
    process may use, else :func:`default_threads`."""
    if requested:
        return max(1, min(requested, available_cores()))
    return default_threads(local_workers)


def for_step(n_params: int, rows: int, budget: int) -> int:
    """Threads for a step of ``rows`` rows through ``n_params`` parameters: 1 below :data:`SMALL_WORK`, else
    ``budget``."""
    return 1 if n_params * max(1, rows) < SMALL_WORK else max(1, budget)


@contextlib.contextmanager
def use(n: int) -> Iterator[int]:
    """Run torch with ``n`` intra-op threads inside the block (restored after); yields what torch reports using."""
    import torch

    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        if n != before:
            torch.set_num_threads(before)


def current() -> int | None:
    """Torch's intra-op threads now, or None where torch was not imported (an objective that does not use it)."""
    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else None


__all__ = ["SMALL_WORK", "available_cores", "budget", "busy_cores", "current", "default_threads", "for_step", "use"]
