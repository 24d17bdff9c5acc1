"""Study files: YAML validated by pydantic into a :class:`StudySpec`.

Nothing else in hpo reads YAML. Every error names the file and the field path, on one line::

    studies/x.yaml: space.lr.low: must be > 0 for a log scale
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from hpo.errors import SpecError
from hpo.limits import (
    MAX_CHOICES,
    MAX_DESIGN_TRIALS,
    MAX_FILE_BYTES,
    MAX_GRID_POINTS,
    MAX_PARAMS,
    MAX_POPULATION,
    MAX_YAML_NODES,
)
from hpo.user_code import REFERENCE

Scalar = Union[bool, int, float, str]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- search space


class IntParam(_Strict):
    """An integer range, optionally on a log scale: ``{type: int, low: 16, high: 1024, log: true}``."""

    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = 1
    when: dict[str, list[Scalar]] | None = None
    grid: list[int] | None = None

    @model_validator(mode="after")
    def _check(self) -> IntParam:
        _check_range(self.low, self.high, self.log)
        if self.step < 1:
            raise ValueError("step: must be >= 1")
        if self.log and self.step != 1:
            raise ValueError("step: must be 1 on a log scale")
        return self


class FloatParam(_Strict):
    """A float range: ``{type: float, low: 0.001, high: 10, log: true}``."""

    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = None
    when: dict[str, list[Scalar]] | None = None
    grid: list[float] | None = None

    @model_validator(mode="after")
    def _check(self) -> FloatParam:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError("low and high must be finite")
        _check_range(self.low, self.high, self.log)
        if self.step is not None and (self.step <= 0 or self.log):
            raise ValueError("step: must be > 0 and only on a linear scale")
        return self


class ChoiceParam(_Strict):
    """A categorical: ``{choices: [sgd, adam]}``. Lists are allowed as choices (``[[10], [64, 64]]``)."""

    choices: list[Scalar | list[Scalar]] = Field(min_length=1, max_length=MAX_CHOICES)
    when: dict[str, list[Scalar]] | None = None

    @field_validator("choices")
    @classmethod
    def _distinct(cls, v: list[Any]) -> list[Any]:
        keys = [repr(c) for c in v]
        if len(set(keys)) != len(keys):
            raise ValueError("choices must be distinct")
        return v


class FixedParam(_Strict):
    """A fixed value that still appears as a parameter: ``{value: 0.9}`` (or just ``0.9``)."""

    value: Scalar | list[Scalar]
    when: dict[str, list[Scalar]] | None = None


def _check_range(low: float, high: float, log: bool) -> None:
    if low > high:
        raise ValueError(f"low ({low}) must be <= high ({high})")
    if log and low <= 0:
        raise ValueError("low: must be > 0 for a log scale")


_PARAM_TAGS: dict[type, str] = {}


def _param_tag(v: Any) -> str:
    if isinstance(v, BaseModel):
        return _PARAM_TAGS[type(v)]
    if isinstance(v, dict):
        if "choices" in v:
            return "choices"
        if "value" in v:
            return "fixed"
        return str(v.get("type", "missing-type"))
    return "scalar"


_PARAM_TAGS.update({IntParam: "int", FloatParam: "float", ChoiceParam: "choices", FixedParam: "fixed"})

ParamSpec = Annotated[
    Annotated[IntParam, Tag("int")]
    | Annotated[FloatParam, Tag("float")]
    | Annotated[ChoiceParam, Tag("choices")]
    | Annotated[FixedParam, Tag("fixed")]
    | Annotated[Scalar, Tag("scalar")],
    Discriminator(
        _param_tag,
        custom_error_type="param",
        custom_error_message="must be a value, {choices: [...]}, {value: ...} or {type: int|float, low, high}",
    ),
]


# --------------------------------------------------------------------------- data


class SpiralsData(_Strict):
    """Two interlaced spirals, exactly as the lesson draws them (see docs/lesson.md)."""

    source: Literal["spirals"]
    n_train: int = Field(4000, ge=2)
    n_val: int = Field(1000, ge=2)
    n_test: int = Field(1000, ge=0)
    noise: float = Field(0.4, ge=0)
    seed: int = 0


class DigitsData(_Strict):
    """scikit-learn's 8x8 digits (ships with scikit-learn), split train / val / test."""

    source: Literal["digits"]
    val_fraction: float = Field(0.2, gt=0, lt=1)
    test_fraction: float = Field(0.2, ge=0, lt=1)
    images: bool = False
    seed: int = 0


class Mnist1dData(_Strict):
    """MNIST-1D generated locally with ``mnist1d.data.make_dataset`` (never downloaded)."""

    source: Literal["mnist1d"]
    num_samples: int = Field(5000, ge=100)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    test_fraction: float = Field(0.2, ge=0, lt=1)
    seed: int = 0


class IdxData(_Strict):
    """MNIST-format IDX files (raw or .gz) read from a local folder."""

    source: Literal["idx"]
    path: str
    val_fraction: float = Field(1 / 6, gt=0, lt=1)
    limit: int | None = Field(None, ge=10)
    seed: int = 0


class ModularData(_Strict):
    """(a op b) mod p for grokking."""

    source: Literal["modular"]
    p: int = Field(113, ge=2)
    op: Literal["+", "-", "*", "/"] = "+"
    train_fraction: float = 0.4
    seed: int = 0

    @field_validator("train_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError(f"must be in (0, 1) (got {v})")
        return v

    @model_validator(mode="after")
    def _prime_for_division(self) -> ModularData:
        if self.op == "/" and not _is_prime(self.p):
            raise ValueError(f"p: must be prime for division (got {self.p})")
        return self


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % k for k in range(2, int(n**0.5) + 1))


DataSpec = Annotated[
    SpiralsData | DigitsData | Mnist1dData | IdxData | ModularData,
    Field(discriminator="source"),
]


# --------------------------------------------------------------------------- model and objective


class ModelSpec(_Strict):
    """``mlp`` (hidden ``layers``, ``activation``) or a small ``cnn`` (``channels``) for 1-D or 2-D inputs."""

    kind: Literal["mlp", "cnn", "transformer"] = "mlp"
    layers: list[int] = Field(default_factory=lambda: [10])
    activation: Literal["relu", "tanh", "sigmoid", "gelu"] = "relu"
    channels: list[int] = Field(default_factory=lambda: [16, 32])
    # transformer (grokking)
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    n_layers: int = 1

    @field_validator("layers", "channels")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(n < 1 for n in v):
            raise ValueError("sizes must be >= 1")
        return v


Optimizer = Literal["sgd", "sgd_momentum", "adam", "adamw", "rmsprop"]
OPTIMIZERS: tuple[str, ...] = ("sgd", "sgd_momentum", "adam", "adamw", "rmsprop")


class TrainDefaults(_Strict):
    """The values a trial uses for whatever the search space does not set (the lesson's defaults)."""

    batch_size: int = Field(16, ge=1)
    lr: float = Field(0.01, gt=0)
    epochs: int = Field(10, ge=1)
    optimizer: Optimizer = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)


class CheckpointSpec(_Strict):
    """Preemption-safe trials (``hpo.objectives.checkpoints``): where and how often a training or grokking trial saves
    its state."""

    #: Save at the end of every ``every_epochs``-th epoch; with ``every_steps`` also every that many steps.
    every_epochs: int = Field(1, ge=1)
    every_steps: int | None = Field(None, ge=1)
    #: Optuna artifact store: ``filesystem`` (a folder every worker sees), ``boto3`` (S3 or compatible), ``gcs``.
    store: Literal["filesystem", "boto3", "gcs"] = "filesystem"
    #: The folder (filesystem; ``HPO_CHECKPOINT_DIR`` overrides it) or the bucket (boto3, gcs).
    path: str = "hpo-checkpoints"
    #: Keep the last checkpoint of a finished trial (default: delete it when the trial completes or is pruned).
    keep: bool = False


class TrainingObjective(_Strict):
    """The generic supervised loop: data, model, loss; per-epoch validation reported to the trial."""

    kind: Literal["training"]
    data: DataSpec
    model: ModelSpec = Field(default_factory=ModelSpec)
    loss: Literal["mse", "bce", "cross_entropy"] = "cross_entropy"
    defaults: TrainDefaults = Field(default_factory=TrainDefaults)
    seed: int = 0
    threads: int | None = Field(None, ge=1)
    device: str = "cpu"
    evaluate_test: bool = False
    checkpoint: CheckpointSpec | None = None


class GrokkingObjective(_Strict):
    """Modular arithmetic; the metric is the number of steps until validation accuracy reaches ``threshold``."""

    kind: Literal["grokking"]
    data: ModularData = Field(default_factory=lambda: ModularData(source="modular"))
    model: ModelSpec = Field(default_factory=lambda: ModelSpec(layers=[200, 200]))
    steps: int = Field(2000, ge=1)
    eval_every: int = Field(25, ge=1)
    threshold: float = 0.95
    batch_size: int | None = Field(None, ge=1)
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(1.0, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.98, ge=0, lt=1)
    #: Stop a trial once validation accuracy reaches ``threshold``: its metric is known from then on.
    stop_at_threshold: bool = True
    #: Prune a trial (``reason=not_memorised``) whose training accuracy is still below 0.99 at this step.
    memorise_by: int | None = Field(None, ge=1)
    seed: int = 0
    threads: int | None = Field(None, ge=1)
    device: str = "cpu"
    #: Preemption-safe trials: saved every ``every_steps`` steps (default: every evaluation) and when stopped.
    checkpoint: CheckpointSpec | None = None

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint(cls, v: CheckpointSpec | None) -> CheckpointSpec | None:
        if v is not None and v.every_epochs != 1:
            raise ValueError("grokking trials count steps, not epochs: use every_steps")
        return v

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError(f"must be in (0, 1] (got {v})")
        return v


class CustomObjective(BaseModel):
    """A user's own objective: ``kind: package.module:function``; other keys reach it as ``context.options``."""

    model_config = ConfigDict(extra="allow", frozen=True)
    kind: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    seed: int = 0


def _objective_tag(v: Any) -> str:
    if isinstance(v, CustomObjective):
        return "custom"
    kind = v.get("kind") if isinstance(v, dict) else getattr(v, "kind", None)
    if isinstance(kind, str) and ":" in kind:
        return "custom"
    return str(kind)


ObjectiveSpec = Annotated[
    Annotated[TrainingObjective, Tag("training")]
    | Annotated[GrokkingObjective, Tag("grokking")]
    | Annotated[CustomObjective, Tag("custom")],
    Discriminator(
        _objective_tag,
        custom_error_type="objective",
        custom_error_message="kind must be training, grokking or module:function",
    ),
]


# --------------------------------------------------------------------------- sampler, pruner, budget


SAMPLERS: tuple[str, ...] = ("auto", "tpe", "random", "grid", "cmaes", "qmc", "gp", "nsga2", "nsgaii", "nsga3")
PRUNERS: tuple[str, ...] = (
    "none",
    "median",
    "percentile",
    "successive_halving",
    "hyperband",
    "wilcoxon",
    "threshold",
    "patient",
)


#: Sampler keyword arguments that Optuna calls (``constraints_func(trial)``, TPE's ``gamma(n)`` and ``weights(n)``):
#: written ``module:function`` in a study file, imported where the sampler is built, under the trust rules of
#: objectives (:mod:`hpo.trust`).
CALLABLE_KWARGS: tuple[str, ...] = ("constraints_func", "gamma", "weights")


class SamplerSpec(_Strict):
    #: ``auto`` (the default): hpo's strategy, GP while trials are expensive, multivariate TPE otherwise
    #: (:mod:`hpo.auto_sampler`)
    name: Literal["auto", "tpe", "random", "grid", "cmaes", "qmc", "gp", "nsga2", "nsgaii", "nsga3"] = "auto"
    seed: int | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kwargs")
    @classmethod
    def _callables(cls, v: dict[str, Any]) -> dict[str, Any]:
        import re

        for key in CALLABLE_KWARGS:
            if key in v and not (isinstance(v[key], str) and re.match(REFERENCE, v[key])):
                raise ValueError(
                    f"{key}: Optuna calls it, so name a function as module:function (got {_short(v[key])})"
                )
        return v

    def callables(self) -> dict[str, str]:
        """The keyword arguments that name a user's function (``module:function``), by keyword."""
        return {k: self.kwargs[k] for k in CALLABLE_KWARGS if k in self.kwargs}


class PrunerSpec(_Strict):
    name: Literal[
        "none", "median", "percentile", "successive_halving", "hyperband", "wilcoxon", "threshold", "patient"
    ] = "median"
    kwargs: dict[str, Any] = Field(default_factory=dict)


class Budget(_Strict):
    n_trials: int | None = Field(None, ge=1)
    timeout: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _some(self) -> Budget:
        if self.n_trials is None and self.timeout is None:
            raise ValueError("give n_trials, timeout or both")
        return self


class Prediction(_Strict):
    """A learner's prediction about one hyperparameter, checked by ``hpo check``."""

    param: str
    claim: Literal[
        "increasing", "decreasing", "diminishing_returns", "interior_optimum", "optimum_near_edge", "no_effect"
    ]
    #: which end of the range the claim says is better: ``lower`` (``diminishing_returns``: lowering the parameter
    #: keeps improving the result; ``optimum_near_edge``: the optimum lies near the low edge) or ``higher``.
    better: Literal["lower", "higher"] | None = None
    note: str | None = None


def point_key(params: dict[str, Any]) -> str:
    """A design point's identity: its parameters, numbers compared by value (``1`` in a sweep is the baseline's
    ``1.0``, not a second point)."""

    def norm(v: Any) -> Any:
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v

    return repr(sorted((k, norm(v)) for k, v in params.items()))


class SampleSpec(_Strict):
    """A space-filling (scrambled Sobol) sample of ``n`` points over ranges of the space; other entries at baseline."""

    n: int = Field(ge=1, le=MAX_DESIGN_TRIALS)
    params: list[str] = Field(min_length=1)
    seed: int = 0


class DesignSpec(_Strict):
    """A designed experiment (:mod:`hpo.design`), enqueued once when the study is created: one-factor-at-a-time
    ``sweeps`` around the ``baseline``, every point run ``seeds`` times (each trial has its own seed), plus an
    optional space-filling ``sample`` for interactions."""

    baseline: dict[str, Scalar | list[Scalar]]
    sweeps: dict[str, list[Scalar | list[Scalar]]] = Field(default_factory=dict)
    seeds: int = Field(3, ge=1, le=MAX_DESIGN_TRIALS)
    sample: SampleSpec | None = None

    def n_points(self) -> int:
        """Distinct sweep points (the baseline counted once)."""
        points = {point_key(self.baseline)}
        for name, values in self.sweeps.items():
            points |= {point_key({**self.baseline, name: v}) for v in values}
        return len(points)

    def n_trials(self) -> int:
        """Trials the design enqueues: every sweep point ``seeds`` times, plus the sample."""
        return self.n_points() * self.seeds + (self.sample.n if self.sample else 0)


class PopulationSpec(_Strict):
    """Population mode (``hpo.objectives.population``): ``size`` trials trained at once, or ``auto``."""

    size: Any = 1

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int | str:
        if v == "auto":
            return "auto"
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"must be a whole number >= 1 or auto (got {_short(v)})")
        if v > MAX_POPULATION:
            raise ValueError(f"at most {MAX_POPULATION} trials trained at once (got {v})")
        return v


# --------------------------------------------------------------------------- fixed parameters (enqueue)

#: The parameters each built-in objective reads from a trial; a space entry of another name would be sampled and
#: ignored, so it is refused. A user's own objective (``module:function``) may take any names.
KNOWN_PARAMS: dict[str, frozenset[str]] = {
    "training": frozenset(
        "batch_size lr epochs optimizer momentum weight_decay beta1 beta2 layers n_layers units activation channels".split()
    ),
    "grokking": frozenset(
        "train_fraction p op layers width depth batch_size steps lr weight_decay beta1 beta2 activation d_model "
        "n_heads d_mlp".split()
    ),
}


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _short(v: Any) -> str:
    import reprlib

    short = reprlib.Repr()  # keyword arguments only from Python 3.12
    short.maxstring, short.maxother, short.maxlong = 60, 60, 40
    return short.repr(v)


def check_params(space: dict[str, Any], params: Any, own_names: bool = False) -> str | None:
    """Why fixed parameters (an ``enqueue:`` entry, ``hpo enqueue -p``) do not fit ``space``, as
    ``name: reason``; ``None`` when they fit. Checks names, types, ranges and choices; missing names are drawn.

    ``own_names``: a user's objective (``module:function``) suggests parameters of its own; a name outside ``space``
    is handed to its ``trial.suggest_*`` call as Optuna's ``enqueue_trial`` does (a number, string or boolean)."""
    if not isinstance(params, dict):
        return f"{type(params).__name__}: write a mapping of parameter names to values"
    for name, v in params.items():
        p = space.get(name) if isinstance(name, str) else None
        if p is None and own_names and isinstance(name, str) and name not in space:
            if not isinstance(v, bool | int | float | str) or (_is_number(v) and not -1e308 < v < 1e308):
                return f"{name}: give a number, a string or a boolean (got {_short(v)})"
            continue
        if p is None and (not isinstance(name, str) or name not in space):
            return f"{name}: not in the study's space (known: {', '.join(space) or 'none'})"
        if isinstance(p, IntParam | FloatParam):
            whole = isinstance(v, int) or (isinstance(v, float) and v.is_integer())
            if not _is_number(v) or (isinstance(p, IntParam) and not whole):
                kind = "a whole number" if isinstance(p, IntParam) else "a number"
                return f"{name}: must be {kind} (got {_short(v)})"
            if not (-1e308 < v < 1e308) or not p.low <= v <= p.high:  # also NaN and ints too large for a float
                return f"{name}: {_short(v)} is outside the space's range [{p.low}, {p.high}]"
        elif isinstance(p, ChoiceParam):
            if not any(type(v) is type(c) and v == c for c in p.choices) and not any(
                _is_number(v) and _is_number(c) and v == c for c in p.choices
            ):
                return f"{name}: {_short(v)} is not one of the choices {p.choices}"
        else:
            fixed = p.value if isinstance(p, FixedParam) else p
            if v != fixed:
                return f"{name}: fixed at {fixed!r} in the space (got {_short(v)})"
    return None


# --------------------------------------------------------------------------- the study


TRAINING_METRICS: tuple[str, ...] = ("val_accuracy", "val_error", "val_loss", "train_loss")
#: What a training trial cost, reported beside its accuracy; objectives of a multi-objective study (``metrics:``)
#: only: ``train_seconds`` (wall time of the training loop), ``optimizer_steps`` (epochs x ceil(n_train / batch
#: size): what the batch size changes, the same on any machine) and ``samples_seen`` (epochs x n_train).
COMPUTE_METRICS: tuple[str, ...] = ("train_seconds", "optimizer_steps", "samples_seen")
#: Column names of ``hpo trials`` / ``hpo best`` that a metric of a multi-objective study may not take.
RESERVED_COLUMNS: frozenset[str] = frozenset(
    "number state value datetime_start datetime_complete duration epochs_reached reason seed device worker".split()
)
Direction = Literal["minimize", "maximize"]


class StudySpec(_Strict):
    """One study file."""

    name: str = Field(min_length=1, max_length=512)
    description: str | None = None
    storage: str | None = None
    direction: Direction = "maximize"
    metric: str = "val_accuracy"
    #: Several objectives (``directions: [maximize, minimize]``, ``metrics: [val_accuracy, train_seconds]``), in
    #: place of ``direction:`` / ``metric:``; read both forms through :attr:`metric_names` and :attr:`directions_list`.
    directions: list[Direction] | None = None
    metrics: list[str] | None = None
    objective: ObjectiveSpec
    space: dict[str, ParamSpec] = Field(default_factory=dict)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    budget: Budget = Field(default_factory=lambda: Budget(n_trials=20))
    enqueue: list[dict[str, Any]] = Field(default_factory=list, max_length=MAX_DESIGN_TRIALS)
    #: ``module:function`` callbacks, called ``cb(study, frozen_trial)`` after each trial as Optuna's
    #: ``study.optimize(callbacks=...)`` calls them (:mod:`hpo.worker.single`).
    callbacks: list[str] = Field(default_factory=list, max_length=32)
    predictions: list[Prediction] = Field(default_factory=list)
    population: PopulationSpec | None = None
    design: DesignSpec | None = None

    @field_validator("callbacks")
    @classmethod
    def _references(cls, v: list[str]) -> list[str]:
        import re

        for i, ref in enumerate(v):
            if not re.match(REFERENCE, ref):
                raise ValueError(f"{i}: write module:function, a function called cb(study, trial) (got {_short(ref)})")
        return v

    @model_validator(mode="before")
    @classmethod
    def _user_objective_defaults(cls, data: Any) -> Any:
        """A user's own objective (``kind: module:function``): ``direction`` is required (its value may be a loss or a
        score) and its metric is called ``value`` unless the file names it (several objectives: ``values_0``,
        ``values_1``, ... as in Optuna's ``trials_dataframe``); the other defaults are the training's."""
        if isinstance(data, dict) and ({"directions", "metrics"} & data.keys()):
            both = sorted({"direction", "metric"} & data.keys())
            if both:
                raise ValueError(
                    f"{both[0]}: give either direction:/metric: (one objective) or directions:/metrics: "
                    "(several), not both"
                )
            custom = isinstance(data.get("objective"), dict | CustomObjective) and (
                _objective_tag(data["objective"]) == "custom"
            )
            if custom and "metrics" not in data and isinstance(data.get("directions"), list):
                # Optuna needs only directions; the values' names are those of Optuna's trials_dataframe
                data = {**data, "metrics": [f"values_{i}" for i in range(len(data["directions"]))]}
            for key, other in (("directions", "metrics"), ("metrics", "directions")):
                if key not in data:
                    raise ValueError(f"{key}: required with {other}: (one entry per objective, in the same order)")
            return data
        if isinstance(data, dict) and isinstance(data.get("objective"), dict | CustomObjective):
            if _objective_tag(data["objective"]) == "custom":
                if "direction" not in data:
                    raise ValueError(
                        "direction: required for a user's objective: write direction: minimize or maximize"
                    )
                if "metric" not in data:
                    data = {**data, "metric": "value"}
        return data

    @field_validator("space", mode="before")
    @classmethod
    def _few_params(cls, v: Any) -> Any:
        if isinstance(v, dict) and len(v) > MAX_PARAMS:
            raise ValueError(f"{len(v)} parameters; a study searches at most {MAX_PARAMS}")
        return v

    @property
    def metric_names(self) -> list[str]:
        """The study's metrics, one per objective: ``[metric]``, or ``metrics`` for several objectives."""
        return list(self.metrics) if self.metrics is not None else [self.metric]

    @property
    def directions_list(self) -> list[str]:
        """``minimize`` / ``maximize`` per objective, in :attr:`metric_names` order."""
        return list(self.directions) if self.directions is not None else [self.direction]

    @property
    def multi_objective(self) -> bool:
        """Several objectives: trials return a tuple, nothing is pruned, the best trials are a Pareto front."""
        return len(self.metric_names) > 1

    @model_validator(mode="after")
    def _cross_checks(self) -> StudySpec:
        if self.metrics is not None:
            _check_objectives(self)
        order = list(self.space)
        known = KNOWN_PARAMS.get(self.objective.kind)
        for name, p in self.space.items():
            when = getattr(p, "when", None) or {}
            for other in when:
                if other not in self.space:
                    raise ValueError(f"space.{name}.when: refers to {other!r}, which is not in the space")
                if order.index(other) >= order.index(name):
                    raise ValueError(
                        f"space.{name}.when: refers to {other!r}, which is written below it; write {other!r} first"
                    )
            if known is not None and name not in known:
                raise ValueError(
                    f"space.{name}: the {self.objective.kind} objective has no parameter {name!r} "
                    f"(known: {', '.join(sorted(known))})"
                )
        for i, params in enumerate(self.enqueue):
            problem = check_params(self.space, params, own_names=":" in self.objective.kind)
            if problem:
                raise ValueError(f"enqueue.{i}.{problem}")
        opt = self.space.get("optimizer")
        choices: list[Any] = []
        if isinstance(opt, ChoiceParam):
            choices = list(opt.choices)
        elif isinstance(opt, FixedParam):
            choices = [opt.value]
        elif isinstance(opt, str):
            choices = [opt]
        for c in choices:
            if c not in OPTIMIZERS:
                raise ValueError(f"space.optimizer: unknown optimizer {c!r} (known: {', '.join(OPTIMIZERS)})")
        metrics = {"training": TRAINING_METRICS, "grokking": ("steps_to_generalise",)}.get(self.objective.kind)
        if metrics is not None and self.metrics is None and self.metric not in metrics:
            raise ValueError(
                f"metric: the {self.objective.kind} objective reports {', '.join(metrics)} (got {self.metric!r})"
            )
        if self.objective.kind == "grokking" and self.directions_list != ["minimize"]:
            raise ValueError("direction: steps_to_generalise is minimised (direction: minimize)")
        for pred in self.predictions:
            if pred.param not in self.space:
                raise ValueError(f"predictions: parameter {pred.param!r} is not in the space")
        if self.design is not None:
            _check_design(self)
        if self.sampler.name == "grid":
            _check_grid(self.space)
        return self


def _check_grid(space: dict[str, Any]) -> None:
    """The grid sampler's points, counted without building them (Optuna builds every one in memory)."""
    points = 1
    for p in space.values():
        if isinstance(p, ChoiceParam):
            points *= len(p.choices)
        elif isinstance(p, IntParam | FloatParam) and p.grid:
            points *= len(p.grid)
        if points > MAX_GRID_POINTS:
            raise ValueError(f"sampler.name: the grid has over {MAX_GRID_POINTS} points; a grid holds at most that")


def _check_objectives(spec: StudySpec) -> None:
    """``directions:`` / ``metrics:``: one entry each per objective, at least two, metrics the objective reports, and
    what several objectives rule out (pruning, population mode, predictions)."""
    metrics, directions = spec.metrics or [], spec.directions or []
    if len(metrics) < 2:
        raise ValueError(
            f"metrics: several objectives need at least 2 entries (got {len(metrics)}); for one, write metric:"
        )
    if len(directions) != len(metrics):
        raise ValueError(
            f"directions: one per metric, in the same order ({len(directions)} directions, {len(metrics)} metrics)"
        )
    seen: set[str] = set()
    for name in metrics:
        if name in seen:
            raise ValueError(f"metrics: {name!r} is named twice")
        seen.add(name)
        if not name or name in RESERVED_COLUMNS or name.startswith("params_"):
            raise ValueError(f"metrics: {name!r} is not a usable metric name (it is a column of hpo trials)")
    kind = spec.objective.kind
    reported = {"training": TRAINING_METRICS + COMPUTE_METRICS, "grokking": ("steps_to_generalise",)}.get(kind)
    if reported is not None:
        for name in metrics:
            if name not in reported:
                raise ValueError(f"metrics: the {kind} objective reports {', '.join(reported)} (got {name!r})")
    if "pruner" in spec.model_fields_set and spec.pruner.name != "none":
        raise ValueError(
            f"pruner: Optuna cannot prune a trial with several objectives (got {spec.pruner.name!r}); write "
            "pruner: {name: none} or leave it out"
        )
    if "pruner" not in spec.model_fields_set:  # the default, median, cannot see several objectives
        object.__setattr__(spec, "pruner", PrunerSpec(name="none"))
    if spec.sampler.name == "cmaes":
        raise ValueError("sampler.name: cmaes optimises one objective; use nsgaii, tpe, gp, random or qmc")
    if spec.population is not None and spec.population.size != 1:
        raise ValueError("population: population mode trains single-objective studies only; leave it out")
    if spec.predictions:
        raise ValueError(
            "predictions: judged on one metric, so not with several objectives; put them in a study with metric:"
        )


def stored_form(spec: StudySpec) -> dict[str, Any]:
    """The study file as stored with its study (``hpo:spec``): JSON, with any credential in ``storage`` masked.

    Analysts read study attributes, so no password may be stored there (the storage URL is never read back)."""
    from hpo.storage import mask

    data = spec.model_dump(mode="json")
    for key in ("direction", "metric") if spec.metrics is not None else ("directions", "metrics"):
        data.pop(key)  # one form: the stored file parses again (both forms together are refused)
    if data.get("storage"):
        data["storage"] = mask(data["storage"])
    return data


def _check_design(spec: StudySpec) -> None:
    design = spec.design
    assert design is not None
    for part, names in (("baseline", design.baseline), ("sweeps", design.sweeps)):
        for name in names:
            if name not in spec.space:
                raise ValueError(f"design.{part}: parameter {name!r} is not in the space")
    missing = [n for n, p in spec.space.items() if isinstance(p, IntParam | FloatParam | ChoiceParam)]
    missing = [n for n in missing if n not in design.baseline and getattr(spec.space[n], "when", None) is None]
    if missing:
        raise ValueError(f"design.baseline: give a value for {', '.join(missing)}")
    if design.sample is not None:
        for name in design.sample.params:
            if not isinstance(spec.space.get(name), IntParam | FloatParam):
                raise ValueError(f"design.sample.params: {name!r} is not a range (int or float) of the space")
    n = design.n_trials()
    if n > MAX_DESIGN_TRIALS:
        raise ValueError(
            f"design.seeds: the design enqueues {n} trials (points x seeds + sample.n); at most {MAX_DESIGN_TRIALS}"
        )
    if spec.budget.n_trials is not None and spec.budget.n_trials < n:
        raise ValueError(f"budget.n_trials: the design enqueues {n} trials (got {spec.budget.n_trials})")


def _format_error(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"] if not _is_tag(p))
    msg = str(err["msg"]).removeprefix("Value error, ")
    kind = err["type"]
    if kind == "extra_forbidden":
        msg = "unknown key"
    elif kind == "literal_error":
        msg = f"{msg} (got {err.get('input')!r})"
    elif kind == "union_tag_invalid":
        ctx = err.get("ctx", {})
        msg = f"unknown {ctx.get('discriminator', 'kind').strip(chr(39))} {ctx.get('tag')!r} (known: {ctx.get('expected_tags')})"
    head, sep, rest = msg.partition(": ")
    if (
        sep and (head.isidentifier() or head.isdigit()) and loc
    ):  # a model validator naming one of its fields: "low: must be > 0"
        return f"{loc}.{head}: {rest}"
    if sep and "." in head and not loc:  # a study-level check naming a full path: "space.x.when: ..."
        return msg
    return f"{loc}: {msg}" if loc else msg


_TAGS = {"int", "float", "choices", "fixed", "scalar", "training", "grokking", "custom"}


def _is_tag(part: Any) -> bool:
    return isinstance(part, str) and (part in _TAGS or part in ("bool", "str", "list[...]"))


def parse_spec(data: Any, source: str = "<study>") -> StudySpec:
    """Validate a parsed YAML document into a :class:`StudySpec`.

    Raises:
        SpecError: with ``source: field.path: message`` on the first problem.
    """
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the study file must be a mapping of keys to values")
    try:
        return StudySpec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise SpecError(f"{source}: {_format_error(first)}") from None


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study file.

    Example:
        >>> spec = load_spec("studies/spirals-optimizer.yaml")  # doctest: +SKIP
        >>> spec.name
        'spirals-optimizer'
    """
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: no such study file")
    try:
        with p.open("rb") as fh:  # never more than the limit read: a huge file is refused at once
            raw = fh.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise SpecError(f"{p}: larger than {MAX_FILE_BYTES // 1024} KiB; a study file holds at most that")
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{p}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})") from None
    except OSError as exc:
        raise SpecError(f"{p}: cannot read: {exc.strerror}") from None
    return parse_spec(load_yaml(text, str(p)), str(p))


#: Deepest nesting of lists and mappings a study file may use (a deeper one is refused, not a RecursionError).
MAX_DEPTH = 50


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """PyYAML's safe loader (libyaml's parser where installed: 10,000 parameters parse in 0.2 s, not 0.75 s),
    refusing a key written twice in one mapping (PyYAML keeps the last silently)."""

    source = "<study>"

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: PyYAML's own error follows
                continue
            if duplicate:
                line = key_node.start_mark.line + 1
                raise SpecError(f"{self.source}: line {line}: duplicate key {key!r}; write each key once")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _measure(root: yaml.Node, source: str) -> None:
    """Refuse a document nested deeper than :data:`MAX_DEPTH`, or holding more than :data:`MAX_YAML_NODES` values
    once its aliases are expanded (an "alias bomb": a few hundred bytes that expand to billions of values), or one
    that contains itself. Each node is visited once, however often it is aliased."""
    size: dict[int, int] = {}  # id(node) -> values under it, expanded
    depth: dict[int, int] = {}  # id(node) -> levels under it
    open_: set[int] = set()
    todo: list[tuple[yaml.Node, bool]] = [(root, False)]
    while todo:
        n, children_done = todo.pop()
        key = id(n)
        kids: list[yaml.Node] = []
        if isinstance(n, yaml.SequenceNode):
            kids = list(n.value)
        elif isinstance(n, yaml.MappingNode):
            kids = [c for kv in n.value for c in kv]
        if children_done:
            open_.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in kids)
            depth[key] = 1 + max((depth[id(c)] for c in kids), default=0)
            if size[key] > MAX_YAML_NODES:
                raise SpecError(f"{source}: more than {MAX_YAML_NODES} values once its aliases are expanded")
            if depth[key] > MAX_DEPTH:
                raise SpecError(f"{source}: nested deeper than {MAX_DEPTH} levels")
            continue
        if key in size:
            continue
        if key in open_:
            raise SpecError(f"{source}: an alias refers to a value that contains it (line {n.start_mark.line + 1})")
        open_.add(key)
        todo.append((n, True))
        todo.extend((c, False) for c in kids if id(c) not in size)
        if len(open_) > MAX_DEPTH:
            raise SpecError(f"{source}: nested deeper than {MAX_DEPTH} levels")


def load_yaml(text: str, source: str) -> Any:
    """Parse a YAML document safely: duplicate keys, nesting deeper than :data:`MAX_DEPTH` and syntax errors are
    one-line :class:`SpecError` naming ``source`` and the line."""
    try:
        loader = _UniqueKeyLoader(text)
        loader.source = source
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _measure(node, source)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except RecursionError:
        raise SpecError(f"{source}: nested too deeply to read") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if "nesting depth" in problem:  # libyaml's own bound, met before ours
            raise SpecError(f"{source}: nested deeper than {MAX_DEPTH} levels") from None
        raise SpecError(f"{source}: YAML syntax error at {where}{problem}") from None
