"""Torch threads per trial, 1 against 2, in the three modes, with and without other work on the machine.

1. single-trial: one trial of the lesson's model (``studies/spirals-optimizer.yaml``'s defaults, batch 16, 5 epochs).
2. population: ``studies/spirals-optimizer.yaml``, 32 trials as one population of 32, in-process worker, SQLite.
3. grokking: one trial of ``studies/grokking-mlp.yaml``'s baseline (full batch, 5107 rows), ``--steps`` steps.

Each case runs with 1 and with 2 torch threads with hpo's small-step rule switched off (``hpo.threads.SMALL_WORK =
0``), so both counts really run; then once more as hpo chooses (``--threads 2`` given, the rule on) to show what it
picks. ``--load N`` runs the same with N CPU-burning processes started first (and stopped after). Usage::

    python benchmarks/threads.py                 # idle (whatever else the machine runs)
    python benchmarks/threads.py --load 4        # with 4 busy-looping processes
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402
import torch  # noqa: E402

from hpo import threads as hpo_threads  # noqa: E402
from hpo.objectives import Context  # noqa: E402
from hpo.objectives import grokking as grok  # noqa: E402
from hpo.objectives.training import train  # noqa: E402
from hpo.spec import load_spec  # noqa: E402
from hpo.worker import WorkerOptions, run_worker  # noqa: E402


def _burn() -> None:
    while True:
        pass


def single() -> float:
    spec = load_spec(ROOT / "studies" / "spirals-optimizer.yaml")
    start = time.perf_counter()
    train(spec.objective, {"batch_size": 16, "epochs": 5}, seed=0)  # type: ignore[arg-type]
    return time.perf_counter() - start


def population() -> float:
    spec = load_spec(ROOT / "studies" / "spirals-optimizer.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/t.db"
        opts = WorkerOptions(threads=torch.get_num_threads(), n_trials=32, population=32, handle_signals=False)
        start = time.perf_counter()
        run_worker(spec, url, opts)
        return time.perf_counter() - start


def grokking(steps: int) -> Callable[[], float]:
    def run() -> float:
        spec = load_spec(ROOT / "studies" / "grokking-mlp.yaml")
        obj = spec.objective.model_copy(update={"steps": steps, "memorise_by": None, "stop_at_threshold": False})
        spec = spec.model_copy(update={"objective": obj})
        trial = optuna.trial.FixedTrial({})
        start = time.perf_counter()
        grok.objective(trial, Context(spec=spec, params={}, seed=0, threads=torch.get_num_threads()))
        return time.perf_counter() - start

    return run


def timed(fn: Callable[[], float], threads: int) -> float:
    """Seconds of one run with ``threads`` torch threads, hpo's small-step rule switched off."""
    saved = hpo_threads.SMALL_WORK
    hpo_threads.SMALL_WORK = 0
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        hpo_threads.SMALL_WORK = saved


def picks(mode: str) -> tuple[int, int]:
    """Threads hpo's rule gives this mode's trial: with ``--threads 2``, and with no ``--threads`` at today's load."""
    from hpo.objectives.population import ROW_BUDGET, largest_model

    spec = load_spec(ROOT / "studies" / "spirals-optimizer.yaml")
    if mode == "single-trial":
        params, rows = largest_model(spec), 16
    elif mode == "population":
        params, rows = largest_model(spec) * 32, ROW_BUDGET
    else:
        gspec = load_spec(ROOT / "studies" / "grokking-mlp.yaml")
        cfg = grok.resolve_config(gspec.objective, {})  # type: ignore[arg-type]
        with torch.device("meta"):
            params = sum(p.numel() for p in grok.build_model(gspec.objective, cfg).parameters())  # type: ignore[arg-type]
        rows = round(cfg.data.p**2 * cfg.data.train_fraction)
    return hpo_threads.for_step(params, rows, 2), hpo_threads.for_step(params, rows, hpo_threads.default_threads(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--load", type=int, default=0, help="CPU-burning processes to run meanwhile")
    ap.add_argument("--steps", type=int, default=300, help="grokking steps")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    burners = [mp.Process(target=_burn, daemon=True) for _ in range(args.load)]
    for p in burners:
        p.start()
    try:
        time.sleep(2 if burners else 0)
        print(f"cores {hpo_threads.available_cores()}, load average {os.getloadavg()[0]:.1f}, burners {args.load}")
        print(f"hpo's default threads for one worker now: {hpo_threads.default_threads(1)}")
        print("| mode | 1 thread | 2 threads | 2 / 1 | hpo picks (--threads 2 / default) |")
        print("|---|---|---|---|---|")
        for name, fn in (("single-trial", single), ("population", population), ("grokking", grokking(args.steps))):
            one = timed(fn, 1)
            two = timed(fn, 2)
            given, default = picks(name)
            print(f"| {name} | {one:.1f} s | {two:.1f} s | {two / one:.2f} | {given} / {default} |", flush=True)
    finally:
        for p in burners:
            p.terminate()
            p.join()


if __name__ == "__main__":
    main()
