"""Sampler efficiency: trials each search strategy needs to FIRST reach a target, side by side in one run.

Cheap offline problems, so many seeds and methods fit on a laptop core (the trial's own cost is nil here; what is
counted is trials, and the sampler's own time):

* **BBOB-style functions** (numpy, one fixed instance: a shifted optimum), with the kinds of dimension a training
  study has: ``sphere_mixed`` (3 floats, a log-scale ``lr``, a 4-way categorical), ``ellipsoid`` (4 floats,
  conditioning 1e3), ``rosenbrock`` (4 floats), ``rastrigin`` (3 floats, multimodal), ``ellipsoid_int`` (2 integers,
  2 floats, a log ``lr``: mixed-integer);
* **surrogates of the lesson's studies** (shaped after what the lesson finds, not fitted): ``spirals_optimizer`` (the
  space of ``studies/spirals-optimizer.yaml``: batch size, log lr, epochs, optimizer; each optimizer its own best
  lr, scaled with the batch size; too large an lr diverges) and ``spirals_arch`` (layers, activation, log lr, batch
  size).

Each run asks and tells through an in-memory Optuna study, seeded as hpo seeds it (:func:`hpo.samplers.seed_per_trial`)
until a told value reaches the problem's target or the budget is spent (then counted at the budget: a lower bound,
shown in the "reached" column). ``@8`` / ``@32``: that many trials in flight (asked before the oldest is told, in
order: 8 workers, or a population of 32), counted in trials told. Sampler ms/trial: the time ``ask`` took (the
sampler's draw and Optuna's bookkeeping) over the trials of the run; ``--cost`` measures it over 1,000 trials.

Usage::

    python benchmarks/sampler_efficiency.py                            # every problem and method, 5 seeds
    python benchmarks/sampler_efficiency.py --jobs 2 --json out.json   # in 2 processes
    python benchmarks/sampler_efficiency.py --problems sphere_mixed --methods tpe,auto --seeds 3
    python benchmarks/sampler_efficiency.py --cost                     # sampler ms/trial at 1,000 trials
    python benchmarks/sampler_efficiency.py --quick                    # seconds; what the test suite runs
    python benchmarks/sampler_efficiency.py --table a.json,b.json      # one table from runs made apart
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402

from hpo.auto_sampler import AutoSampler  # noqa: E402
from hpo.samplers import seed_per_trial  # noqa: E402

# --------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    name: str
    family: str
    objective: Callable[[optuna.Trial], float]  # minimised
    target: float
    budget: int


def _shift(name: str, d: int) -> np.ndarray:
    """The instance's optimum in [-4, 4]^d (fixed per problem, as a BBOB instance is)."""
    return np.random.default_rng(sum(map(ord, name))).uniform(-4, 4, d)


def _floats(t: optuna.Trial, d: int) -> np.ndarray:
    return np.array([t.suggest_float(f"x{i}", -5, 5) for i in range(d)])


S_MIXED, S_ELL, S_ROS, S_RAS, S_INT = (_shift(n, 4) for n in ("sphere", "ellipsoid", "rosen", "rastrigin", "int"))
CAT_PENALTY = {"a": 0.0, "b": 1.0, "c": 2.0, "d": 4.0}


def sphere_mixed(t: optuna.Trial) -> float:
    x = _floats(t, 3)
    lr = t.suggest_float("lr", 1e-5, 1.0, log=True)
    cat = t.suggest_categorical("opt", list(CAT_PENALTY))
    return float(np.sum((x - S_MIXED[:3]) ** 2) + (math.log10(lr) + 2.5) ** 2 + CAT_PENALTY[cat])


def ellipsoid(t: optuna.Trial) -> float:
    z = _floats(t, 4) - S_ELL
    return float(np.sum(10 ** (3 * np.arange(4) / 3) * z**2))


def rosenbrock(t: optuna.Trial) -> float:
    z = _floats(t, 4) - S_ROS + 1.0
    return float(np.sum(100 * (z[1:] - z[:-1] ** 2) ** 2 + (z[:-1] - 1) ** 2))


def rastrigin(t: optuna.Trial) -> float:
    z = _floats(t, 3) - S_RAS[:3]
    return float(10 * len(z) + np.sum(z**2 - 10 * np.cos(2 * np.pi * z)))


def ellipsoid_int(t: optuna.Trial) -> float:
    k = np.array([t.suggest_int(f"k{i}", -10, 10) for i in range(2)])
    x = np.array([t.suggest_float(f"x{i}", -5, 5) for i in range(2)])
    lr = t.suggest_float("lr", 1e-5, 1.0, log=True)
    ks = np.round(S_INT[:2] * 2)
    return float(np.sum((k - ks) ** 2) + 10 * np.sum((x - S_INT[2:]) ** 2) + (math.log10(lr) + 3) ** 2)


# The lesson's optimiser study, shaped after its findings: each optimizer has its own best lr (larger for plain SGD),
# which grows with the square root of the batch size; too large an lr diverges (chance accuracy); more epochs help
# with diminishing returns, less so for large batches (fewer steps).
OPT = {  # best lr at batch 32, peak accuracy
    "sgd": (0.3, 0.985),
    "sgd_momentum": (0.03, 0.995),
    "adam": (0.003, 0.998),
    "rmsprop": (0.001, 0.99),
}


def spirals_optimizer(t: optuna.Trial) -> float:
    bs = t.suggest_int("batch_size", 8, 512, log=True)
    lr = t.suggest_float("lr", 1e-4, 1.0, log=True)
    epochs = t.suggest_int("epochs", 5, 100)
    opt = t.suggest_categorical("optimizer", list(OPT))
    best_lr, peak = OPT[opt]
    best_lr *= math.sqrt(bs / 32)
    off = math.log10(lr / best_lr)
    if off > 0.8:
        return 0.5  # diverged: chance
    steps = epochs * 1000 / bs
    acc = peak - 0.08 * off**2 - 0.45 * math.exp(-steps / 400)
    return 1.0 - max(acc, 0.5)


LAYERS = {"[10]": 0.05, "[32, 32]": 0.01, "[64, 64]": 0.004, "[32, 32, 32]": 0.0, "[128]": 0.02}


def spirals_arch(t: optuna.Trial) -> float:
    layers = t.suggest_categorical("layers", list(LAYERS))
    act = t.suggest_categorical("activation", ["relu", "tanh"])
    lr = t.suggest_float("lr", 1e-4, 1.0, log=True)
    bs = t.suggest_int("batch_size", 8, 512, log=True)
    off = math.log10(lr / (0.004 * math.sqrt(bs / 32)))
    if off > 0.9:
        return 0.5
    acc = (
        0.995 - LAYERS[layers] - (0.015 if act == "tanh" else 0.0) - 0.06 * off**2 - 0.02 * math.log2(bs / 32) ** 2 / 9
    )
    return 1.0 - max(acc, 0.5)


PROBLEMS: dict[str, Problem] = {
    p.name: p
    for p in (
        Problem("sphere_mixed", "bbob", sphere_mixed, 0.3, 200),
        Problem("ellipsoid", "bbob", ellipsoid, 40.0, 200),
        Problem("rosenbrock", "bbob", rosenbrock, 20.0, 200),
        Problem("rastrigin", "bbob", rastrigin, 7.0, 200),
        Problem("ellipsoid_int", "bbob", ellipsoid_int, 2.0, 200),
        Problem("spirals_optimizer", "lesson", spirals_optimizer, 0.006, 200),
        Problem("spirals_arch", "lesson", spirals_arch, 0.007, 200),
    )
}


# --------------------------------------------------------------------------- methods


def _quiet(make: Callable[[int], optuna.samplers.BaseSampler]) -> Callable[[int], optuna.samplers.BaseSampler]:
    def build(seed: int) -> optuna.samplers.BaseSampler:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sampler = make(seed)
        seed_per_trial(sampler, seed)  # as hpo seeds every sampler
        return sampler

    return build


METHODS: dict[str, tuple[str, Callable[[int], optuna.samplers.BaseSampler]]] = {
    "random": ("Optuna RandomSampler", _quiet(lambda s: optuna.samplers.RandomSampler(seed=s))),
    "tpe": (
        "Optuna TPESampler() as it comes (hpo's default before)",
        _quiet(lambda s: optuna.samplers.TPESampler(seed=s)),
    ),
    "tpe_mv": (
        "TPE multivariate + group + constant liar",
        _quiet(lambda s: optuna.samplers.TPESampler(seed=s, multivariate=True, group=True, constant_liar=True)),
    ),
    "gp": ("Optuna GPSampler()", _quiet(lambda s: optuna.samplers.GPSampler(seed=s))),
    "auto": (
        "hpo auto, trials >= 10 s: random 10, GP to trial 100, then TPE mv",
        _quiet(lambda s: AutoSampler(seed=s, gp_trials=100)),
    ),
    "auto_cheap": (
        "hpo auto, trials < 10 s: random 10, then TPE mv",
        _quiet(lambda s: AutoSampler(seed=s)),
    ),
}


# --------------------------------------------------------------------------- runs


def run_one(problem: str, method: str, seed: int, in_flight: int = 1, budget: int | None = None) -> dict[str, Any]:
    """One study until a told value reaches the target (or the budget): trials told, sampler time."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(1)
    p = PROBLEMS[problem]
    budget = budget or p.budget
    study = optuna.create_study(sampler=METHODS[method][1](seed))
    pending: deque[tuple[optuna.Trial, float]] = deque()
    asked = told = 0
    ask_s, best, reached = 0.0, math.inf, None
    cpu0 = time.process_time()
    while told < budget and reached is None:
        while len(pending) < in_flight and asked < budget:
            start = time.perf_counter()
            trial = study.ask()
            value = p.objective(trial)  # the suggestions are made here: the trial is in flight with its params
            ask_s += time.perf_counter() - start
            pending.append((trial, value))
            asked += 1
        trial, value = pending.popleft()
        study.tell(trial, value)
        told += 1
        best = min(best, value)
        if value <= p.target:
            reached = told
    return {
        "problem": problem,
        "method": method,
        "in_flight": in_flight,
        "seed": seed,
        "trials": reached if reached is not None else budget,
        "reached": reached is not None,
        "best": best,
        "ms_per_trial": 1000 * ask_s / max(asked, 1),
        "cpu": time.process_time() - cpu0,
    }


def cost(method: str, n: int = 1000, problem: str = "sphere_mixed") -> dict[str, Any]:
    """Sampler ms/trial over ``n`` trials of one study, and over its last 100 (the cost at that size)."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(1)
    study = optuna.create_study(sampler=METHODS[method][1](0))
    times = []
    for _ in range(n):
        start = time.perf_counter()
        trial = study.ask()
        value = PROBLEMS[problem].objective(trial)
        times.append(time.perf_counter() - start)
        study.tell(trial, value)
    return {
        "method": method,
        "n": n,
        "mean_ms": 1000 * statistics.mean(times),
        "last100_ms": 1000 * statistics.mean(times[-100:]),
    }


def _key(method: str, k: int) -> str:
    return method if k == 1 else f"{method}@{k}"


def summarise(rows: list[dict[str, Any]], problems: list[str], configs: list[tuple[str, int]]) -> list[dict[str, Any]]:
    table = []
    for p in problems:
        base = [r["trials"] for r in rows if r["problem"] == p and r["method"] == "tpe" and r["in_flight"] == 1]
        base_med = statistics.median(base) if base else None
        for m, k in configs:
            runs = [r for r in rows if r["problem"] == p and r["method"] == m and r["in_flight"] == k]
            if not runs:
                continue
            trials = sorted(r["trials"] for r in runs)
            med = statistics.median(trials)
            table.append(
                {
                    "problem": p,
                    "method": _key(m, k),
                    "median": med,
                    "q25": float(np.percentile(trials, 25)),
                    "q75": float(np.percentile(trials, 75)),
                    "vs_tpe": med / base_med if base_med else None,
                    "reached": sum(r["reached"] for r in runs),
                    "seeds": len(runs),
                    "ms": statistics.median(r["ms_per_trial"] for r in runs),
                    "each": [r["trials"] for r in sorted(runs, key=lambda r: r["seed"])],
                }
            )
    return table


def print_table(table: list[dict[str, Any]]) -> None:
    print(
        "| problem (target) | method | trials to target: median [q25-q75] | / TPE | reached | sampler ms/trial | per seed |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in table:
        p = PROBLEMS[r["problem"]]
        ratio = f"{r['vs_tpe']:.2f}" if r["vs_tpe"] is not None else "-"
        print(
            f"| {r['problem']} ({p.target:g}) | {r['method']} | {r['median']:.0f} [{r['q25']:.0f}-{r['q75']:.0f}] | "
            f"{ratio} | {r['reached']}/{r['seeds']} | {r['ms']:.0f} | {' '.join(map(str, r['each']))} |"
        )


def print_goals(table: list[dict[str, Any]]) -> None:
    """Per problem, the issue's ratios: the default over plain TPE, over the best of TPE and GP, and with trials in
    flight over itself sequential (medians; "-" where a run is missing)."""
    med = {(r["problem"], r["method"]): r["median"] for r in table}

    def ratio(p: str, a: str, b: str | list[str]) -> str:
        bs = [b] if isinstance(b, str) else b
        got = [med[(p, x)] for x in bs if (p, x) in med]
        return f"{med[(p, a)] / min(got):.2f}" if (p, a) in med and got else "-"

    print(
        "| problem | auto / tpe | auto / best of tpe, gp | auto_cheap / tpe | auto@8 / auto | auto@32 / auto "
        "| tpe@8 / tpe | tpe@32 / tpe |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for p in dict.fromkeys(r["problem"] for r in table):
        print(
            f"| {p} | {ratio(p, 'auto', 'tpe')} | {ratio(p, 'auto', ['tpe', 'gp'])} | {ratio(p, 'auto_cheap', 'tpe')} | "
            f"{ratio(p, 'auto@8', 'auto')} | {ratio(p, 'auto@32', 'auto')} | {ratio(p, 'tpe@8', 'tpe')} | "
            f"{ratio(p, 'tpe@32', 'tpe')} |"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default=",".join(PROBLEMS))
    ap.add_argument("--methods", default="tpe,tpe_mv,gp,auto,auto_cheap")
    ap.add_argument("--in-flight", default="1,8,32", help="trials in flight; the parallel runs take --parallel-methods")
    ap.add_argument("--parallel-methods", default="tpe,auto", help="methods also run with trials in flight")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--cost", action="store_true", help="sampler ms/trial over 1,000 trials instead")
    ap.add_argument("--quick", action="store_true", help="2 problems, 2 seeds, small budget")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--table", default=None, help="print the table of earlier runs' --json files (comma-separated)")
    args = ap.parse_args(argv)
    if args.table:
        once: dict[tuple[str, str, int, int], dict[str, Any]] = {}
        for f in args.table.split(","):  # a run made twice (two files) counts once: the first file's
            if not Path(f).exists():
                print(f"(no {f} yet)", file=sys.stderr)
                continue
            for r in json.loads(Path(f).read_text())["runs"]:
                once.setdefault((r["problem"], r["method"], r["in_flight"], r["seed"]), r)
        rows = list(once.values())
        order = list(METHODS)
        configs = sorted({(r["method"], r["in_flight"]) for r in rows}, key=lambda c: (c[1], order.index(c[0])))
        problems = [p for p in PROBLEMS if any(r["problem"] == p for r in rows)]
        table = summarise(rows, problems, configs)
        print_table(table)
        print()
        print_goals(table)
        return 0
    if args.cost:
        for m in [m for m in args.methods.split(",") if m != "gp"]:
            r = cost(m)
            print(
                f"{m:12s} {r['n']} trials: {r['mean_ms']:.1f} ms/trial mean, {r['last100_ms']:.1f} ms/trial at the last 100"
            )
        return 0
    problems = [p for p in args.problems.split(",") if p]
    methods = [m for m in args.methods.split(",") if m]
    flights = [int(k) for k in args.in_flight.split(",") if k]
    seeds, budget = args.seeds, args.budget
    if args.quick:
        problems, methods, flights, seeds, budget = (
            ["sphere_mixed", "spirals_optimizer"],
            ["tpe", "auto_cheap"],
            [1, 8],
            2,
            30,
        )
    for p in problems:
        if p not in PROBLEMS:
            ap.error(f"unknown problem {p!r} (known: {', '.join(PROBLEMS)})")
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r} (known: {', '.join(METHODS)})")
    parallel = methods if args.quick else [m for m in args.parallel_methods.split(",") if m in methods]
    configs = [(m, 1) for m in methods if 1 in flights] + [(m, k) for k in flights if k > 1 for m in parallel]
    jobs = [(p, m, s, k, budget) for p in problems for m, k in configs for s in range(seeds)]
    jobs.sort(key=lambda j: j[1] in ("gp", "auto"), reverse=True)  # the slow ones first: the pool ends together
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []

    def done(r: dict[str, Any]) -> None:
        rows.append(r)
        if args.json is not None:
            args.json.write_text(json.dumps({"runs": rows}, indent=1))
        print(
            f"  {r['problem']:18s} {_key(r['method'], r['in_flight']):14s} seed {r['seed']}: "
            f"{'reached' if r['reached'] else 'MISSED '} trials {r['trials']:4d} ms/trial {r['ms_per_trial']:6.1f}",
            file=sys.stderr,
            flush=True,
        )

    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for f in as_completed([pool.submit(run_one, *j) for j in jobs]):
                done(f.result())
    else:
        for j in jobs:
            done(run_one(*j))
    table = summarise(rows, problems, configs)
    print(f"\nsampler efficiency: {seeds} seeds, total wall {time.perf_counter() - started:.0f} s")
    for m in methods:
        print(f"  {m}: {METHODS[m][0]}")
    print()
    print_table(table)
    print()
    print_goals(table)
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": rows, "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
