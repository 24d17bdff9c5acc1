"""Training-loop throughput: hpo's objective against the lesson's loop, side by side in one run.

The lesson's loop (docs/lesson.md) builds ``DataLoader(TensorDataset(x, y), batch_size, shuffle=True)`` every
epoch and runs ``optimizer.zero_grad(); loss.backward(); optimizer.step()``, then validates. Both sides train the
same model on the same data with the same optimizer, learning rate and thread count, validation each epoch included.
For the larger models the "bare" column is forward + backward + step alone over pre-cut batches (no shuffling, no
validation, no reporting): hpo's loop should stay within 1.25x of it.

Usage:
    python benchmarks/training_throughput.py            # full table (a few minutes)
    python benchmarks/training_throughput.py --quick    # seconds; what the test suite runs
"""

from __future__ import annotations

import argparse
import math
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hpo import data as data_sources  # noqa: E402
from hpo.objectives.training import Loss, build_model, build_optimizer, resolve_config, train  # noqa: E402
from hpo.spec import parse_spec  # noqa: E402


@dataclass
class Case:
    name: str
    data: dict
    model: dict
    loss: str
    optimizer: str
    lr: float
    batch_sizes: tuple[int, ...]
    bare: bool  # also time forward + backward + step alone


CASES = [
    Case(
        "spirals [2,10,1] sgd",
        {"source": "spirals"},
        {"kind": "mlp", "layers": [10]},
        "mse",
        "sgd",
        0.01,
        (16, 128, 1024),
        False,
    ),
    Case(
        "spirals [64,64] adam",
        {"source": "spirals"},
        {"kind": "mlp", "layers": [64, 64]},
        "bce",
        "adam",
        0.003,
        (16, 128, 1024),
        True,
    ),
    Case(
        "digits [256,256] adam",
        {"source": "digits"},
        {"kind": "mlp", "layers": [256, 256]},
        "cross_entropy",
        "adam",
        0.001,
        (16, 128, 1024),
        True,
    ),
    Case(
        "mnist1d cnn [32,32,32] adam",
        {"source": "mnist1d"},
        {"kind": "cnn", "channels": [32, 32, 32]},
        "cross_entropy",
        "adam",
        0.003,
        (16, 128, 1024),
        True,
    ),
]


def _spec(case: Case, epochs: int):
    return parse_spec(
        {
            "name": "bench",
            "objective": {
                "kind": "training",
                "data": case.data,
                "model": case.model,
                "loss": case.loss,
                "defaults": {"optimizer": case.optimizer, "lr": case.lr, "epochs": epochs},
            },
        }
    ).objective


def lesson_loop(obj, batch_size: int, epochs: int, seed: int = 0) -> float:
    """The lesson's loop; returns final validation accuracy."""
    splits = data_sources.load(obj.data)
    cfg = resolve_config(obj, {"batch_size": batch_size})
    loss = Loss(obj.loss, splits.n_classes)
    torch.manual_seed(seed)
    model = build_model(obj, cfg, splits.input_shape, loss.n_out)
    opt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[cfg.optimizer](model.parameters(), lr=cfg.lr)
    x, y = torch.from_numpy(splits.x_train), loss.target(torch.from_numpy(splits.y_train))
    xv, yv = torch.from_numpy(splits.x_val), loss.target(torch.from_numpy(splits.y_val))
    acc = 0.0
    for _ in range(epochs):
        model.train()
        for xb, yb in DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True):
            opt.zero_grad()
            batch_loss = loss(model(xb), yb)
            batch_loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = float(loss.correct(model(xv), yv)) / len(yv)
    return acc


def bare_loop(obj, batch_size: int, epochs: int, seed: int = 0) -> None:
    """Forward + backward + step over pre-cut batches: the floor hpo's loop is compared with."""
    splits = data_sources.load(obj.data)
    cfg = resolve_config(obj, {"batch_size": batch_size})
    loss = Loss(obj.loss, splits.n_classes)
    torch.manual_seed(seed)
    model = build_model(obj, cfg, splits.input_shape, loss.n_out)
    opt = build_optimizer(cfg, list(model.parameters()))
    x, y = torch.from_numpy(splits.x_train), loss.target(torch.from_numpy(splits.y_train))
    batches = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    for _ in range(epochs):
        for xb, yb in batches:
            opt.zero_grad(set_to_none=True)
            loss(model(xb), yb).backward()
            opt.step()


def best_time(fn, repeats: int, *args) -> float:
    """The fastest of ``repeats`` calls: the least disturbed by other work on the machine."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return min(times)


def epochs_for(n_train: int, batch_size: int, quick: bool) -> int:
    steps = 60 if quick else 1500  # aim for a similar number of optimizer steps per measurement
    return max(1, math.ceil(steps * batch_size / n_train))


def peak_rss_mb(quick: bool) -> float:
    """Peak RSS of one worker process running the spirals study (a few trials)."""
    with tempfile.TemporaryDirectory() as tmp:
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        subprocess.run(
            [
                sys.executable,
                "-m",
                "hpo",
                "run",
                str(ROOT / "studies" / "spirals-optimizer.yaml"),
                "--storage",
                f"sqlite:///{tmp}/m.db",
                "--n-trials",
                "2" if quick else "8",
                "--threads",
                "1",
            ],
            check=True,
            capture_output=True,
            cwd=tmp,
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(before, after) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, seconds: proves the script runs")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else 3
    cases = CASES[:1] + CASES[-1:] if args.quick else CASES
    print(f"torch {torch.__version__}, {args.threads} thread(s); samples/s, best of {repeats}")
    print(f"{'case':30} {'batch':>5} {'lesson':>10} {'hpo':>10} {'hpo/lesson':>10} {'bare':>10} {'hpo time/bare':>13}")
    rows = []
    for case in cases:
        for bs in case.batch_sizes[:2] if args.quick else case.batch_sizes:
            probe = _spec(case, 1)
            n = len(data_sources.load(probe.data).y_train)
            epochs = epochs_for(n, bs, args.quick)
            obj = _spec(case, epochs)
            train(obj, {"batch_size": bs, "epochs": 1}, 0)  # warm up: data cache, allocator
            lesson_loop(obj, bs, 1)
            t_lesson = best_time(lesson_loop, repeats, obj, bs, epochs)
            t_hpo = best_time(train, repeats, obj, {"batch_size": bs}, 0)
            samples = n * epochs
            bare = ""
            overhead = ""
            if case.bare:
                t_bare = best_time(bare_loop, repeats, obj, bs, epochs)
                bare = f"{samples / t_bare:10.0f}"
                overhead = f"{t_hpo / t_bare:13.2f}"
            ratio = t_lesson / t_hpo
            rows.append((case.name, bs, ratio))
            print(
                f"{case.name:30} {bs:5d} {samples / t_lesson:10.0f} {samples / t_hpo:10.0f} {ratio:9.2f}x {bare:>10} {overhead:>13}"
            )
    print(f"peak RSS of one worker process on the spirals study: {peak_rss_mb(args.quick):.0f} MB")


if __name__ == "__main__":
    main()
