"""Population mode against hpo's single-trial loop, side by side in one run.

1. Training throughput (samples/s, validation each epoch included on both sides): ``hpo.objectives.training.train``
   on one configuration against K members trained at once (``hpo.objectives.population.train_members``), each member
   with its own learning rate and seed; spirals ``[2, 10, 1]`` (mse, SGD) and ``[64, 64]`` (bce, Adam), batch 16 and
   128, K = 8, 32, 128. Target: at least 20x at K = 32, batch 16, ``[2, 10, 1]``.
2. End to end: ``studies/spirals-optimizer.yaml`` (its budget, one worker, SQLite) in single-trial mode and with
   ``population: {size: K}``; finished trials per minute and the best value found, over several seeds, medians.

One thread on both sides. Usage::

    python benchmarks/population_throughput.py             # the full tables (many minutes)
    python benchmarks/population_throughput.py --quick     # seconds; what the test suite runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hpo.objectives.population import train_members  # noqa: E402
from hpo.objectives.training import train  # noqa: E402
from hpo.spec import load_spec, parse_spec  # noqa: E402
from hpo.worker import WorkerOptions, run_worker  # noqa: E402

CASES = [
    ("spirals [2,10,1] mse sgd", [10], "mse", "sgd", 0.01),
    ("spirals [64,64] bce adam", [64, 64], "bce", "adam", 0.003),
]


def _objective(layers: list[int], loss: str, n_train: int) -> Any:
    doc = {
        "name": "bench",
        "objective": {
            "kind": "training",
            "data": {"source": "spirals", "n_train": n_train, "n_val": 1000, "seed": 0},
            "model": {"kind": "mlp", "layers": layers},
            "loss": loss,
        },
    }
    return parse_spec(doc).objective


def throughput(quick: bool) -> list[dict[str, Any]]:
    n_train = 512 if quick else 4000
    epochs = 1 if quick else 2
    cases = CASES[:1] if quick else CASES
    batches = (16,) if quick else (16, 128)
    ks = (8,) if quick else (8, 32, 128)
    rows = []
    for name, layers, loss, optimizer, lr in cases:
        obj = _objective(layers, loss, n_train)
        for bs in batches:
            params = {"batch_size": bs, "lr": lr, "optimizer": optimizer, "epochs": epochs}
            train(obj, {**params, "epochs": 1}, 0)  # warm-up (data cache, kernels)
            t = time.perf_counter()
            train(obj, params, 0)
            single = epochs * n_train / (time.perf_counter() - t)
            for k in ks:
                members = {i: ({**params, "lr": lr * 2 ** (4 * i / k - 2)}, i) for i in range(k)}
                t = time.perf_counter()
                train_members(obj, members)
                pop = k * epochs * n_train / (time.perf_counter() - t)
                rows.append({"case": name, "batch": bs, "K": k, "single": single, "population": pop})
                print(f"  {name:28s} batch {bs:4d} K {k:4d}: single {single:10,.0f}/s  population {pop:12,.0f}/s  "
                      f"{pop / single:6.1f}x", file=sys.stderr, flush=True)  # fmt: skip
    return rows


def end_to_end(quick: bool, seeds: int, size: int, n_trials: int | None) -> list[dict[str, Any]]:
    base = load_spec(ROOT / "studies" / "spirals-optimizer.yaml")
    if quick:
        obj = base.objective.model_copy(
            update={"data": base.objective.data.model_copy(update={"n_train": 400, "n_val": 200})}
        )
        base = base.model_copy(update={"objective": obj})
    budget = n_trials or (8 if quick else base.budget.n_trials)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):
            for mode, k in (("single", 1), ("population", size)):
                spec = base.model_copy(
                    update={
                        "name": f"e2e-{mode}-{seed}",
                        "sampler": base.sampler.model_copy(update={"seed": seed}),
                        "objective": base.objective.model_copy(update={"seed": seed}),
                    }
                )
                url = f"sqlite:///{tmp}/{mode}-{seed}.db"
                opts = WorkerOptions(threads=1, n_trials=budget, population=k, handle_signals=False)
                t = time.perf_counter()
                result = run_worker(spec, url, opts)
                wall = time.perf_counter() - t
                import optuna

                study = optuna.load_study(study_name=spec.name, storage=url)
                finished = sum(tr.state.is_finished() for tr in study.trials)
                rows.append(
                    {
                        "mode": mode,
                        "K": k,
                        "seed": seed,
                        "trials": finished,
                        "ran": result.ran,
                        "seconds": wall,
                        "trials_per_min": 60 * finished / wall,
                        "best": study.best_value,
                    }
                )
                print(f"  seed {seed} {mode:10s}: {finished} trials in {wall:7.1f} s, "
                      f"{60 * finished / wall:7.1f}/min, best {study.best_value:.4f}", file=sys.stderr, flush=True)  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the benchmark runs, measures nothing")
    ap.add_argument("--seeds", type=int, default=None, help="end-to-end seeds (default 5; 1 with --quick)")
    ap.add_argument("--size", type=int, default=None, help="population size end to end (default 32; 4 with --quick)")
    ap.add_argument("--n-trials", type=int, default=None, help="end-to-end budget (default: the study file's)")
    ap.add_argument("--skip-e2e", action="store_true", help="only the throughput table")
    ap.add_argument("--skip-throughput", action="store_true", help="only the end-to-end comparison")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = args.seeds or (1 if args.quick else 5)
    size = args.size or (4 if args.quick else 32)

    print("== training throughput: samples/s, single-trial loop vs population (one thread)")
    rows = [] if args.skip_throughput else throughput(args.quick)
    print(f"| case | batch | single-trial samples/s | {' | '.join(f'K={k}' for k in sorted({r['K'] for r in rows}))} |")
    print(f"|---|---|---|{'---|' * len({r['K'] for r in rows})}")
    for case in dict.fromkeys(r["case"] for r in rows):
        for bs in dict.fromkeys(r["batch"] for r in rows if r["case"] == case):
            sel = [r for r in rows if r["case"] == case and r["batch"] == bs]
            cells = " | ".join(f"{r['population']:,.0f}/s ({r['population'] / r['single']:.1f}x)" for r in sel)
            print(f"| {case} | {bs} | {sel[0]['single']:,.0f} | {cells} |")

    e2e: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    if not args.skip_e2e:
        print(f"\n== end to end: studies/spirals-optimizer.yaml, 1 worker, {seeds} seed(s), population K={size}")
        e2e = end_to_end(args.quick, seeds, size, args.n_trials)
        print("| mode | trials (each seed) | median trials/min | median best val_accuracy | best per seed |")
        print("|---|---|---|---|---|")
        for mode in ("single", "population"):
            sel = [r for r in e2e if r["mode"] == mode]
            tpm = statistics.median(r["trials_per_min"] for r in sel)
            best = statistics.median(r["best"] for r in sel)
            summary[mode] = {"trials_per_min": tpm, "best": best}
            trials = sorted({r["trials"] for r in sel})
            per_seed = ", ".join(f"{r['best']:.3f}" for r in sel)
            print(f"| {mode} | {trials} | {tpm:.1f} | {best:.4f} | {per_seed} |")
        ratio = summary["population"]["trials_per_min"] / summary["single"]["trials_per_min"]
        print(f"population / single: {ratio:.1f}x trials per minute")
        summary["ratio"] = ratio
    print(json.dumps({"throughput": rows, "end_to_end": e2e, "summary": summary}))


if __name__ == "__main__":
    main()
