"""One thread rule for single-trial, population and grokking modes (hpo.threads), and the stored ``threads`` attribute
says what torch ran with. Real ``hpo run`` processes on real (small) training; ``--threads 2`` is the budget given,
so a small model must record 1 and a large one 2."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from hpo.threads import SMALL_WORK, available_cores, budget, default_threads, for_step, use

from .conftest import STUDIES, hpo_cli, write_study
from .test_grokking import grokking_doc


def recorded(url: str, name: str) -> list[object]:
    trials = optuna.load_study(study_name=name, storage=url).trials
    assert trials and all(t.state.is_finished() for t in trials)
    return [t.user_attrs.get("threads") for t in trials]


def test_the_rule() -> None:
    cores = available_cores()
    assert default_threads(1, load=0.0) == cores
    assert default_threads(2, load=0.0) == max(1, cores // 2)
    assert default_threads(1, load=float(cores)) == 1  # every core busy with other work: one thread
    assert default_threads(1, load=4 * cores) == 1
    assert for_step(41, 16, 8) == 1 and for_step(SMALL_WORK, 1, 8) == 8
    assert budget(10_000) == cores and budget(1) == 1  # never above the cores this process may use
    import torch

    before = torch.get_num_threads()
    with use(1) as n:
        assert n == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_single_trial_mode_records_the_threads_used(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 't.db'}"
    small = write_study(tmp_path / "small.yaml", "small", budget={"n_trials": 2})  # the lesson's data, [16] hidden
    res = hpo_cli("run", str(small), "--storage", url, "--threads", "2")
    assert res.returncode == 0, res.stderr
    assert recorded(url, "small") == [1, 1]
    objective = {  # 2 -> 512 -> 512 -> 1 on batches of 128: above SMALL_WORK, so it may use the budget
        "kind": "training",
        "data": {"source": "spirals", "n_train": 256, "n_val": 64, "n_test": 0, "seed": 0},
        "model": {"kind": "mlp", "layers": [512, 512]},
        "loss": "bce",
        "defaults": {"batch_size": 128, "lr": 0.01, "epochs": 1, "optimizer": "adam"},
    }
    assert (2 * 512 + 512 * 512 + 512 + 512 + 513) * 128 >= SMALL_WORK
    large = write_study(tmp_path / "large.yaml", "large", objective=objective, budget={"n_trials": 1})
    res = hpo_cli("run", str(large), "--storage", url, "--threads", "2")
    assert res.returncode == 0, res.stderr
    assert recorded(url, "large") == [min(2, available_cores())]


def test_population_mode_records_one_thread_for_the_lessons_model(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 't.db'}"
    path = tmp_path / "pop.yaml"
    path.write_text(
        (STUDIES / "spirals-optimizer.yaml").read_text().replace("budget: {n_trials: 120}", "budget: {n_trials: 6}")
        + "\n"
    )
    res = hpo_cli(
        "run", str(path), "--storage", url, "--threads", "2", "--population", "6", "--n-trials", "6",
        "--timeout", "120",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    trials = optuna.load_study(study_name="spirals-optimizer", storage=url).trials
    assert {t.user_attrs.get("population") for t in trials} == {6}
    assert recorded(url, "spirals-optimizer") == [1] * len(trials)


@pytest.mark.parametrize(("layers", "batch", "expected"), [([16], 64, 1), ([200, 200], None, 2)])
def test_grokking_records_the_threads_used(tmp_path: Path, layers: list[int], batch: int | None, expected: int) -> None:
    """A small MLP on mini-batches of 64: one thread; the grokking MLP on the full batch (5107 rows): the budget."""
    import yaml

    doc = grokking_doc("grok-threads", model={"kind": "mlp", "layers": layers}, steps=50, eval_every=25)
    doc["objective"]["batch_size"] = batch
    doc["objective"].pop("threads")
    doc["budget"] = {"n_trials": 1}
    doc["space"] = {"lr": {"type": "float", "low": 0.001, "high": 0.01, "log": True}}
    path = tmp_path / "grok.yaml"
    path.write_text(yaml.safe_dump(doc))
    url = f"sqlite:///{tmp_path / 't.db'}"
    res = hpo_cli("run", str(path), "--storage", url, "--threads", "2")
    assert res.returncode == 0, res.stderr
    assert recorded(url, "grok-threads") == [min(expected, available_cores())]
