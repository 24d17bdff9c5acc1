"""The training objective on real data, run through real studies."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from hpo import data as data_sources
from hpo.errors import DataError
from hpo.spec import load_spec, parse_spec
from hpo.worker import WorkerOptions, replay, run_worker

from .conftest import STUDIES, hpo_cli, write_study

FAST = WorkerOptions(heartbeat_interval=None, threads=1, handle_signals=False)


def _study(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


def test_spirals_match_the_lesson() -> None:
    spec = load_spec(STUDIES / "spirals-optimizer.yaml")
    s = data_sources.load(spec.objective.data)
    assert (len(s.y_train), len(s.y_val), len(s.y_test)) == (4000, 1000, 1000)
    assert s.x_train.shape == (4000, 2) and s.n_classes == 2
    # first half label 0, second half label 1 and negated; radius grows with phi in [1, 15]
    assert (s.y_train[:2000] == 0).all() and (s.y_train[2000:] == 1).all()
    r = np.linalg.norm(s.x_train, axis=1)
    assert r.min() < 3 and 14 < r.max() < 18
    # seeded: the same spec gives the same points, another seed other points
    other = parse_spec({"name": "x", "objective": {"kind": "training", "data": {"source": "spirals", "seed": 1}}})
    assert not np.allclose(data_sources.load(other.objective.data).x_train, s.x_train)


def test_lesson_model_reports_every_epoch(tmp_path: Path, sqlite_url: str) -> None:
    path = write_study(
        tmp_path / "s.yaml",
        "lesson",
        objective={
            "kind": "training",
            "data": {"source": "spirals", "n_train": 1000, "n_val": 500, "seed": 0},
            "model": {"kind": "mlp", "layers": [10]},
            "loss": "mse",
        },
        space={"batch_size": 16, "lr": 0.01, "epochs": 4, "optimizer": "sgd"},
        budget={"n_trials": 1},
    )
    run_worker(load_spec(path), sqlite_url, FAST)
    (t,) = _study(sqlite_url, "lesson").trials
    assert t.state == TrialState.COMPLETE
    assert sorted(t.intermediate_values) == [1, 2, 3, 4]
    assert all(0.0 <= v <= 1.0 for v in t.intermediate_values.values())
    assert len(t.user_attrs["train_loss"]) == 4 and t.user_attrs["epochs_reached"] == 4
    assert t.value == t.intermediate_values[4]


def test_diverging_run_is_pruned_with_its_reason(tmp_path: Path, sqlite_url: str) -> None:
    path = write_study(
        tmp_path / "s.yaml",
        "diverge",
        space={"lr": 10.0, "optimizer": "sgd", "batch_size": 16, "epochs": 3},
        budget={"n_trials": 2},
    )
    result = run_worker(load_spec(path), sqlite_url, FAST)
    assert result.pruned == 2 and result.failed == 0  # the worker carried on after the first
    for t in _study(sqlite_url, "diverge").trials:
        assert t.state == TrialState.PRUNED
        assert t.user_attrs["reason"] == "diverged" and t.user_attrs["diverged_epoch"] == 1


def test_pruning_stops_trials_early(tmp_path: Path, sqlite_url: str) -> None:
    path = write_study(
        tmp_path / "s.yaml",
        "prune",
        space={"lr": {"type": "float", "low": 0.00001, "high": 0.1, "log": True}, "epochs": 8},
        enqueue=[{"lr": 0.05}, {"lr": 0.03}, {"lr": 0.02}],
        sampler={"name": "random", "seed": 1},
        pruner={"name": "median", "kwargs": {"n_startup_trials": 3, "n_warmup_steps": 1}},
        budget={"n_trials": 12},
    )
    run_worker(load_spec(path), sqlite_url, FAST)
    trials = _study(sqlite_url, "prune").trials
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, "a median pruner over lr down to 1e-5 prunes the slow learners"
    for t in pruned:
        assert t.user_attrs["reason"] == "pruned"
        assert len(t.intermediate_values) < 8 and t.user_attrs["epochs_reached"] < 8


def test_rerun_with_stored_seed_reproduces_the_metric(tmp_path: Path, sqlite_url: str) -> None:
    path = write_study(tmp_path / "s.yaml", "seeded", budget={"n_trials": 3})
    spec = load_spec(path)
    run_worker(spec, sqlite_url, FAST)
    trials = _study(sqlite_url, "seeded").trials
    assert len({t.user_attrs["seed"] for t in trials}) == 3
    for t in trials:
        assert replay(spec, t) == t.value


def test_run_resumes_towards_the_budget(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    path = write_study(tmp_path / "s.yaml", "resume", budget={"n_trials": 3})
    res = hpo_cli("run", str(path), "--storage", url, "--n-trials", "2")
    assert res.returncode == 0, res.stderr
    assert len(_study(url, "resume").trials) == 2
    res = hpo_cli("run", str(path), "--storage", url)
    assert res.returncode == 0, res.stderr
    trials = _study(url, "resume").trials
    assert len(trials) == 3 and [t.number for t in trials] == [0, 1, 2]
    assert "best trial #" in res.stdout and "hpo trials resume" in res.stdout
    res = hpo_cli("run", str(path), "--storage", url)  # budget met: nothing new
    assert res.returncode == 0 and len(_study(url, "resume").trials) == 3


def test_a_resumed_seeded_sampler_draws_new_points(tmp_path: Path) -> None:
    """TPE seed 0, --n-trials 3 then a resumed run: trials 3-5 repeated trials 0-2 exactly (the sampler started
    over). Each trial is now drawn from the seed and its number: a run resumed three times draws what one run
    straight through draws, point for point, and two workers draw no point twice."""

    def study_file(name: str) -> Path:
        return write_study(
            tmp_path / f"{name}.yaml",
            "resume-draws",
            objective={"kind": "tests.fast_objectives:quadratic", "steps": 1},
            space={"lr": {"type": "float", "low": 0.001, "high": 1.0, "log": True}},
            sampler={"name": "tpe", "seed": 0, "kwargs": {"n_startup_trials": 4}},
            budget={"n_trials": 12},
        )

    def draws(name: str, *runs: list[str]) -> list[float]:
        url = f"sqlite:///{tmp_path / f'{name}.db'}"
        for args in runs:
            res = hpo_cli("run", str(study_file(name)), "--storage", url, *args)
            assert res.returncode == 0, res.stderr
        return [t.params["lr"] for t in _study(url, "resume-draws").trials]

    resumed = draws("resumed", ["--n-trials", "3"], ["--n-trials", "6"], ["--n-trials", "9"], [])
    straight = draws("straight", [])
    assert len(resumed) == 12 and len(set(resumed)) == 12, resumed
    assert resumed == straight  # TPE's model past trial 4 included: the same history gives the same draws
    two = draws("two", ["--workers", "2"])
    assert len(two) == 12 and len(set(two)) == 12, two
    assert two[:4] == straight[:4]  # the 4 startup trials are random: the same points whichever worker draws them


SAMPLERS = ["auto", "tpe", "random", "grid", "cmaes", "qmc", "gp", "nsga2"]
PRUNERS = [
    ("none", {}),
    ("median", {}),
    ("percentile", {"percentile": 50.0}),
    ("successive_halving", {}),
    ("hyperband", {"max_resource": 3}),
    ("wilcoxon", {}),
    ("threshold", {"lower": 0.4}),
    ("patient", {"patience": 1, "wrapped": {"name": "median"}}),
]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs_a_short_study(sampler: str, tmp_path: Path, sqlite_url: str) -> None:
    space = {
        "lr": {"type": "float", "low": 0.001, "high": 0.1, "log": True, "grid": [0.001, 0.01]},
        "batch_size": {"type": "int", "low": 16, "high": 128, "log": True, "grid": [32, 128]},
    }
    path = write_study(
        tmp_path / "s.yaml", f"s-{sampler}", space=space, sampler={"name": sampler, "seed": 3}, budget={"n_trials": 4}
    )
    result = run_worker(load_spec(path), sqlite_url, FAST)
    trials = _study(sqlite_url, f"s-{sampler}").trials
    assert result.complete == 4 and len(trials) == 4
    if sampler == "grid":
        assert {(t.params["lr"], t.params["batch_size"]) for t in trials} == {
            (a, b) for a in (0.001, 0.01) for b in (32, 128)
        }


@pytest.mark.parametrize("pruner,kwargs", PRUNERS, ids=[p for p, _ in PRUNERS])
def test_every_pruner_runs_a_short_study(pruner: str, kwargs: dict, tmp_path: Path, sqlite_url: str) -> None:
    path = write_study(
        tmp_path / "s.yaml", f"p-{pruner}", pruner={"name": pruner, "kwargs": kwargs}, budget={"n_trials": 4}
    )
    result = run_worker(load_spec(path), sqlite_url, FAST)
    assert result.ran == 4 and result.failed == 0
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in _study(sqlite_url, f"p-{pruner}").trials)


def test_sampler_seed_is_honoured(tmp_path: Path) -> None:
    def params(i: int) -> list[float]:
        url = f"sqlite:///{tmp_path / f'{i}.db'}"
        path = write_study(
            tmp_path / f"{i}.yaml", "seed", sampler={"name": "random", "seed": 7}, budget={"n_trials": 3}
        )
        run_worker(load_spec(path), url, FAST)
        return [t.params["lr"] for t in _study(url, "seed").trials]

    assert params(1) == params(2)


def test_conditional_parameter_exists_only_with_its_condition(tmp_path: Path, sqlite_url: str) -> None:
    space = {
        "optimizer": {"choices": ["sgd", "sgd_momentum"]},
        "momentum": {"type": "float", "low": 0.5, "high": 0.99, "when": {"optimizer": ["sgd_momentum"]}},
        "layers": {"choices": [[8], [8, 8]]},
    }
    path = write_study(
        tmp_path / "s.yaml", "cond", space=space, sampler={"name": "random", "seed": 0}, budget={"n_trials": 8}
    )
    run_worker(load_spec(path), sqlite_url, FAST)
    trials = _study(sqlite_url, "cond").trials
    assert {t.params["optimizer"] for t in trials} == {"sgd", "sgd_momentum"}
    for t in trials:
        assert ("momentum" in t.params) == (t.params["optimizer"] == "sgd_momentum")
        assert t.params["layers"] in ("[8]", "[8, 8]")


def test_users_own_objective(tmp_path: Path, sqlite_url: str) -> None:
    path = write_study(
        tmp_path / "s.yaml",
        "custom",
        objective={"kind": "tests.fast_objectives:quadratic", "steps": 2},
        budget={"n_trials": 3},
    )
    run_worker(load_spec(path), sqlite_url, FAST)
    trials = _study(sqlite_url, "custom").trials
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    assert all(len(t.intermediate_values) == 2 for t in trials)


@pytest.mark.parametrize(
    "source,model", [("digits", {"kind": "mlp", "layers": [32]}), ("mnist1d", {"kind": "cnn", "channels": [16, 16]})]
)
def test_other_sources_train(source: str, model: dict, tmp_path: Path, sqlite_url: str) -> None:
    data = {"source": source, "seed": 0} if source == "digits" else {"source": source, "num_samples": 1000, "seed": 0}
    path = write_study(
        tmp_path / "s.yaml",
        source,
        objective={
            "kind": "training",
            "data": data,
            "model": model,
            "loss": "cross_entropy",
            "defaults": {"epochs": 5, "optimizer": "adam", "batch_size": 32, "lr": 0.01},
        },
        space={},
        budget={"n_trials": 1},
    )
    run_worker(load_spec(path), sqlite_url, FAST)
    (t,) = _study(sqlite_url, source).trials
    assert t.state == TrialState.COMPLETE and t.value > 0.25  # 10 classes: chance is 0.1


def _write_idx(folder: Path, n: int = 60, corrupt: bool = False) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir()
    for prefix in ("train", "t10k"):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = (rng.random((n, 28, 28)) * 50).astype(np.uint8)
        images[np.arange(n), labels * 2, :] = 255  # a row that encodes the label: learnable
        img = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28)) + images.tobytes()
        lab = bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + labels.tobytes()
        if corrupt and prefix == "train":
            img = img[:-100]
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(img))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(lab)


def test_idx_files_from_a_local_folder(tmp_path: Path, sqlite_url: str) -> None:
    _write_idx(tmp_path / "mnist", n=200)
    path = write_study(
        tmp_path / "s.yaml",
        "idx",
        objective={
            "kind": "training",
            "data": {"source": "idx", "path": str(tmp_path / "mnist")},
            "model": {"kind": "cnn", "channels": [4]},
            "loss": "cross_entropy",
            "defaults": {"epochs": 2, "batch_size": 32, "optimizer": "adam", "lr": 0.01},
            "evaluate_test": True,
        },
        space={},
        budget={"n_trials": 1},
    )
    spec = load_spec(path)
    s = data_sources.load(spec.objective.data)
    assert s.x_train.shape[1:] == (1, 28, 28) and len(s.y_test) == 200 and s.x_train.max() <= 1.0
    run_worker(spec, sqlite_url, FAST)
    (t,) = _study(sqlite_url, "idx").trials
    assert t.state == TrialState.COMPLETE and 0.0 <= t.user_attrs["test_accuracy"] <= 1.0


def test_missing_or_corrupt_idx_is_one_line(tmp_path: Path) -> None:
    _write_idx(tmp_path / "bad", corrupt=True)
    spec = parse_spec(
        {"name": "x", "objective": {"kind": "training", "data": {"source": "idx", "path": str(tmp_path / "bad")}}}
    )
    with pytest.raises(DataError, match="corrupt IDX file"):
        data_sources.load(spec.objective.data)
    for folder, message in ((tmp_path / "absent", "no such folder"), (tmp_path / "bad", "corrupt IDX file")):
        path = write_study(
            tmp_path / "s.yaml",
            "idx-bad",
            objective={"kind": "training", "data": {"source": "idx", "path": str(folder)}, "model": {"kind": "cnn"}},
        )
        res = hpo_cli("run", str(path), "--storage", f"sqlite:///{tmp_path / 'x.db'}")
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr


def test_evaluate_reproduces_and_stores_test_accuracy(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'e.db'}"
    path = write_study(tmp_path / "s.yaml", "evaluate", budget={"n_trials": 2})
    assert hpo_cli("run", str(path), "--storage", url).returncode == 0
    res = hpo_cli("evaluate", "evaluate", "--storage", url)
    assert res.returncode == 0, res.stderr
    assert "reproduced" in res.stdout
    record = _study(url, "evaluate").user_attrs["test_evaluation"]
    assert record["reproduced"] is True and 0.0 <= record["test_accuracy"] <= 1.0


@pytest.mark.slow(seconds=30)
def test_capable_architecture_reaches_095(tmp_path: Path) -> None:
    """The shipped architecture study, on a reduced budget, finds >= 0.95 validation accuracy."""
    url = f"sqlite:///{tmp_path / 'a.db'}"
    res = hpo_cli(
        "run",
        str(STUDIES / "spirals-architecture.yaml"),
        "--storage",
        url,
        "--n-trials",
        "20",
        "--workers",
        "2",
        timeout=900,  # hpo_cli scales it
    )
    assert res.returncode == 0, res.stderr
    assert _study(url, "spirals-architecture").best_value >= 0.95


def test_enqueued_baseline_with_list_values_runs_first(tmp_path: Path, sqlite_url: str) -> None:
    space = {"layers": {"choices": [[8], [16, 16]]}, "lr": {"type": "float", "low": 0.001, "high": 0.1, "log": True}}
    path = write_study(
        tmp_path / "s.yaml", "enq", space=space, enqueue=[{"layers": [16, 16], "lr": 0.01}], budget={"n_trials": 2}
    )
    run_worker(load_spec(path), sqlite_url, FAST)
    first = _study(sqlite_url, "enq").trials[0]
    assert first.state == TrialState.COMPLETE and first.params == {"layers": "[16, 16]", "lr": 0.01}
    assert first.user_attrs["enqueued"] is True
