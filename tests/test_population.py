"""Population mode: K trials trained at once, stacked, each as its own trial (issue 8). Real training on small data.

Tolerances. A member and the single-trial run with the same parameters and seed compute the same arithmetic in a
different order (a batched matmul instead of ``nn.Linear``'s, each member's loss as ``sum(row / B)`` rather than
``mean``, the optimizer's update with per-member tensors instead of Python floats), so they agree to float32
rounding, not bit for bit: measured differences are around 1e-7 on losses after a few epochs. The tests allow 1e-5
on losses and parameters (rtol 1e-4 for parameters that grew large) and require accuracies to be equal.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState
from sqlalchemy.exc import SQLAlchemyError

from hpo import query
from hpo.errors import HpoError
from hpo.models import mlp
from hpo.objectives.population import PopulationTrainer, population_size, train_members
from hpo.objectives.training import train
from hpo.spec import TrainingObjective, load_spec, parse_spec
from hpo.worker import WorkerOptions, replay, run_worker

from .conftest import ROOT, hpo_cli, write_study
from .timing import ceiling

LOSS_TOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _objective(
    loss: str = "mse", layers: list[int] | None = None, n_train: int = 256, **data: Any
) -> TrainingObjective:
    doc = {
        "name": "p",
        "objective": {
            "kind": "training",
            "data": {"source": "spirals", "n_train": n_train, "n_val": 128, "n_test": 64, "seed": 0, **data},
            "model": {"kind": "mlp", "layers": layers or [10]},
            "loss": loss,
            "defaults": {"epochs": 2, "batch_size": 16},
        },
    }
    obj = parse_spec(doc).objective
    assert isinstance(obj, TrainingObjective)
    return obj


# --------------------------------------------------------------------------- optimizers against torch.optim

OPTIMIZERS = {
    "sgd": [{"lr": 0.3}, {"lr": 0.05}],
    "sgd_momentum": [{"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}, {"lr": 0.2, "momentum": 0.5}],
    "adam": [{"lr": 0.01, "beta1": 0.8, "beta2": 0.99}, {"lr": 0.003, "weight_decay": 0.05}],
    "adamw": [{"lr": 0.01, "weight_decay": 0.1}, {"lr": 0.02, "weight_decay": 0.5, "beta2": 0.95}],
    "rmsprop": [{"lr": 0.003, "weight_decay": 0.01}, {"lr": 0.01}],
}


def _torch_optim(kind: str, params: list[torch.nn.Parameter], p: dict[str, Any]) -> torch.optim.Optimizer:
    wd, betas = p.get("weight_decay", 0.0), (p.get("beta1", 0.9), p.get("beta2", 0.999))
    if kind == "sgd":
        return torch.optim.SGD(params, lr=p["lr"], weight_decay=wd)
    if kind == "sgd_momentum":
        return torch.optim.SGD(params, lr=p["lr"], momentum=p["momentum"], weight_decay=wd)
    if kind == "adam":
        return torch.optim.Adam(params, lr=p["lr"], betas=betas, weight_decay=wd)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=p["lr"], betas=betas, weight_decay=wd)
    return torch.optim.RMSprop(params, lr=p["lr"], weight_decay=wd)


def _reference(obj: TrainingObjective, kind: str, p: dict[str, Any], seed: int, epochs: int) -> list[torch.Tensor]:
    """torch.optim on hpo's MLP, with the data order a member uses: one randperm per epoch from Generator(seed)."""
    from hpo import data as data_sources

    splits = data_sources.load(obj.data)
    x = torch.from_numpy(splits.x_train)
    y = torch.from_numpy(splits.y_train).float().unsqueeze(1)
    torch.manual_seed(seed)
    model = mlp(2, [10], 1)
    opt = _torch_optim(kind, list(model.parameters()), p)
    gen = torch.Generator().manual_seed(seed)
    bs = p.get("batch_size", 16)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), bs):
            idx = perm[i : i + bs]
            loss = torch.nn.functional.mse_loss(torch.sigmoid(model(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return [t.detach() for t in model.parameters()]


def _final_parameters(obj: TrainingObjective, members: dict[str, tuple[dict[str, Any], int]]) -> dict[str, Any]:
    trainer = PopulationTrainer(obj)
    for key, (params, seed) in members.items():
        trainer.add(key, params, seed)
    final: dict[str, list[torch.Tensor]] = {}
    while len(trainer):
        for ev in trainer.step():
            if ev.final:
                final[str(ev.key)] = trainer.parameters(ev.key)
    return final


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_member_trajectory_equals_torch_optim(kind: str) -> None:
    """Each member of a mixed population (all five optimizer kinds, two settings each, a batch size of 16 or 48)
    ends 2 epochs (32 or 11 steps) where torch.optim takes the same model, seed and data order."""
    obj = _objective()
    members = {}
    for i, (k, settings) in enumerate(OPTIMIZERS.items()):
        for j, p in enumerate(settings):
            members[f"{k}-{j}"] = ({"optimizer": k, "batch_size": 16 if j == 0 else 48, **p}, 10 * i + j)
    final = _final_parameters(obj, members)
    for j, p in enumerate(OPTIMIZERS[kind]):
        params, seed = members[f"{kind}-{j}"]
        ref = _reference(obj, kind, {**p, "batch_size": params["batch_size"]}, seed, epochs=2)
        torch.manual_seed(seed)
        start = list(mlp(2, [10], 1).parameters())
        got = final[f"{kind}-{j}"]
        assert any(not torch.equal(a, s.detach()) for a, s in zip(got, start, strict=True)), "the member trained"
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=LOSS_TOL)


def test_a_tick_takes_more_rows_than_the_smallest_batch_for_small_models() -> None:
    """Beside a batch-16 member, a batch-1000 member of the 41-parameter model takes 4096 // 41 = 99 rows a tick
    (not 16), so it steps every 11 ticks, not every 63; both still end where torch.optim ends with their own batch
    size (the batch-16 member's unused rows weigh zero)."""
    obj = _objective(n_train=2000)
    members = {"small": ({"optimizer": "sgd", "lr": 0.3, "batch_size": 16, "epochs": 1}, 1),
               "large": ({"optimizer": "sgd", "lr": 0.3, "batch_size": 1000, "epochs": 1}, 2)}  # fmt: skip
    trainer = PopulationTrainer(obj)
    for key, (params, seed) in members.items():
        trainer.add(key, params, seed)
    trainer.step()
    (group,) = trainer.groups.values()
    assert group.min_rows == 99
    assert dict(zip([m.key for m in group.members], group.pos.tolist(), strict=True)) == {"small": 16, "large": 99}
    for _ in range(10):
        trainer.step()
    assert dict(zip([m.key for m in group.members], group.steps.tolist(), strict=True)) == {"small": 11, "large": 1}
    final = _final_parameters(obj, members)
    for key, (params, seed) in members.items():
        ref = _reference(obj, "sgd", params, seed, epochs=1)
        for a, b in zip(final[key], ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=LOSS_TOL)


# --------------------------------------------------------------------------- members against single-trial mode


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_member_metrics_equal_single_trial_mode(loss: str) -> None:
    """Every epoch's validation loss (within 1e-5), accuracy (equal) and training loss (within 1e-5) of each member
    equal what hpo's single-trial loop gives for the same parameters and seed, whatever else trains beside it."""
    obj = _objective(loss, n_train=400)
    members = {
        "lesson": ({"optimizer": "sgd", "lr": 0.5, "batch_size": 16, "epochs": 3}, 7),
        "adam": ({"optimizer": "adam", "lr": 0.01, "batch_size": 16, "epochs": 2}, 8),
        "odd-batch": ({"optimizer": "sgd_momentum", "lr": 0.05, "momentum": 0.9, "batch_size": 37, "epochs": 3}, 9),
        "rmsprop": ({"optimizer": "rmsprop", "lr": 0.003, "batch_size": 100, "epochs": 1}, 10),
        "adamw": ({"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.3, "batch_size": 24, "epochs": 2}, 11),
    }
    history = train_members(obj, members)
    for key, (params, seed) in members.items():
        _, single = train(obj, params, seed)
        got = history[key]
        assert [r.epoch for r in got] == [r.epoch for r in single] == list(range(1, params["epochs"] + 1))
        for a, b in zip(got, single, strict=True):
            assert a.val_accuracy == b.val_accuracy, key
            assert abs(a.val_loss - b.val_loss) <= LOSS_TOL, key
            assert abs(a.train_loss - b.train_loss) <= LOSS_TOL, key


def test_cnn_members_use_the_generic_fallback() -> None:
    """A model hpo does not stack natively (the CNN) goes through torch.func and still equals single-trial mode."""
    doc = {
        "name": "c",
        "objective": {
            "kind": "training",
            "data": {"source": "digits", "images": True},
            "model": {"kind": "cnn", "channels": [4]},
            "defaults": {"epochs": 1, "batch_size": 64},
        },
    }
    obj = parse_spec(doc).objective
    assert isinstance(obj, TrainingObjective)
    members = {"a": ({"optimizer": "adam", "lr": 0.01}, 1), "b": ({"optimizer": "sgd", "lr": 0.1}, 2)}
    history = train_members(obj, members)
    for key, (params, seed) in members.items():
        (single,) = train(obj, params, seed)[1]
        assert history[key][0].val_accuracy == single.val_accuracy
        assert abs(history[key][0].val_loss - single.val_loss) <= LOSS_TOL


# --------------------------------------------------------------------------- members leave without disturbing others


def test_pruned_and_diverged_members_leave_the_others_unchanged() -> None:
    """With a member that diverges (bce, sgd, lr 10) and one pruned after its first epoch beside them, the other
    members' every epoch equals a population without those two: leaving touches no other member's rows."""
    obj = _objective("bce", n_train=320)
    good = {
        "a": ({"optimizer": "adam", "lr": 0.01, "batch_size": 16, "epochs": 3}, 1),
        "b": ({"optimizer": "sgd_momentum", "lr": 0.05, "momentum": 0.9, "batch_size": 32, "epochs": 3}, 2),
    }
    bad = {
        "diverges": ({"optimizer": "sgd", "lr": 10.0, "batch_size": 16, "epochs": 3}, 3),
        "pruned": ({"optimizer": "rmsprop", "lr": 0.01, "batch_size": 16, "epochs": 3}, 4),
    }

    def run(members: dict[str, tuple[dict[str, Any], int]]) -> dict[str, list[Any]]:
        trainer = PopulationTrainer(obj)
        for key, (params, seed) in members.items():
            trainer.add(key, params, seed)
        history: dict[str, list[Any]] = {key: [] for key in members}
        while len(trainer):
            for ev in trainer.step():
                history[str(ev.key)].append(ev.result)
                if not math.isfinite(ev.result.train_loss) or ev.key == "pruned":
                    trainer.remove(ev.key)
        return history

    alone, crowded = run(good), run({**good, **bad})
    assert len(crowded["diverges"]) == 1 and not math.isfinite(crowded["diverges"][0].train_loss)
    assert len(crowded["pruned"]) == 1
    for key in good:
        assert len(crowded[key]) == 3
        for a, b in zip(crowded[key], alone[key], strict=True):
            assert a.val_accuracy == b.val_accuracy and math.isfinite(a.val_loss)
            assert abs(a.val_loss - b.val_loss) <= 1e-6 and abs(a.train_loss - b.train_loss) <= 1e-6


FAST = WorkerOptions(heartbeat_interval=None, threads=1, handle_signals=False)


def test_worker_prunes_a_diverging_member_and_completes_the_others(tmp_path: Path, sqlite_url: str) -> None:
    """Through the worker: the diverging trial is pruned with reason=diverged and its epoch; the others complete,
    each with the value single-trial mode gives for its parameters and seed (val_loss, within 1e-5)."""
    good = [{"lr": 0.01, "optimizer": "adam"}, {"lr": 0.1, "optimizer": "sgd_momentum"}, {"lr": 0.003}]
    path = write_study(
        tmp_path / "s.yaml",
        "pop-diverge",
        metric="val_loss",
        direction="minimize",
        space={
            "lr": {"type": "float", "low": 0.001, "high": 10.0, "log": True},
            "optimizer": {"choices": ["sgd", "sgd_momentum", "adam"]},
            "batch_size": 16,
        },
        enqueue=[*good, {"lr": 10.0, "optimizer": "sgd"}],
        budget={"n_trials": 4},
        population={"size": 4},
    )
    spec = load_spec(path)
    result = run_worker(spec, sqlite_url, FAST)
    assert (result.complete, result.pruned, result.failed) == (3, 1, 0)
    trials = optuna.load_study(study_name="pop-diverge", storage=sqlite_url).trials
    bad = trials[3]
    assert bad.state == TrialState.PRUNED and bad.user_attrs["reason"] == "diverged"
    assert bad.user_attrs["diverged_epoch"] == 1 and bad.user_attrs["epochs_reached"] == 0
    for t in trials[:3]:
        assert t.state == TrialState.COMPLETE and t.user_attrs["population"] == 4
        assert sorted(t.intermediate_values) == [1, 2, 3] and len(t.user_attrs["train_loss"]) == 3
        assert abs(replay(spec, t) - t.value) <= LOSS_TOL  # replay: the single-trial loop, same params and seed


def test_worker_prunes_members_with_the_study_pruner(tmp_path: Path, sqlite_url: str) -> None:
    path = write_study(
        tmp_path / "s.yaml",
        "pop-prune",
        space={"lr": {"type": "float", "low": 0.00001, "high": 0.1, "log": True}, "epochs": 6},
        enqueue=[{"lr": 0.05}, {"lr": 0.03}, {"lr": 0.02}],
        sampler={"name": "random", "seed": 1},
        pruner={"name": "median", "kwargs": {"n_startup_trials": 3, "n_warmup_steps": 1}},
        budget={"n_trials": 14},
        population={"size": 4},
    )
    result = run_worker(load_spec(path), sqlite_url, FAST)
    trials = optuna.load_study(study_name="pop-prune", storage=sqlite_url).trials
    assert len(trials) == 14 and result.ran == 14
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, "a median pruner over lr down to 1e-5 prunes the slow learners"
    for t in pruned:
        assert t.user_attrs["reason"] == "pruned" and t.user_attrs["epochs_reached"] < 6


# --------------------------------------------------------------------------- the switch


def test_population_size_comes_from_flag_then_file_then_default(tmp_path: Path) -> None:
    spec = load_spec(write_study(tmp_path / "a.yaml", "a"))
    assert population_size(spec) == 1  # the default: single-trial mode
    assert population_size(spec, "8") == 8
    spec = load_spec(write_study(tmp_path / "b.yaml", "b", population={"size": 16}))
    assert population_size(spec) == 16 and population_size(spec, 1) == 1
    assert population_size(spec, "auto") == 32  # an MLP of 65 parameters: under the 10,000 threshold
    lesson = load_spec(ROOT / "studies" / "spirals-optimizer.yaml")
    assert population_size(lesson, "auto") == 32
    big = write_study(
        tmp_path / "c.yaml",
        "c",
        objective={"kind": "training", "data": {"source": "spirals"}, "model": {"layers": [128, 128]}},
    )
    assert population_size(load_spec(big), "auto") == 1  # 17k parameters
    with pytest.raises(HpoError, match="population size"):
        population_size(spec, "many")
    grok = parse_spec(
        {"name": "g", "direction": "minimize", "metric": "steps_to_generalise", "objective": {"kind": "grokking"}}
    )
    with pytest.raises(HpoError, match="training objective only"):
        population_size(grok, 4)


def test_population_study_through_the_cli_meets_the_exact_budget(tmp_path: Path) -> None:
    """``hpo run --population 8 --workers 2``: exactly the budget, ordinary trials that queries read."""
    url = f"sqlite:///{tmp_path / 'p.db'}"
    path = write_study(
        tmp_path / "s.yaml",
        "pop-cli",
        space={
            "lr": {"type": "float", "low": 0.001, "high": 0.1, "log": True},
            "batch_size": {"type": "int", "low": 16, "high": 128, "log": True},
            "optimizer": {"choices": ["sgd", "sgd_momentum", "adam", "adamw", "rmsprop"]},
            "epochs": {"type": "int", "low": 1, "high": 3},
        },
        budget={"n_trials": 20},
    )
    res = hpo_cli("run", str(path), "--storage", url, "--population", "8", "--workers", "2")
    assert res.returncode == 0, res.stderr
    frame = query.trials(url, "pop-cli")
    assert len(frame) == 20 and set(frame["state"]) <= {"COMPLETE", "PRUNED"}
    assert frame["seed"].nunique() == 20 and frame["epochs_reached"].notna().all()
    study = optuna.load_study(study_name="pop-cli", storage=url)
    assert {t.user_attrs["population"] for t in study.trials} == {8}
    assert "best trial #" in res.stdout


def test_killed_population_worker_has_all_its_trials_reaped(tmp_path: Path) -> None:
    """Heartbeats cover every member: after kill -9, ``hpo reap`` fails and re-queues all K running trials."""
    url = f"sqlite:///{tmp_path / 'k.db'}"
    path = write_study(
        tmp_path / "s.yaml",
        "pop-kill",
        objective={
            "kind": "training",
            "data": {"source": "spirals", "n_train": 4000, "n_val": 200, "seed": 0},
            "model": {"kind": "mlp", "layers": [16]},
            "loss": "bce",
            "defaults": {"batch_size": 16, "epochs": 200, "optimizer": "adam"},
        },
        budget={"n_trials": 4},
    )
    env = {**os.environ, "HPO_STORAGE": url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpo", "worker", str(path), "--population", "4", "--heartbeat", "1", "--grace", "3"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + ceiling(120)
        running: list[optuna.trial.FrozenTrial] = []
        while time.monotonic() < deadline and len(running) < 4:
            time.sleep(0.5)
            try:
                study = optuna.load_study(study_name="pop-kill", storage=url)
            except (KeyError, SQLAlchemyError):  # not created yet, or the worker is creating the tables right now
                continue
            running = [t for t in study.trials if t.state == TrialState.RUNNING]
        assert len(running) == 4
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    time.sleep(4)
    res = hpo_cli("reap", str(path), "--storage", url, "--heartbeat", "1", "--grace", "3")
    assert res.returncode == 0, res.stderr
    trials = optuna.load_study(study_name="pop-kill", storage=url).trials
    assert sum(t.state == TrialState.FAIL for t in trials) == 4
    assert sum(t.state == TrialState.WAITING for t in trials) == 4  # their copies, queued to run again


def test_population_workers_share_a_postgres_study_with_hyperband(postgres_url: str, study_name: str) -> None:
    """Two population workers on one PostgreSQL study with Hyperband (whose rungs are read from the database while
    members' own trials are read from memory): exactly the budget, unique numbers, every trial finished and told
    with its own reports, and the pruned ones carry their last reported value as Optuna stores it."""
    from hpo.spec import parse_spec as parse

    spec = parse(
        {
            "name": study_name,
            "direction": "maximize",
            "metric": "val_accuracy",
            "objective": {
                "kind": "training",
                "data": {"source": "spirals", "n_train": 400, "n_val": 100, "seed": 0},
                "model": {"kind": "mlp", "layers": [10]},
                "loss": "mse",
                "defaults": {"epochs": 6},
            },
            "space": {
                "lr": {"type": "float", "low": 1e-4, "high": 1.0, "log": True},
                "batch_size": {"type": "int", "low": 16, "high": 128, "log": True},
                "optimizer": {"choices": ["sgd", "adam"]},
            },
            "sampler": {"name": "tpe", "seed": 0, "kwargs": {"n_startup_trials": 5, "constant_liar": True}},
            "pruner": {"name": "hyperband", "kwargs": {"min_resource": 1, "max_resource": 6}},
            "budget": {"n_trials": 30},
        }
    )
    results: list[Any] = []

    def work() -> None:
        opts = WorkerOptions(threads=1, population=6, handle_signals=False)
        results.append(run_worker(spec, postgres_url, opts))

    import threading

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=ceiling(240))
    assert len(results) == 2 and sum(r.ran for r in results) == 30
    trials = optuna.load_study(study_name=study_name, storage=postgres_url).trials
    assert len(trials) == 30 and sorted(t.number for t in trials) == list(range(30))
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, "Hyperband prunes some of 30 trials over lr 1e-4..1"
    for t in trials:
        assert t.intermediate_values and t.user_attrs["population"] == 6
        assert t.value == t.intermediate_values[max(t.intermediate_values)]
