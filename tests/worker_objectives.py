"""Tiny objectives for the worker tests: ``objective: {kind: worker_objectives:sleepy, sleep: 0.2}``.

The tests put this folder on ``PYTHONPATH`` of the ``hpo worker`` processes they start.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from hpo.objectives import Context


def sleepy(trial: Any, ctx: Context) -> float:
    """Return ``x`` after sleeping ``sleep`` seconds in steps of 0.05 s, checking for a stop request.

    With ``marker_dir``, first writes ``<pid>-<trial number>`` there, so a test knows which process runs what.
    """
    marker = ctx.options.get("marker_dir")
    if marker:
        (Path(marker) / f"{os.getpid()}-{trial.number}").write_text(str(trial.params))
    deadline = time.monotonic() + float(ctx.options.get("sleep", 0.0))
    step = 0
    while time.monotonic() < deadline:
        ctx.check_stop()
        time.sleep(0.05)
        if step % 10 == 0:
            trial.report(float(step), step)
        step += 1
    return float(ctx.params["x"])
