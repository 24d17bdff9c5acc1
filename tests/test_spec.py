"""Study files: valid ones load; every kind of bad file is one line naming the file and the field, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hpo.errors import SpecError
from hpo.spec import ChoiceParam, FixedParam, FloatParam, IntParam, load_spec, parse_spec

from .conftest import STUDIES, hpo_cli, write_study


@pytest.mark.parametrize("path", sorted(STUDIES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_study_files_validate(path: Path) -> None:
    spec = load_spec(path)
    assert spec.name and spec.objective.kind in ("training", "grokking")
    assert spec.budget.n_trials or spec.budget.timeout


def test_the_lesson_space_is_expressible() -> None:
    spec = load_spec(STUDIES / "spirals-optimizer.yaml")
    bs, lr, opt = spec.space["batch_size"], spec.space["lr"], spec.space["optimizer"]
    assert isinstance(bs, IntParam) and (bs.low, bs.high, bs.log) == (16, 1024, True)
    assert isinstance(lr, FloatParam) and (lr.low, lr.high, lr.log) == (0.001, 10, True)
    assert isinstance(opt, ChoiceParam) and set(opt.choices) == {"sgd", "sgd_momentum", "adam", "adamw", "rmsprop"}
    assert spec.objective.model.layers == [10] and spec.objective.loss == "mse"
    assert [p.claim for p in spec.predictions] == ["optimum_near_edge", "diminishing_returns", "increasing"]


def test_fixed_values_and_list_choices() -> None:
    spec = parse_spec(
        {
            "name": "x",
            "objective": {"kind": "training", "data": {"source": "spirals"}},
            "space": {"lr": 0.1, "momentum": {"value": 0.9}, "layers": {"choices": [[10], [64, 64]]}},
        }
    )
    assert spec.space["lr"] == 0.1
    assert isinstance(spec.space["momentum"], FixedParam)
    assert spec.space["layers"].choices == [[10], [64, 64]]


BASE = {"name": "bad", "objective": {"kind": "training", "data": {"source": "spirals"}}}
TRAIN = BASE["objective"]

BAD_FILES = {
    "unknown key": ({"spaec": {}}, "bad.yaml: spaec: unknown key"),
    "wrong type": ({"budget": {"n_trials": "many"}}, "bad.yaml: budget.n_trials:"),
    "low above high": (
        {"space": {"lr": {"type": "float", "low": 2, "high": 1}}},
        "space.lr: low (2.0) must be <= high",
    ),
    "log with low 0": (
        {"space": {"lr": {"type": "float", "low": 0, "high": 1, "log": True}}},
        "bad.yaml: space.lr.low: must be > 0 for a log scale",
    ),
    "unknown sampler": ({"sampler": {"name": "bayes"}}, "sampler.name:"),
    "unknown pruner": ({"pruner": {"name": "nope"}}, "pruner.name:"),
    "unknown optimizer": (
        {"space": {"optimizer": {"choices": ["sgd", "lion"]}}},
        "space.optimizer: unknown optimizer 'lion'",
    ),
    "unknown data source": (
        {"objective": {**TRAIN, "data": {"source": "cifar"}}},
        "objective.data: unknown source 'cifar'",
    ),
    "unknown model": ({"objective": {**TRAIN, "model": {"kind": "resnet"}}}, "objective.model.kind:"),
    "unknown loss": ({"objective": {**TRAIN, "loss": "hinge"}}, "objective.loss:"),
    "unknown objective kind": ({"objective": {"kind": "bogus"}}, "objective: kind must be"),
    "range without type": ({"space": {"lr": {"low": 1, "high": 2}}}, "space.lr: must be a value"),
    "condition on a missing parameter": (
        {"space": {"m": {"type": "float", "low": 0, "high": 1, "when": {"optimizer": ["sgd"]}}}},
        "space.m.when: refers to 'optimizer'",
    ),
    "out-of-range value": ({"objective": {**TRAIN, "defaults": {"lr": -1}}}, "objective.defaults.lr:"),
}


@pytest.mark.parametrize("case", list(BAD_FILES), ids=list(BAD_FILES))
def test_bad_study_file_is_one_line_naming_the_field(case: str, tmp_path: Path) -> None:
    change, expected = BAD_FILES[case]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**BASE, **change}))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)
    # the same through the real CLI: one line on stderr, exit 2, no traceback
    res = hpo_cli("run", str(path), "--storage", f"sqlite:///{tmp_path / 'x.db'}")
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().count("\n") == 0 and expected in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_missing_file_and_yaml_syntax_error(tmp_path: Path) -> None:
    res = hpo_cli("run", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2 and "nope.yaml: no such study file" in res.stderr
    bad = tmp_path / "syntax.yaml"
    bad.write_text("name: x\nspace:\n  lr: {type: float, low: 1\n")
    res = hpo_cli("run", str(bad))
    assert res.returncode == 2 and "YAML syntax error at line" in res.stderr
    assert "Traceback" not in res.stderr


def test_objective_function_that_does_not_import(tmp_path: Path) -> None:
    path = write_study(tmp_path / "s.yaml", "custom-bad", objective={"kind": "no_such_module_xyz:train"})
    res = hpo_cli("run", str(path), "--storage", f"sqlite:///{tmp_path / 'x.db'}")
    assert res.returncode == 2
    assert "objective.kind: cannot import 'no_such_module_xyz'" in res.stderr
    assert "Traceback" not in res.stderr
