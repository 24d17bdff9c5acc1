"""A short check of the CUDA path, for a machine with a GPU (not run in CI): single-trial and population mode train
on ``--device cuda`` and record the device per trial.

    python benchmarks/cuda_check.py
"""

import time

import optuna
import torch

from hpo.spec import parse_spec
from hpo.worker import WorkerOptions, run_worker

print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0))


def spec(name, pop=None):
    d = {
        "name": name,
        "objective": {
            "kind": "training",
            "data": {"source": "spirals", "n_train": 2000, "n_val": 500},
            "model": {"kind": "mlp", "layers": [64, 64]},
            "loss": "bce",
            "defaults": {"epochs": 5, "batch_size": 64, "optimizer": "adam", "lr": 0.01},
        },
        "space": {
            "lr": {"type": "float", "low": 0.001, "high": 0.1, "log": True},
            "optimizer": {"choices": ["adam", "sgd_momentum", "rmsprop"]},
        },
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "budget": {"n_trials": 6},
    }
    if pop:
        d["population"] = {"size": pop}
    return parse_spec(d)


for name, pop in (("single", None), ("population", 3)):
    t = time.perf_counter()
    r = run_worker(
        spec(name, pop),
        "sqlite:////tmp/d.db",
        WorkerOptions(heartbeat_interval=None, device="cuda", handle_signals=False),
    )
    s = optuna.load_study(study_name=name, storage="sqlite:////tmp/d.db")
    print(
        name,
        r.reason,
        f"{time.perf_counter() - t:.1f}s",
        [(t.state.name, round(t.value or -1, 3), t.user_attrs.get("device")) for t in s.trials],
    )
