"""Grokking figures: the published trends as a study, and the transformer baseline's delayed jump.

``trends``: a study over weight decay and training fraction on the operand MLP (p = 113, width 200, 2 hidden layers,
AdamW lr 0.01), sampled quasi-randomly (Sobol) rather than by TPE so that the trials cover the plane evenly and the
rank correlations are not biased by where an optimiser chose to look; no pruning, so every trial has its (censored)
metric. Prints the Spearman rank correlation of steps-to-generalise with each parameter, its sign, a bootstrap 95%
interval (trials resampled in pairs) and the p-value.

``transformer``: the interpretability study's set-up, run once as a single trial of the grokking objective (full
batch, one thread); prints when training accuracy reached 1.0 (and validation accuracy then), the last step after
that with validation accuracy below 0.2, the first steps at 0.5 and 0.95, and the wall time.

Usage::

    python benchmarks/grokking_trends.py trends [--quick] [--trials 32] [--steps 1000] [--workers 1]
    python benchmarks/grokking_trends.py transformer [--quick] [--steps 25000] [--device cpu]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from scipy import stats

from hpo.objectives import Context, resolve_device
from hpo.objectives.grokking import objective
from hpo.spec import parse_spec
from hpo.worker import WorkerOptions, create, run_worker


def trends_spec(quick: bool, trials: int, steps: int) -> dict[str, Any]:
    p, width = (59, 128) if quick else (113, 200)
    return {
        "name": f"grokking-trends{'-quick' if quick else ''}",
        "direction": "minimize",
        "metric": "steps_to_generalise",
        "objective": {
            "kind": "grokking",
            "data": {"source": "modular", "p": p, "op": "+", "train_fraction": 0.4, "seed": 0},
            "model": {"kind": "mlp", "layers": [width, width]},
            "steps": steps,
            "eval_every": 25,
            "lr": 0.01,
            "threads": 1,
        },
        "space": {
            "weight_decay": {"type": "float", "low": 0.3, "high": 6.0, "log": True},
            "train_fraction": {"type": "float", "low": 0.3, "high": 0.7},
        },
        "sampler": {"name": "qmc", "seed": 0, "kwargs": {"qmc_type": "sobol", "scramble": True}},
        "pruner": {"name": "none"},
        "budget": {"n_trials": trials},
    }


def spearman_with_interval(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    rho, pvalue = stats.spearmanr(x, y)
    boot = stats.bootstrap(
        (x, y),
        lambda a, b: stats.spearmanr(a, b).statistic,
        paired=True,
        vectorized=False,
        n_resamples=2000,
        method="percentile",
        random_state=0,
    )
    ci = boot.confidence_interval
    return {"rho": float(rho), "low": float(ci.low), "high": float(ci.high), "p": float(pvalue)}


def _worker(spec: Any, storage: str) -> None:
    """One worker process: one torch thread; every worker keeps the sampler's seed (one shared Sobol sequence)."""
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    opts = WorkerOptions(threads=1, heartbeat_interval=None, handle_signals=False, seed_offset=0)
    run_worker(spec, storage, opts)


def run_trends(args: argparse.Namespace) -> dict[str, Any]:
    trials = args.trials or (10 if args.quick else 32)
    steps = args.steps or (600 if args.quick else 1000)
    spec = parse_spec(trends_spec(args.quick, trials, steps), "grokking_trends")
    storage = args.storage or f"sqlite:///{tempfile.mkdtemp()}/grokking-trends.db"
    started = time.perf_counter()
    if args.workers > 1:
        create(spec, storage)
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(spec, storage)) for _ in range(args.workers)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
    else:
        _worker(spec, storage)
    wall = time.perf_counter() - started
    study = optuna.load_study(study_name=spec.name, storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    wd = np.array([t.params["weight_decay"] for t in done])
    tf = np.array([t.params["train_fraction"] for t in done])
    value = np.array([t.value for t in done])
    generalised = np.array([bool(t.user_attrs["generalised"]) for t in done])
    out = {
        "command": " ".join(["python", *sys.argv]),
        "date": dt.date.today().isoformat(),
        "n_trials": len(done),
        "steps_budget": steps,
        "censored_value": steps + 25,
        "generalised": int(generalised.sum()),
        "wall_seconds": round(wall, 1),
        "weight_decay": spearman_with_interval(wd, value),
        "train_fraction": spearman_with_interval(tf, value),
        "trials": [
            {"weight_decay": round(a, 4), "train_fraction": round(b, 4), "steps_to_generalise": int(v)}
            for a, b, v in sorted(zip(wd.tolist(), tf.tolist(), value.tolist(), strict=True))
        ],
    }
    print(f"{len(done)} trials, budget {steps} steps (censored value {steps + 25}), {generalised.sum()} generalised")
    print(f"{'weight_decay':>13} {'train_frac':>10} {'steps':>6}")
    for row in out["trials"]:
        print(f"{row['weight_decay']:>13.3f} {row['train_fraction']:>10.3f} {row['steps_to_generalise']:>6d}")
    for name in ("weight_decay", "train_fraction"):
        r = out[name]
        sign = "negative" if r["high"] < 0 else "positive" if r["low"] > 0 else "undetermined"
        print(
            f"Spearman(steps_to_generalise, {name}) = {r['rho']:+.3f}, "
            f"95% bootstrap interval [{r['low']:+.3f}, {r['high']:+.3f}], p = {r['p']:.2g}: sign {sign}"
        )
    print(f"wall time {wall:.0f} s")
    return out


def run_transformer(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    steps = args.steps or (300 if quick else 25000)
    doc = {
        "name": "grokking-transformer-baseline",
        "direction": "minimize",
        "metric": "steps_to_generalise",
        "objective": {
            "kind": "grokking",
            "data": {"source": "modular", "p": 113, "op": "+", "train_fraction": 0.3, "seed": 0},
            "model": {"kind": "transformer", "d_model": 128, "n_heads": 4, "d_mlp": 512, "n_layers": 1},
            "steps": steps,
            "eval_every": 100,
            "lr": 0.001,
            "weight_decay": 1.0,
            "beta1": 0.9,
            "beta2": 0.98,
            "device": args.device,
        },
    }
    spec = parse_spec(doc, "grokking_transformer")
    trial = optuna.trial.FixedTrial({})
    started = time.perf_counter()
    objective(trial, Context(spec=spec, params={}, seed=0, device=resolve_device(args.device)))
    wall = time.perf_counter() - started
    a = trial.user_attrs
    curve = a["curve"]
    chance = 1 / 113
    rows = list(zip(curve["step"], curve["train_accuracy"], curve["val_accuracy"], strict=True))
    train_full = next((s for s, tr, _ in rows if tr >= 1.0), None)
    # the validation accuracy when training accuracy first reached 1.0, the last step after that still below 0.2,
    # and the first steps at or above 0.5 and 0.95
    val_at_train_full = next((va for s, _, va in rows if s == train_full), None)
    low = [s for s, _, va in rows if va < 0.2 and (train_full is None or s >= train_full)]
    half = next((s for s, _, va in rows if va >= 0.5), None)
    out = {
        "command": " ".join(["python", *sys.argv]),
        "date": dt.date.today().isoformat(),
        "steps_budget": steps,
        "train_accuracy_1_at": train_full,
        "memorised_step": a["memorised_step"],
        "chance": round(chance, 4),
        "val_accuracy_when_train_1": val_at_train_full,
        "last_step_below_0.2": low[-1] if low else None,
        "val_0.5_at": half,
        "val_0.95_at": a["steps_to_generalise"] if a["generalised"] else None,
        "wall_seconds": round(wall, 1),
        "seconds_per_step": round(wall / a["steps_reached"], 4),
        "curve": rows,
    }
    print(f"{'step':>6} {'train_acc':>9} {'val_acc':>8}")
    for s, tr, va in rows[:: max(1, len(rows) // 40)]:
        print(f"{s:>6d} {tr:>9.4f} {va:>8.4f}")
    print(
        f"chance {chance:.4f}; train accuracy 1.0 at step {train_full} (val accuracy then {val_at_train_full}); "
        f"val accuracy last < 0.2 at step {out['last_step_below_0.2']}, first >= 0.5 at {half}, first >= 0.95 at "
        f"{out['val_0.95_at']} (budget {steps}); {wall:.0f} s wall, {out['seconds_per_step'] * 1000:.1f} ms/step"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["trends", "transformer"])
    parser.add_argument("--quick", action="store_true", help="a small, fast version (smoke run)")
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--storage", default=None, help="keep the trends study in this storage URL")
    parser.add_argument("--workers", type=int, default=1, help="trends: worker processes (one thread each)")
    parser.add_argument("--device", default="cpu", help="transformer: cpu, cuda or auto")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = run_trends(args) if args.what == "trends" else run_transformer(args)
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
