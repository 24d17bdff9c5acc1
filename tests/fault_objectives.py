"""Objectives for the fault tests: ``objective: {kind: fault_objectives:steady, seconds: 4, report_every: 0.5}``.

``steady`` runs ``seconds`` seconds, reporting its step every ``report_every`` seconds (each report a database
write the trial must survive), and returns ``x``. With ``log_dir`` it writes ``start-<pid>-<number>`` when it starts
and ``done-<pid>-<number>`` holding the value when it returns, so a test knows which objectives returned what: a
returned value must end up stored. ``report_every: 0`` never reports. ``ignore_stop: true`` never calls ``check_stop()`` (a user's objective that does
not cooperate).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from hpo.objectives import Context


def steady(trial: Any, ctx: Context) -> float:
    log_dir = ctx.options.get("log_dir")
    if log_dir:
        (Path(log_dir) / f"start-{os.getpid()}-{trial.number}").write_text("")
    seconds = float(ctx.options.get("seconds", 1.0))
    every = float(ctx.options.get("report_every", 0.5))
    started = time.monotonic()
    step = 0
    while time.monotonic() - started < seconds:
        if not ctx.options.get("ignore_stop"):
            ctx.check_stop()
        time.sleep(min(every if every > 0 else 0.1, max(0.0, seconds - (time.monotonic() - started))))
        if every > 0:
            trial.report(float(step), step)
        step += 1
    value = float(ctx.params["x"])
    if log_dir:
        (Path(log_dir) / f"done-{os.getpid()}-{trial.number}").write_text(repr(value))
    return value
