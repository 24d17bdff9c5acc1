"""Search efficiency: the compute each search strategy needs to FIRST reach a target validation accuracy.

For each problem (a study file) and each strategy (a sampler, a pruner, perhaps enqueued warm-start trials), a study
runs in-process (``hpo.worker.run_worker``, one thread, a fresh SQLite file) until a trial that ran to completion
reaches the target; then it stops. Compute counted up to and including that trial:

* **epochs**: the sum of the epochs every trial actually trained, pruned and diverged ones included (load-independent:
  the headline figure);
* **CPU s**: the process's CPU time (training, sampler and pruner, SQLite), noisier: it depends on the batch sizes
  the strategy tried, and on a machine shared with other jobs it still varies by 10-20 %.

A run that spends its trial budget without reaching the target is counted at the compute it spent (a lower bound of
what it would need) and is reported in the "reached" column. Every strategy is run over the same seeds (the
sampler's seed and the objective's seed, so the training noise differs between seeds); medians are reported, and
the ratio of each strategy's median to random search's.

Usage::

    python benchmarks/search_efficiency.py                      # both problems, every strategy, 5 seeds
    python benchmarks/search_efficiency.py --jobs 2             # runs in 2 processes (compute is per run)
    python benchmarks/search_efficiency.py --problems spirals --strategies random,shipped --seeds 7
    python benchmarks/search_efficiency.py --quick              # < 60 s; what the test suite runs
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from hpo.spec import FixedParam, StudySpec, load_spec, parse_spec  # noqa: E402
from hpo.worker import WorkerOptions, run_worker  # noqa: E402


@dataclass(frozen=True)
class Problem:
    name: str
    study_file: str
    target: float
    budget: int  # max trials per run


PROBLEMS: dict[str, Problem] = {
    "spirals": Problem("spirals", "studies/spirals-architecture.yaml", 0.97, 60),
    "digits": Problem("digits", "studies/digits.yaml", 0.955, 80),  # best seen 0.964 (346 of 359 images)
}

# The lesson's hand grids: a few values per hyperparameter, the way a learner retries settings by hand. Optuna's
# GridSampler visits the points in a seeded random order, without repetition.
HAND_GRIDS: dict[str, dict[str, list[Any]]] = {
    "spirals": {
        "layers": [[10], [32, 32], [64, 64]],
        "activation": ["relu", "tanh"],
        "lr": [0.001, 0.01, 0.1, 1.0],
        "optimizer": ["adam", "sgd_momentum"],
        "batch_size": [16, 64, 128],
    },
    "digits": {
        "n_layers": [1, 2],
        "units": [32, 128],
        "lr": [0.001, 0.01, 0.1, 1.0],
        "batch_size": [16, 64, 256],
        "optimizer": ["sgd_momentum", "adam"],
        "weight_decay": [0.0001],
    },
}

# Sensible first trials, enqueued before the sampler takes over: what a practitioner tries first (Adam at a moderate
# learning rate, a mid-sized network). Checked across training seeds before being shipped (see the README).
WARM_START: dict[str, list[dict[str, Any]]] = {
    "spirals": [
        {"layers": "[32, 32, 32]", "activation": "relu", "lr": 0.003, "optimizer": "adam", "batch_size": 32},
        {"layers": "[64, 64]", "activation": "relu", "lr": 0.003, "optimizer": "adam", "batch_size": 32},
    ],
    "digits": [
        {"n_layers": 1, "units": 128, "lr": 0.01, "batch_size": 32, "optimizer": "adam", "weight_decay": 0.0001},
        {"n_layers": 1, "units": 64, "lr": 0.1, "batch_size": 32, "optimizer": "sgd_momentum", "weight_decay": 0.0001},
    ],
}


def _fixed_epochs(spec: StudySpec) -> int:
    """The study's (fixed) number of epochs: the space's ``epochs`` value, else the objective's default."""
    e = spec.space.get("epochs")
    if isinstance(e, (int, float)):
        return int(e)
    if isinstance(e, FixedParam):
        return int(e.value)  # type: ignore[arg-type]
    return int(spec.objective.defaults.epochs)  # type: ignore[union-attr]


def _hyperband(spec: StudySpec) -> dict[str, Any]:
    epochs = _fixed_epochs(spec)
    return {"name": "hyperband", "kwargs": {"min_resource": max(1, epochs // 10), "max_resource": epochs,
                                             "reduction_factor": 3}}  # fmt: skip


def _halving(spec: StudySpec) -> dict[str, Any]:
    epochs = _fixed_epochs(spec)
    return {"name": "successive_halving", "kwargs": {"min_resource": max(1, epochs // 6), "reduction_factor": 3}}


_TPE_MV = {"name": "tpe", "kwargs": {"n_startup_trials": 10, "multivariate": True, "constant_liar": True}}


# Each strategy: a function (problem, the study file's spec) -> fields of the study file to replace.
def _random(p: Problem, s: StudySpec) -> dict[str, Any]:
    return {"sampler": {"name": "random"}, "pruner": {"name": "none"}, "enqueue": []}


def _grid(p: Problem, s: StudySpec) -> dict[str, Any]:
    space = s.model_dump(mode="json")["space"]
    for name, values in HAND_GRIDS[p.name].items():
        when = space[name].get("when") if isinstance(space[name], dict) else None
        space[name] = {"choices": values, **({"when": when} if when else {})}
    return {"sampler": {"name": "grid"}, "pruner": {"name": "none"}, "enqueue": [], "space": space}


def _tpe_median(p: Problem, s: StudySpec) -> dict[str, Any]:
    return {
        "sampler": {"name": "tpe", "kwargs": {"n_startup_trials": 10}},
        "pruner": {"name": "median", "kwargs": {"n_startup_trials": 5, "n_warmup_steps": 3}},
        "enqueue": [],
    }


def _tpe_hyperband(p: Problem, s: StudySpec) -> dict[str, Any]:
    return {"sampler": {"name": "tpe", "kwargs": {"n_startup_trials": 10}}, "pruner": _hyperband(s), "enqueue": []}


def _random_hyperband(p: Problem, s: StudySpec) -> dict[str, Any]:
    return {"sampler": {"name": "random"}, "pruner": _hyperband(s), "enqueue": []}


def _tpe_mv_hyperband(p: Problem, s: StudySpec) -> dict[str, Any]:
    return {"sampler": _TPE_MV, "pruner": _hyperband(s), "enqueue": []}


def _tpe_mv_hyperband_warm(p: Problem, s: StudySpec) -> dict[str, Any]:
    return {"sampler": _TPE_MV, "pruner": _hyperband(s), "enqueue": WARM_START[p.name]}


def _tpe_mv_halving_warm(p: Problem, s: StudySpec) -> dict[str, Any]:
    return {"sampler": _TPE_MV, "pruner": _halving(s), "enqueue": WARM_START[p.name]}


def _gp_median_warm(p: Problem, s: StudySpec) -> dict[str, Any]:
    return {
        "sampler": {"name": "gp", "kwargs": {"n_startup_trials": 5}},
        "pruner": {"name": "median", "kwargs": {"n_startup_trials": 3, "n_warmup_steps": 3}},
        "enqueue": WARM_START[p.name],
    }


def _shipped(p: Problem, s: StudySpec) -> dict[str, Any]:
    return {}  # the study file as it is: its sampler, pruner and enqueued trials


STRATEGIES: dict[str, tuple[str, Any]] = {
    "random": ("(a) random search, no pruning", _random),
    "grid": ("(b) the lesson's hand grid (seeded random order), no pruning", _grid),
    "tpe_median": ("(c) TPE + median pruner", _tpe_median),
    "tpe_hyperband": ("(d) TPE + Hyperband", _tpe_hyperband),
    "random_hyperband": ("(e) random + Hyperband: pruning alone", _random_hyperband),
    "tpe_mv_hyperband": ("(e) TPE multivariate + constant liar + Hyperband", _tpe_mv_hyperband),
    "tpe_mv_hyperband_warm": ("(e) the same + 2 enqueued warm-start trials", _tpe_mv_hyperband_warm),
    "tpe_mv_halving_warm": ("(e) TPE mv + constant liar + successive halving + warm start", _tpe_mv_halving_warm),
    "gp_median_warm": ("(e) GP + median pruner + warm start", _gp_median_warm),
    "shipped": ("the study file as shipped: its sampler, pruner and enqueued trials", _shipped),
}


def make_spec(problem: Problem, strategy: str, seed: int) -> StudySpec:
    """The problem's study file with the strategy's sampler, pruner, enqueued trials; sampler and training seeded."""
    base = load_spec(ROOT / problem.study_file)
    doc = base.model_dump(mode="json", exclude_none=True)
    doc.update(STRATEGIES[strategy][1](problem, base))
    doc["name"] = f"{base.name}-seed{seed}"  # not the strategy: Hyperband hashes the name
    doc["sampler"] = {**doc["sampler"], "seed": seed}
    doc["objective"] = {**doc["objective"], "seed": seed}
    doc["budget"] = {"n_trials": problem.budget}
    doc.pop("predictions", None)
    doc.pop("population", None)
    return parse_spec(doc, f"{problem.study_file} ({strategy})")


def _epochs(t: optuna.trial.FrozenTrial) -> int:
    """Epochs a trial trained: a diverged trial's last (partial) epoch counts too."""
    if t.user_attrs.get("reason") == "diverged" and t.user_attrs.get("diverged_epoch") is not None:
        return int(t.user_attrs["diverged_epoch"])
    if "epochs_reached" in t.user_attrs:
        return int(t.user_attrs["epochs_reached"])
    return len(t.intermediate_values)


_WARM: set[str] = set()


def _warm_up(spec: StudySpec) -> None:
    """Once per process and problem: load the data and train one epoch, so no run's CPU time holds start-up costs."""
    key = repr(spec.objective.data)  # type: ignore[union-attr]
    if key in _WARM:
        return
    import torch

    from hpo.objectives.training import train

    torch.set_num_threads(1)
    train(spec.objective, {"epochs": 1}, 0)  # type: ignore[arg-type]
    _WARM.add(key)


def run_one(
    problem_name: str, strategy: str, seed: int, budget: int | None = None, target: float | None = None
) -> dict[str, Any]:
    """One study until a complete trial reaches the target or the budget is spent; the compute it took."""
    logging.getLogger("hpo").setLevel(logging.ERROR)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    problem = PROBLEMS[problem_name]
    problem = Problem(problem.name, problem.study_file, target or problem.target, budget or problem.budget)
    spec = make_spec(problem, strategy, seed)
    _warm_up(spec)
    stop = threading.Event()
    seen: dict[str, Any] = {"trials": 0, "epochs": 0, "best": -math.inf, "reached": False, "cpu": 0.0, "pruned": 0}
    trace: list[tuple[int, float | None]] = []  # (epochs so far, value of a complete trial)
    with tempfile.TemporaryDirectory() as tmp:
        cpu0, wall0 = time.process_time(), time.perf_counter()

        def on_trial(t: optuna.trial.FrozenTrial) -> None:
            if seen["reached"]:
                return
            seen["trials"] += 1
            seen["epochs"] += _epochs(t)
            seen["pruned"] += t.state == TrialState.PRUNED
            seen["cpu"] = time.process_time() - cpu0
            trace.append((seen["epochs"], t.value if t.state == TrialState.COMPLETE else None))
            if t.state == TrialState.COMPLETE and t.value is not None:
                seen["best"] = max(seen["best"], t.value)
                if t.value >= problem.target:
                    seen["reached"] = True
                    seen["winner"] = {"number": t.number, **t.params}
                    stop.set()

        opts = WorkerOptions(
            heartbeat_interval=None,
            threads=1,
            handle_signals=False,
            n_trials=problem.budget,
            on_trial=on_trial,
            population=1,
        )
        run_worker(spec, f"sqlite:///{tmp}/bench.db", opts, stop=stop)
        wall = time.perf_counter() - wall0
    return {
        "problem": problem_name,
        "strategy": strategy,
        "seed": seed,
        "target": problem.target,
        "budget": problem.budget,
        "wall": wall,
        **seen,
        "trace": trace,
    }


def summarise(rows: list[dict[str, Any]], problems: list[str], strategies: list[str]) -> list[dict[str, Any]]:
    table = []
    for p in problems:
        base = [r for r in rows if r["problem"] == p and r["strategy"] == "random"]
        base_epochs = statistics.median(r["epochs"] for r in base) if base else None
        base_cpu = statistics.median(r["cpu"] for r in base) if base else None
        for s in strategies:
            runs = [r for r in rows if r["problem"] == p and r["strategy"] == s]
            if not runs:
                continue
            epochs = statistics.median(r["epochs"] for r in runs)
            cpu = statistics.median(r["cpu"] for r in runs)
            table.append(
                {
                    "problem": p,
                    "target": PROBLEMS[p].target,
                    "strategy": s,
                    "epochs": epochs,
                    "cpu": cpu,
                    "trials": statistics.median(r["trials"] for r in runs),
                    "ratio_epochs": epochs / base_epochs if base_epochs else None,
                    "ratio_cpu": cpu / base_cpu if base_cpu else None,
                    "reached": sum(r["reached"] for r in runs),
                    "seeds": len(runs),
                    "epochs_each": [r["epochs"] for r in runs],
                }
            )
    return table


def print_table(table: list[dict[str, Any]]) -> None:
    print(
        "| problem (target) | strategy | median epochs | median CPU s | median trials | epochs / random "
        "| CPU / random | seeds reaching target | epochs per seed |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        ratio_e = f"{r['ratio_epochs']:.2f}" if r["ratio_epochs"] is not None else "-"
        ratio_c = f"{r['ratio_cpu']:.2f}" if r["ratio_cpu"] is not None else "-"
        print(
            f"| {r['problem']} ({r['target']}) | {r['strategy']} | {r['epochs']:.0f} | {r['cpu']:.1f} | "
            f"{r['trials']:.0f} | {ratio_e} | {ratio_c} | {r['reached']}/{r['seeds']} | "
            f"{' '.join(str(e) for e in r['epochs_each'])} |"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default="spirals,digits")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--budget", type=int, default=None, help="max trials per run (default: the problem's)")
    ap.add_argument("--target", action="append", default=[], metavar="PROBLEM=VALUE", help="override a target")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    ap.add_argument("--no-baseline", action="store_true", help="do not add random search (ratios then show -)")
    ap.add_argument("--quick", action="store_true", help="tiny budget, 2 seeds, 2 strategies, digits only")
    ap.add_argument("--json", type=Path, default=None, help="also write every run and the table here")
    args = ap.parse_args(argv)
    problems = [p for p in args.problems.split(",") if p]
    strategies = [s for s in args.strategies.split(",") if s]
    seeds, budget = args.seeds, args.budget
    if args.quick:
        problems, strategies, seeds, budget = ["digits"], ["random", "shipped"], 2, 3
    for p in problems:
        if p not in PROBLEMS:
            ap.error(f"unknown problem {p!r} (known: {', '.join(PROBLEMS)})")
    for s in strategies:
        if s not in STRATEGIES:
            ap.error(f"unknown strategy {s!r} (known: {', '.join(STRATEGIES)})")
    if "random" not in strategies and not args.no_baseline:
        strategies.insert(0, "random")  # the baseline of every ratio
    for item in args.target:
        name, _, value = item.partition("=")
        PROBLEMS[name] = Problem(name, PROBLEMS[name].study_file, float(value), PROBLEMS[name].budget)
    jobs = [(p, s, seed, budget, PROBLEMS[p].target) for p in problems for s in strategies for seed in range(seeds)]
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []

    def done(r: dict[str, Any]) -> None:
        rows.append(r)
        if args.json is not None:  # after every run, so a run stopped early leaves what it measured
            args.json.write_text(json.dumps({"runs": rows}, indent=1))
        print(
            f"  {r['problem']:8s} {r['strategy']:22s} seed {r['seed']}: {'reached' if r['reached'] else 'MISSED '} "
            f"epochs {r['epochs']:5d} trials {r['trials']:3d} pruned {r['pruned']:3d} cpu {r['cpu']:7.1f}s "
            f"best {r['best']:.4f} wall {r['wall']:6.1f}s",
            file=sys.stderr,
            flush=True,
        )

    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_one, *j) for j in jobs]
            for f in as_completed(futures):
                done(f.result())
    else:
        for j in jobs:
            done(run_one(*j))
    rows.sort(key=lambda r: (problems.index(r["problem"]), strategies.index(r["strategy"]), r["seed"]))
    table = summarise(rows, problems, strategies)
    print(f"\nsearch efficiency: {seeds} seeds, total wall {time.perf_counter() - started:.0f} s")
    for p in problems:
        desc = PROBLEMS[p]
        print(f"  {p}: {desc.study_file}, target val_accuracy >= {desc.target}, budget {budget or desc.budget} trials")
    for s in strategies:
        print(f"  {s}: {STRATEGIES[s][0]}")
    print()
    print_table(table)
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": rows, "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
