"""hpo's default search strategy (hpo.auto_sampler): the default, seeded, resumable, recorded on the study, cheap."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest

from hpo.auto_sampler import DECISION_ATTR, STRATEGY_ATTR, AutoSampler
from hpo.samplers import make_sampler, seed_per_trial
from hpo.spec import parse_spec

from .conftest import hpo_cli, write_study
from .timing import ceiling

SPACE = {
    "lr": {"type": "float", "low": 0.001, "high": 1.0, "log": True},
    "momentum": {"type": "float", "low": 0.0, "high": 0.99},
}
# 4 random trials, the GP up to trial 8, multivariate TPE after: every phase in 12 trials
AUTO = {"seed": 0, "kwargs": {"n_startup_trials": 4, "gp_trials": 8}}
BARE = {"name": "x", "direction": "minimize", "objective": {"kind": "tests.fast_objectives:quadratic"}, "space": SPACE}
STRATEGY = "random for 4 trials, GP to trial 8, then multivariate TPE"


def _file(tmp_path: Path, name: str) -> Path:
    return write_study(
        tmp_path / f"{name}.yaml",
        "auto-draws",
        objective={"kind": "tests.fast_objectives:quadratic", "steps": 1},
        space=SPACE,
        sampler=AUTO,  # no name: the default
        budget={"n_trials": 12},
        pruner={"name": "none"},
    )


def _system_attrs(study: optuna.Study) -> dict:
    return study._storage.get_study_system_attrs(study._study_id)


def test_a_study_file_without_a_sampler_gets_auto() -> None:
    spec = parse_spec(BARE)
    assert spec.sampler.name == "auto"
    assert isinstance(make_sampler(spec), AutoSampler)
    named = parse_spec({**BARE, "sampler": {"name": "auto", "seed": 1}})
    assert isinstance(make_sampler(named), AutoSampler)


def test_auto_kwargs_are_checked() -> None:
    from hpo.errors import SpecError

    bad = parse_spec({**BARE, "sampler": {"kwargs": {"gp_trial": 3}}})
    with pytest.raises(SpecError, match="sampler.kwargs"):
        make_sampler(bad)


@pytest.mark.slow
def test_the_default_is_seeded_resumable_and_recorded(tmp_path: Path) -> None:
    """A run resumed draws what one run straight through draws, through the random, GP and TPE phases;
    the strategy is stored on the study and named by ``hpo studies``."""

    def draws(name: str, *runs: list[str]) -> tuple[list[tuple[float, float]], optuna.Study]:
        url = f"sqlite:///{tmp_path / f'{name}.db'}"
        for args in runs:
            res = hpo_cli("run", str(_file(tmp_path, name)), "--storage", url, *args)
            assert res.returncode == 0, res.stderr
        study = optuna.load_study(study_name="auto-draws", storage=url)
        return [(t.params["lr"], t.params["momentum"]) for t in study.trials], study

    resumed, _ = draws("resumed", ["--n-trials", "6"], [])  # stopped inside the GP phase, resumed
    straight, study = draws("straight", [])
    assert len(straight) == 12 and len(set(straight)) == 12, straight
    assert resumed == straight
    assert study.user_attrs[STRATEGY_ATTR] == STRATEGY
    assert study.user_attrs["sampler"]["name"] == "auto"
    assert _system_attrs(study)[DECISION_ATTR]["gp_until"] == 8
    listed = hpo_cli("studies", "--storage", f"sqlite:///{tmp_path / 'straight.db'}", "-f", "json")
    assert listed.returncode == 0, listed.stderr
    assert STRATEGY in listed.stdout
    page = tmp_path / "report.html"
    made = hpo_cli("report", "auto-draws", "--storage", f"sqlite:///{tmp_path / 'straight.db'}", "-o", str(page))
    assert made.returncode == 0, made.stderr
    assert f"Search: {STRATEGY}" in page.read_text()


def test_two_workers_draw_what_one_draws(tmp_path: Path) -> None:
    """Two workers (each its own sampler, as two processes have) asking in turn draw what one worker draws, given
    the same completion order: the GP's fitted state is not carried from one trial to the next."""
    spec = parse_spec({**BARE, "name": "two", "sampler": AUTO})

    def run(name: str, n_workers: int) -> list[tuple[float, float]]:
        url = f"sqlite:///{tmp_path / f'{name}.db'}"
        studies = [
            optuna.create_study(study_name="two", storage=url, sampler=make_sampler(spec), load_if_exists=True)
            for _ in range(n_workers)
        ]
        for i in range(12):
            study = studies[i % n_workers]
            trial = study.ask()
            lr, m = trial.suggest_float("lr", 0.001, 1.0, log=True), trial.suggest_float("momentum", 0.0, 0.99)
            study.tell(trial, (lr - 0.03) ** 2 + (m - 0.9) ** 2)
        return [(t.params["lr"], t.params["momentum"]) for t in studies[0].trials]

    one = run("one", 1)
    assert run("pair", 2) == one
    assert len(set(one)) == 12


def _cheap(trial: optuna.Trial) -> float:
    return (trial.suggest_float("x", -5, 5) - 1) ** 2 + trial.suggest_float("y", -5, 5) ** 2


def test_cheap_trials_get_tpe_expensive_ones_the_gp_while_it_pays() -> None:
    """Trials far shorter than ``gp_min_trial_s``: TPE once the startup trials are done. With every trial counted
    as expensive enough (``gp_min_trial_s: 0``), the GP draws; its first draw takes more than 5 % of these
    sub-millisecond trials, so the GP phase ends at the next trial, and that is stored."""
    cheap = optuna.create_study(sampler=AutoSampler(seed=0, n_startup_trials=3))
    cheap.optimize(_cheap, n_trials=6)
    decided = _system_attrs(cheap)[DECISION_ATTR]
    assert decided["gp_until"] == 0 and decided["decided_at"] == 3
    assert cheap.user_attrs[STRATEGY_ATTR] == "random for 3 trials, then multivariate TPE"

    costly = optuna.create_study(sampler=AutoSampler(seed=0, n_startup_trials=3, gp_min_trial_s=0.0))
    costly.optimize(_cheap, n_trials=6)
    decided = _system_attrs(costly)[DECISION_ATTR]
    assert decided["decided_at"] == 3 and decided["gp_until"] == 4 and decided["switched"]
    assert costly.user_attrs[STRATEGY_ATTR] == "random for 3 trials, GP to trial 4, then multivariate TPE"


def test_sampler_time_at_1000_trials_within_plain_tpes() -> None:
    """The default's own time over a 1,000-trial study of cheap trials, against plain Optuna TPE's measured side by
    side (the two studies ask in turn, so both see the same load): no more over the study than 1.5x (the GP is not
    used for cheap trials; TPE's grouping costs a little), and at the last 100 trials, where TPE reads 1,000 trials
    and the default its bounded window of 250, no more than TPE. The budget in milliseconds is measured in
    benchmarks/sampler_efficiency.py --cost, not here."""
    n = 1000
    samplers = {"auto": AutoSampler(seed=0), "tpe": optuna.samplers.TPESampler(seed=0)}
    studies, took = {}, {name: [] for name in samplers}
    for name, sampler in samplers.items():
        seed_per_trial(sampler, 0)
        studies[name] = optuna.create_study(sampler=sampler)
    for _ in range(n):
        for name, study in studies.items():
            start = time.perf_counter()
            trial = study.ask()
            x, y = trial.suggest_float("x", -5, 5), trial.suggest_float("y", -5, 5)
            took[name].append(time.perf_counter() - start)
            study.tell(trial, (x - 1) ** 2 + y**2)
    assert studies["auto"].user_attrs[STRATEGY_ATTR] == "random for 10 trials, then multivariate TPE"
    assert sum(took["auto"]) <= 1.5 * sum(took["tpe"]), (sum(took["auto"]), sum(took["tpe"]))
    assert sum(took["auto"][-100:]) <= sum(took["tpe"][-100:]), (sum(took["auto"][-100:]), sum(took["tpe"][-100:]))


def test_the_sampler_benchmark_runs_quick(tmp_path: Path) -> None:
    """benchmarks/sampler_efficiency.py --quick: every run counted, the table written."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "quick.json"
    res = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "sampler_efficiency.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=ceiling(300),
    )
    assert res.returncode == 0, res.stderr
    got = json.loads(out.read_text())
    assert len(got["runs"]) == 2 * 2 * 2 * 2  # problems x methods x in flight x seeds
    assert {r["method"] for r in got["table"]} == {"tpe", "auto_cheap", "tpe@8", "auto_cheap@8"}
    assert all(1 <= r["trials"] <= 30 for r in got["runs"])
    assert "| sphere_mixed (0.3) | tpe |" in res.stdout
