"""Population mode: one worker trains up to K trials at once, stacked, each with its own hyperparameters.

Small models (the lesson's ``[2, 10, 1]`` above all) spend almost all of a training step on per-step overhead,
not arithmetic. Stacking K trials along a leading dimension (:mod:`hpo.objectives.vectorised`) pays that overhead
once for all K.

Grouping. Trials that share an architecture (model kind, hidden layers or channels, activation) train as one stacked
model. Everything else is per member: learning rate, momentum, weight decay, betas, epochs, the optimizer kind
(:class:`~hpo.objectives.vectorised.VecOptimizer` runs all five kinds in one update) and the batch size. Members
with different batch sizes share the group's *ticks*: each tick every member takes up to ``m`` rows of its own
current mini-batch and accumulates its gradient; a member whose mini-batch is complete takes its optimizer step in
that tick, the others keep accumulating. ``m`` is the group's smallest batch size or, for small models, up to
:data:`ROW_BUDGET` / (parameters per member) rows (99 for the lesson's 41 parameters): at those sizes a tick costs
its operations' overhead, not its rows, so a member with a smaller batch size pads its mini-batch with rows of
weight zero, and a member with batch size 1000 does one step every 11 ticks instead of every 63 when the smallest
batch size is 16 (the spirals study runs 1.4x faster end to end). Every step is still on exactly the member's own
rows, with its loss the mean over them: the same step as the single-trial loop's, up to float rounding. Grouping by
batch size instead would leave groups of one in any study that searches batch size on a range (measured: slower).

Members' lives are their own. Each member has its own seed (initialisation as ``hpo.models`` builds it under
``torch.manual_seed(seed)``; data order from its own ``torch.Generator(seed)``, one permutation per epoch, exactly
as :func:`hpo.objectives.training.train` draws them), its own epoch count, and its own trial: after each of its
epochs it reports its validation metric and asks its pruner. Pruned, diverged (NaN/inf, ``reason=diverged`` with
the epoch) and finished members leave the stack (their rows are dropped) without touching the others' rows; the
worker then asks Optuna for new trials to fill the freed slots, inside the budget lock, so the population stays
full and the global budget stays exact. One heartbeat thread records heartbeats for every running member's trial.

What a member's stored metric is: the single-trial result for the same parameters and seed up to float rounding
(batched matmuls and the loss summed as ``sum(row / B)`` round differently from ``nn.Linear`` and ``mean``); the
tests bound the difference on the validation loss at 1e-5 after several epochs. Single-trial mode stays the one
that reproduces a stored metric bit for bit (``hpo evaluate``), which is why population mode is opt-in.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import threading
import time
from collections.abc import Container, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
import torch
from optuna.trial import TrialState

from hpo import data as data_sources
from hpo import space as search_space
from hpo import threads as hpo_threads
from hpo.errors import HpoError
from hpo.models import ACTIVATION_FNS, cnn
from hpo.objectives import trial_seed
from hpo.objectives.training import METRICS, EpochResult, Loss, TrainConfig, resolve_config, set_trial_attrs
from hpo.objectives.vectorised import (
    OPTIMIZER_KINDS,
    FuncStack,
    StackedMLP,
    StackedModel,
    VecOptimizer,
    row_correct,
    row_losses,
)
from hpo.spec import ChoiceParam, FixedParam, StudySpec, TrainingObjective

if TYPE_CHECKING:
    from hpo.worker import WorkerOptions, WorkerResult

log = logging.getLogger(__name__)

#: ``population: {size: auto}`` / ``--population auto``: this many members ...
AUTO_SIZE = 32
#: ... for MLP studies whose largest model has at most this many parameters; single-trial mode otherwise.
AUTO_MAX_PARAMS = 10_000
#: What a study file without ``population:`` and a worker without ``--population`` get: single-trial mode.
DEFAULT_SIZE: int | str = 1
#: A tick takes at least this many (rows x parameters per member) from each member's mini-batch (see the module doc).
ROW_BUDGET = 4096
_EVAL_CHUNK = 8192


# --------------------------------------------------------------------------- choosing the size


def _architectures(spec: StudySpec) -> list[list[int]]:
    """Every hidden-layer list the study's trials can have (for the parameter-count threshold)."""
    obj = spec.objective
    assert isinstance(obj, TrainingObjective)
    out = [list(obj.model.layers)]
    entry = spec.space.get("layers")
    if isinstance(entry, ChoiceParam):
        out += [c if isinstance(c, list) else [c] for c in entry.choices]  # type: ignore[misc]
    elif isinstance(entry, FixedParam):
        out.append(entry.value if isinstance(entry.value, list) else [entry.value])  # type: ignore[list-item]
    elif isinstance(entry, list):
        out.append(entry)
    if "n_layers" in spec.space or "units" in spec.space:
        high = {k: getattr(spec.space[k], "high", None) for k in ("n_layers", "units") if k in spec.space}
        n = int(high.get("n_layers") or len(obj.model.layers))
        units = int(high.get("units") or (obj.model.layers[0] if obj.model.layers else 10))
        out.append([units] * n)
    return [[int(u) for u in a] for a in out]


def largest_model(spec: StudySpec) -> int:
    """Parameters of the largest MLP the study's search space can build."""
    obj = spec.objective
    assert isinstance(obj, TrainingObjective)
    splits = data_sources.load(obj.data)
    n_in = math.prod(splits.input_shape)
    n_out = Loss(obj.loss, splits.n_classes).n_out
    return max(StackedMLP(n_in, layers, n_out).n_params for layers in _architectures(spec))


def population_size(spec: StudySpec, requested: int | str | None = None) -> int:
    """Members per worker: ``requested`` (``--population``), else the study file's ``population.size``, else
    :data:`DEFAULT_SIZE`. ``auto``: :data:`AUTO_SIZE` for MLP training studies whose largest model has at most
    :data:`AUTO_MAX_PARAMS` parameters, else 1.

    Raises:
        HpoError: a size above 1 for an objective population mode cannot train, or a value that is not a size.
    """
    value: int | str = (
        requested if requested is not None else (spec.population.size if spec.population else DEFAULT_SIZE)
    )
    obj = spec.objective
    if isinstance(value, str) and value.strip().lower() == "auto":
        if isinstance(obj, TrainingObjective) and obj.model.kind == "mlp" and spec.metric in METRICS:
            return AUTO_SIZE if largest_model(spec) <= AUTO_MAX_PARAMS else 1
        return 1
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise HpoError(f"population size: must be a whole number >= 1 or auto (got {value!r})") from None
    if size < 1:
        raise HpoError(f"population size: must be >= 1 (got {size})")
    if size > 1:
        if not isinstance(obj, TrainingObjective):
            raise HpoError(f"population mode trains the training objective only; this study's is {obj.kind!r}")
        if obj.model.kind not in ("mlp", "cnn"):
            raise HpoError(f"population mode stacks mlp and cnn models; this study's is {obj.model.kind!r}")
        if spec.metric not in METRICS:
            raise HpoError(f"population mode: metric {spec.metric!r} is not one of {', '.join(METRICS)}")
    return size


# --------------------------------------------------------------------------- the stacked trainer


@dataclass
class _Data:
    x: torch.Tensor
    y: torch.Tensor
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]
    loss: Loss
    input_shape: tuple[int, ...]


@dataclass
class _Member:
    key: Hashable
    cfg: TrainConfig
    seed: int
    gen: torch.Generator
    epoch: int = 0


@dataclass
class Event:
    """A member finished an epoch: its result (possibly NaN/inf: the caller checks), and whether it was its last."""

    key: Hashable
    result: EpochResult
    final: bool


class _Group:
    """Members sharing one architecture, stacked: parameters ``flat`` (K, P), optimizer state, data order."""

    def __init__(self, model: StackedModel, data: _Data, loss_kind: str, device: str) -> None:
        self.model, self.data, self.loss_kind, self.device = model, data, loss_kind, device
        self.n = len(data.x)
        self.members: list[_Member] = []
        self.flat = torch.zeros(0, model.n_params, device=device)
        self.grad: torch.Tensor | None = None  # gradients accumulated over the micro-batches of a mini-batch
        self.opt = VecOptimizer()
        self.perms = torch.zeros(0, self.n, dtype=torch.long, device=device)
        self.pos = np.zeros(0, dtype=np.int64)  # rows of this epoch consumed
        self.start = np.zeros(0, dtype=np.int64)  # first row of the current mini-batch
        self.bs = np.zeros(0, dtype=np.int64)
        self.steps = np.zeros(0, dtype=np.int64)  # optimizer steps this epoch
        self.epoch_loss = torch.zeros(0, device=device)
        self.need_perm: set[int] = set()
        self._aligned: bool | None = None  # cached; None: to be computed again
        self.min_rows = max(1, ROW_BUDGET // model.n_params)  # rows a tick takes at least, for small models

    def __len__(self) -> int:
        return len(self.members)

    def add(self, members: Sequence[_Member]) -> None:
        rows = self.model.init([m.seed for m in members]).to(self.device)
        if self.grad is not None:
            self.grad = torch.cat([self.grad, torch.zeros_like(rows)])
        self.flat = torch.cat([self.flat, rows])
        for m in members:
            c = m.cfg
            self.opt.add(c.optimizer, c.lr, c.momentum, c.weight_decay, c.beta1, c.beta2, self.model.n_params)
        first = len(self.members)
        self.members += members
        k = len(members)
        self.perms = torch.cat([self.perms, self.perms.new_zeros(k, self.n)])
        self.pos = np.append(self.pos, np.zeros(k, dtype=np.int64))
        self.start = np.append(self.start, np.zeros(k, dtype=np.int64))
        self.bs = np.append(self.bs, [min(m.cfg.batch_size, self.n) for m in members]).astype(np.int64)
        self.steps = np.append(self.steps, np.zeros(k, dtype=np.int64))
        self.epoch_loss = torch.cat([self.epoch_loss, self.epoch_loss.new_zeros(k)])
        self.need_perm |= set(range(first, first + k))
        self._aligned = None

    def keep(self, rows: list[int]) -> None:
        self.flat = self.flat[rows]
        if self.grad is not None:
            self.grad = self.grad[rows]
        self.opt.keep(rows)
        self.members = [self.members[r] for r in rows]
        self.perms = self.perms[rows]
        self.pos, self.start, self.bs, self.steps = self.pos[rows], self.start[rows], self.bs[rows], self.steps[rows]
        self.epoch_loss = self.epoch_loss[rows]
        new_index = {old: new for new, old in enumerate(rows)}
        self.need_perm = {new_index[r] for r in self.need_perm if r in new_index}
        self._aligned = None

    def tick(self) -> list[int]:
        """One micro-batch for every member (and a step for those whose mini-batch completes); rows whose epoch
        ended in this tick."""
        for r in sorted(self.need_perm):
            self.perms[r] = torch.randperm(self.n, generator=self.members[r].gen).to(self.device)
        self.need_perm.clear()
        if self.aligned:  # same batch size, same place in the epoch: whole mini-batches, plain slices, no masks
            return self._tick_aligned()
        n, pos, start = self.n, self.pos, self.start
        m = min(max(int(self.bs.min()), self.min_rows), int(self.bs.max()))
        cur = np.minimum(self.bs, n - start)  # this mini-batch's size (the epoch's last one may be short)
        take = np.minimum(m, start + cur - pos)
        done = pos + take == start + cur
        p0 = int(pos[0])
        if (pos == p0).all() and p0 + m <= n:
            idx = self.perms[:, p0 : p0 + m]
        else:
            offs = np.minimum(pos[:, None] + np.arange(m), n - 1)
            idx = self.perms.gather(1, torch.from_numpy(offs).to(self.device))
        weight: torch.Tensor | None = None  # None: every member's whole mini-batch, the single loop's mean
        if not ((take == m).all() and (cur == m).all()):
            w = np.where(np.arange(m)[None, :] < take[:, None], 1.0 / cur[:, None], 0.0)
            weight = torch.from_numpy(w.astype(np.float32)).to(self.device)
        member_loss, grad = self.model.loss_and_grad(
            self.flat, self.data.x[idx], self.data.y[idx], self.loss_kind, weight
        )
        self.epoch_loss += member_loss
        if self.grad is not None:  # members part-way through a mini-batch larger than m
            grad = self.grad.add_(grad)
        if done.all():
            self.opt.step(self.flat, grad)
            self.grad = None
        else:
            self.opt.step(self.flat, grad, done)
            self.grad = grad.mul_(torch.from_numpy((~done).astype(np.float32)).to(self.device).unsqueeze(1))
        self.pos = pos = pos + take
        self.start = np.where(done, pos, start)
        self.steps = self.steps + done
        self._aligned = None
        return np.flatnonzero(done & (pos == n)).tolist()

    def _tick_aligned(self) -> list[int]:
        p0 = int(self.pos[0])
        b = min(int(self.bs[0]), self.n - p0)
        idx = self.perms[:, p0 : p0 + b]
        member_loss, grad = self.model.loss_and_grad(
            self.flat, self.data.x[idx], self.data.y[idx], self.loss_kind, None
        )
        self.epoch_loss += member_loss
        self.opt.step(self.flat, grad)
        self.pos[:] = self.start[:] = p0 + b
        self.steps += 1
        return list(range(len(self.members))) if p0 + b == self.n else []

    @property
    def aligned(self) -> bool:
        if self._aligned is None:
            self._aligned = bool(
                self.grad is None and (self.pos == self.pos[0]).all() and (self.bs == self.bs[0]).all()
            )
        return self._aligned

    def finish_epochs(self, rows: list[int]) -> list[tuple[int, float, float, float]]:
        """(row, train loss, val loss, val accuracy) for members whose epoch just ended; starts their next epoch."""
        idx = torch.tensor(rows, device=self.device)
        train = [
            total / int(steps) for total, steps in zip(self.epoch_loss[idx].tolist(), self.steps[rows], strict=True)
        ]
        self.epoch_loss[idx] = 0.0
        val_loss, val_acc = self.evaluate(rows, "val")
        for r in rows:
            self.members[r].epoch += 1
            self.pos[r] = self.start[r] = self.steps[r] = 0
            self.need_perm.add(r)
        self._aligned = None
        return [(r, t, vl, va) for r, t, vl, va in zip(rows, train, val_loss, val_acc, strict=True)]

    @torch.inference_mode()
    def evaluate(self, rows: list[int], split: str) -> tuple[list[float], list[float]]:
        """Loss and accuracy of some members over a whole split, in one stacked pass (chunked for large splits)."""
        flat = self.flat.detach()
        flat = flat if rows == list(range(len(self.members))) else flat[rows]
        x, y = self.data.splits[split]
        k, nv = flat.shape[0], len(x)
        total = torch.zeros(k, device=self.device)
        correct = torch.zeros(k, device=self.device)
        for i in range(0, nv, _EVAL_CHUNK):
            xc, yc = x[i : i + _EVAL_CHUNK], y[i : i + _EVAL_CHUNK]
            xs = xc.unsqueeze(0).expand(k, *xc.shape)
            ys = yc.unsqueeze(0).expand(k, *yc.shape)
            out = self.model.forward(flat, xs)
            total += row_losses(self.loss_kind, out, ys).sum(1)
            correct += row_correct(self.loss_kind, out, ys)
        return [t / nv for t in total.tolist()], [c / nv for c in correct.tolist()]


class PopulationTrainer:
    """Trains any number of members (each: parameters + seed) of one training objective, stacked by architecture.

    ``add`` members at any time, call :meth:`step` repeatedly (one tick of every group) and read its
    :class:`Event` list: a member's epoch ended. A member leaves after its last epoch by itself, or when
    :meth:`remove` is called (pruned, diverged). Nothing here touches Optuna.

    Example::

        trainer = PopulationTrainer(spec.objective)
        trainer.add("a", {"lr": 0.01}, seed=1)
        trainer.add("b", {"lr": 0.1, "optimizer": "adam"}, seed=2)
        while len(trainer):
            for event in trainer.step():
                print(event.key, event.result.val_accuracy)
    """

    def __init__(self, obj: TrainingObjective, device: str = "cpu") -> None:
        self.obj, self.device = obj, device
        splits = data_sources.load(obj.data)
        loss = Loss(obj.loss, splits.n_classes)

        def tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.from_numpy(x).to(device), loss.target(torch.from_numpy(y)).to(device)

        x, y = tensors(splits.x_train, splits.y_train)
        self.data = _Data(
            x=x,
            y=y,
            splits={"val": tensors(splits.x_val, splits.y_val), "test": tensors(splits.x_test, splits.y_test)},
            loss=loss,
            input_shape=splits.input_shape,
        )
        self.groups: dict[Hashable, _Group] = {}
        self.where: dict[Hashable, Hashable] = {}
        self._pending: dict[Hashable, list[_Member]] = {}
        self._leaving: set[Hashable] = set()

    def __len__(self) -> int:
        return len(self.where)

    def _group_key(self, cfg: TrainConfig) -> Hashable:
        if self.obj.model.kind == "cnn":
            return ("cnn", cfg.channels, cfg.activation)
        return ("mlp", cfg.layers, cfg.activation)

    def _new_group(self, cfg: TrainConfig) -> _Group:
        shape, n_out = self.data.input_shape, self.data.loss.n_out
        model: StackedModel
        if self.obj.model.kind == "cnn":
            if len(shape) not in (2, 3):
                raise ValueError("cnn needs (C, L) or (C, H, W) inputs")
            model = FuncStack(lambda: cnn(shape, list(cfg.channels), n_out, cfg.activation))
        else:
            model = StackedMLP(math.prod(shape), cfg.layers, n_out, cfg.activation)
        return _Group(model, self.data, self.obj.loss, self.device)

    def add(self, key: Hashable, params: dict[str, Any], seed: int) -> TrainConfig:
        """Queue a member; it joins at the next :meth:`step`.

        Raises:
            ValueError: parameters the training loop cannot run (an unknown optimizer or activation).
        """
        if key in self.where:
            raise ValueError(f"member {key!r} is already training")
        cfg = resolve_config(self.obj, params)
        if cfg.optimizer not in OPTIMIZER_KINDS:
            raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
        if cfg.activation not in ACTIVATION_FNS:
            raise ValueError(f"unknown activation {cfg.activation!r}")
        gkey = self._group_key(cfg)
        if gkey not in self.groups:
            self.groups[gkey] = self._new_group(cfg)
        self.where[key] = gkey
        self._pending.setdefault(gkey, []).append(_Member(key, cfg, seed, torch.Generator().manual_seed(seed)))
        return cfg

    def remove(self, key: Hashable) -> None:
        """Take a member out (pruned, diverged, interrupted); the others are not disturbed."""
        if key in self.where:
            self._leaving.add(key)

    def _apply(self) -> None:
        for gkey, group in list(self.groups.items()):
            if self._leaving and any(m.key in self._leaving for m in group.members):
                group.keep([r for r, m in enumerate(group.members) if m.key not in self._leaving])
            pending = [m for m in self._pending.pop(gkey, []) if m.key not in self._leaving]
            if pending:
                group.add(pending)
            if not len(group):
                del self.groups[gkey]
        for key in self._leaving:
            self.where.pop(key, None)
        self._leaving.clear()

    def step(self) -> list[Event]:
        """One tick of every group; the epochs that ended in it."""
        self._apply()
        events: list[Event] = []
        for group in self.groups.values():
            ended = group.tick()
            if not ended:
                continue
            for row, train_loss, val_loss, val_acc in group.finish_epochs(ended):
                member = group.members[row]
                final = member.epoch >= member.cfg.epochs
                events.append(Event(member.key, EpochResult(member.epoch, train_loss, val_loss, val_acc), final))
                if final:
                    self._leaving.add(member.key)
        return events

    def _locate(self, key: Hashable) -> tuple[_Group, int]:
        group = self.groups[self.where[key]]
        return group, next(r for r, m in enumerate(group.members) if m.key == key)

    def parameters(self, key: Hashable) -> list[torch.Tensor]:
        """A training member's parameters, shaped as the single model's ``parameters()`` (a copy)."""
        group, row = self._locate(key)
        return [t.clone() for t in group.model.unflatten(group.flat.detach()[row])]

    def test_accuracy(self, key: Hashable) -> float:
        """A training member's accuracy on the held-out test split (never used for selection)."""
        group, row = self._locate(key)
        if len(self.data.splits["test"][0]) == 0:
            raise optuna.exceptions.OptunaError("this data source has no test split")
        return group.evaluate([row], "test")[1][0]


def train_members(
    obj: TrainingObjective, members: dict[Hashable, tuple[dict[str, Any], int]], device: str = "cpu"
) -> dict[Hashable, list[EpochResult]]:
    """Train members ``{key: (params, seed)}`` together to their last epoch, or to the epoch their loss diverges
    (that epoch's non-finite result is the last in their history). For tests and benchmarks."""
    trainer = PopulationTrainer(obj, device)
    for key, (params, seed) in members.items():
        trainer.add(key, params, seed)
    history: dict[Hashable, list[EpochResult]] = {key: [] for key in members}
    while len(trainer):
        for ev in trainer.step():
            history[ev.key].append(ev.result)
            if not (math.isfinite(ev.result.train_loss) and math.isfinite(ev.result.val_loss)):
                trainer.remove(ev.key)
    return history


# --------------------------------------------------------------------------- the worker's population loop


class _StudyView:
    """The study as this population sees it: the trials read from the database at most once per ``ttl`` seconds,
    overlaid with this worker's own trials as they are now (parameters as sampled, values as reported, outcome as
    told), which are thus never stale.

    Optuna's sampler and pruner read every trial of the study for each trial asked (twice, with TPE), each parameter
    suggested and each ``should_prune``, and every such read re-reads all running trials with all their intermediate
    values. With K members those reads, not the training, dominated a population worker's time. Members' trials
    are built with this view as their study (``optuna.Trial(view, trial_id)``), so TPE reads through it too; other
    workers' trials may be up to ``ttl`` seconds old, as they always are; everything else is the study's.
    """

    def __init__(self, study: optuna.Study, ttl: float = 1.0) -> None:
        self._study, self._ttl = study, ttl
        self._read_at = -math.inf
        self._stored: list[optuna.trial.FrozenTrial] = []
        self._stored_ids: set[int] = set()
        self._own: dict[int, optuna.trial.FrozenTrial] = {}  # trial id -> the trial as this worker holds it
        self._storage = _OwnTrials(study._storage, self._own)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def track(self, trial: optuna.Trial) -> None:
        """A member's trial: from now on read as its ``Trial`` holds it (Optuna updates that copy on every
        suggestion and report)."""
        self._own[trial._trial_id] = trial._cached_frozen_trial

    def created(self, trial_id: int) -> None:
        """A trial this worker just created: ``optuna.Trial(view, trial_id)`` then starts from Optuna's cached copy
        instead of reading it back."""
        from hpo.worker import created_trial

        frozen = created_trial(self._study, trial_id)
        if frozen is not None:
            self._own[trial_id] = frozen

    def finished(self, frozen: optuna.trial.FrozenTrial) -> None:
        """A member's trial as stored when it finished: pruners compare with it at once, and TPE counts it."""
        self._own[frozen._trial_id] = frozen

    def _get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None, use_cache: bool = False
    ) -> list[optuna.trial.FrozenTrial]:
        if time.monotonic() - self._read_at > self._ttl:
            self._stored = self._study._get_trials(deepcopy=False)
            self._stored_ids = {t._trial_id for t in self._stored}
            self._read_at = time.monotonic()
        own = self._own
        merged = [own.get(t._trial_id, t) for t in self._stored]
        created = [t for i, t in own.items() if i not in self._stored_ids]  # since the read
        merged += sorted(created, key=lambda t: t.number)
        trials = [t for t in merged if states is None or t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[optuna.trial.FrozenTrial]:
        return self._get_trials(deepcopy, states)

    @property
    def trials(self) -> list[optuna.trial.FrozenTrial]:
        return self._get_trials()

    def should_prune(self, trial: optuna.Trial) -> bool:
        """``trial.should_prune()``, the other trials read through the view."""
        # Successive halving and Hyperband keep their rungs in the trial's system attributes: read those fresh.
        rungs = isinstance(self._study.pruner, optuna.pruners.SuccessiveHalvingPruner | optuna.pruners.HyperbandPruner)
        frozen = trial._cached_frozen_trial
        if rungs:
            frozen = copy.copy(self._study._storage.get_trial(trial._trial_id))
            frozen.intermediate_values = trial._cached_frozen_trial.intermediate_values  # reports may be unstored
        return self._study.pruner.prune(self, frozen)  # type: ignore[arg-type]


class _OwnTrials:
    """The study's storage, with ``get_trial`` of the worker's own trials answered from memory: Optuna reads a
    trial back when it builds a ``Trial`` and again when it is told (two reads of six statements each per trial).
    The database stays the judge: telling a trial that another worker reaped meanwhile fails on its state, and the
    worker then reads what is stored (:func:`hpo.worker._tell_finished`)."""

    def __init__(self, storage: optuna.storages.BaseStorage, own: dict[int, optuna.trial.FrozenTrial]) -> None:
        self._inner, self._own = storage, own

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def get_trial(self, trial_id: int) -> optuna.trial.FrozenTrial:
        own = self._own.get(trial_id)
        return own if own is not None else self._inner.get_trial(trial_id)


class _Reports:
    """Members' reports (``Trial.report``), stored in batches: at most ``every`` seconds apart, and before a
    member's trial is finished or re-queued (so it is told, and copied, with all its values). ``Trial.report`` costs
    a transaction of four statements per report; K members report K times an epoch. Pruning never waits for the
    database: it reads the values from the member's ``Trial`` (:meth:`_StudyView.should_prune`)."""

    def __init__(self, storage: optuna.storages.BaseStorage, every: float = 1.0) -> None:
        self.storage, self.every = storage, every
        self.pending: list[tuple[int, int, float]] = []
        self.stored_at = time.monotonic()

    def add(self, trial: optuna.Trial, value: float, step: int) -> None:
        value = float(value)
        trial._cached_frozen_trial.intermediate_values[step] = value  # as Trial.report keeps its copy
        self.pending.append((trial._trial_id, step, value))
        if time.monotonic() - self.stored_at >= self.every:
            self.store()

    def store(self) -> None:
        from hpo.storage import store_intermediate_values

        if self.pending:
            store_intermediate_values(self.storage, self.pending)
            self.pending = []
        self.stored_at = time.monotonic()


@dataclass
class _Live:
    trial: optuna.Trial
    started: float
    curve: list[float] = field(default_factory=list)


def run_population(
    study: optuna.Study,
    spec: StudySpec,
    size: int,
    *,
    storage: optuna.storages.RDBStorage,
    url: str,
    opts: WorkerOptions,
    stop: threading.Event,
    result: WorkerResult,
    budget: int | None,
    timeout: float | None,
    started: float,
    device: str,
    threads: int,
) -> None:
    """Train the study's trials ``size`` at a time until the budget is met, the timeout passes or ``stop`` is set.

    Counts into ``result`` as :func:`hpo.worker.run_worker` does. Trials still running when ``stop`` is set are
    failed and re-queued with their parameters, as the single-trial loop does with its one trial.
    """
    from hpo.storage import retry_callback
    from hpo.worker import _Heartbeats, _tell, _with_db_retry

    obj = spec.objective
    assert isinstance(obj, TrainingObjective)
    metric = spec.metric
    trainer = PopulationTrainer(obj, device)
    threads = hpo_threads.for_step(largest_model(spec) * size, ROW_BUDGET, threads)  # hpo.threads: a tick's work
    live: dict[int, _Live] = {}
    view = _StudyView(study)
    reports = _Reports(study._storage)
    worker_name = f"{os.uname().nodename}:{os.getpid()}"
    asking = True

    def finish(number: int, state: TrialState, value: float | None = None) -> None:
        _with_db_retry("store reports", reports.store, max(opts.db_retry_for, 300.0), url)
        item = live.pop(number)
        beats.discard(item.trial._trial_id)
        trainer.remove(number)
        frozen, _ = _tell(view, item.trial, state, value, opts, url)  # type: ignore[arg-type]
        view.finished(frozen)
        result.ran += 1
        result.trials.append(frozen.number)
        if frozen.state == TrialState.COMPLETE:
            result.complete += 1
        elif frozen.state == TrialState.PRUNED:
            result.pruned += 1
        else:
            result.failed += 1
        if opts.on_trial is not None:
            opts.on_trial(frozen)

    def start(trial: optuna.Trial) -> None:
        live[trial.number] = _Live(trial, time.perf_counter())
        view.track(trial)
        beats.add(trial._trial_id)
        # A re-queued copy carries its original's attributes; the trial as asked for holds them (no extra read).
        cached = getattr(trial, "_cached_frozen_trial", None)
        inherited = cached.user_attrs if cached is not None else trial.user_attrs
        try:
            params = search_space.suggest(trial, spec.space)
            seed = int(inherited.get("seed", trial_seed(spec, trial.number)))
            values = {"seed": seed, "device": device, "threads": threads, "worker": worker_name, "population": size}
            if inherited.get("reason") is not None:  # the copy's outcome is its own
                values["reason"] = None
            set_trial_attrs(trial, values)
            trainer.add(trial.number, params, seed)
        except Exception as exc:  # the trial's own mistake (bad parameters): recorded, the others carry on
            log.exception("trial %d failed", trial.number)
            set_trial_attrs(trial, {"reason": "error", "error": f"{type(exc).__name__}: {exc}"[:500]})
            finish(trial.number, TrialState.FAIL)

    def refill() -> bool:
        """Ask for trials to fill the free slots; False once none can be had (budget met, grid done, timeout)."""
        want = size - len(live)
        if want <= 0:
            return True
        if timeout is not None and time.monotonic() - started >= timeout:
            result.reason = "timeout"
            return False
        if isinstance(study.sampler, optuna.samplers.GridSampler) and study.sampler.is_exhausted(study):
            result.reason = "grid exhausted"
            return False
        trials = _with_db_retry(
            "ask for trials", lambda: _ask(view, spec.name, budget, storage, opts, want), opts.db_retry_for, url
        )
        for t in trials:
            start(t)
        return len(trials) == want

    def on_event(ev: Event) -> None:
        number = int(ev.key)  # type: ignore[call-overload]
        item, r = live[number], ev.result
        trial = item.trial
        for what, v in (("training", r.train_loss), ("validation", r.val_loss)):
            if not math.isfinite(v):
                log.info("trial %d diverged: %s loss became %s in epoch %d", number, what, v, r.epoch)
                set_trial_attrs(
                    trial,
                    {
                        "reason": "diverged",
                        "diverged_epoch": r.epoch,
                        "epochs_reached": r.epoch - 1,
                        "train_loss": item.curve,
                    },
                )
                finish(number, TrialState.PRUNED)
                return
        item.curve.append(round(r.train_loss, 6))
        value = r.metric(metric)
        reports.add(trial, value, r.epoch)
        if view.should_prune(trial):
            set_trial_attrs(trial, {"epochs_reached": r.epoch, "train_loss": item.curve, "reason": "pruned"})
            finish(number, TrialState.PRUNED)
            return
        if ev.final:
            values: dict[str, Any] = {
                "epochs_reached": r.epoch,
                "train_loss": item.curve,
                "val_loss": round(r.val_loss, 6),
                "val_accuracy": round(r.val_accuracy, 6),
                "train_seconds": round(time.perf_counter() - item.started, 3),
            }
            if obj.evaluate_test:
                values["test_accuracy"] = trainer.test_accuracy(number)
            set_trial_attrs(trial, values)
            finish(number, TrialState.COMPLETE, value)

    with _Heartbeats(storage, opts.heartbeat_interval, url) as beats, hpo_threads.use(threads) as threads:
        try:
            while True:
                if asking and not stop.is_set() and len(live) < size:
                    asking = refill()
                if not live or stop.is_set():
                    break
                for ev in trainer.step():
                    on_event(ev)
        except BaseException:
            with contextlib.suppress(Exception):  # the database may be what failed
                reports.store()
            for number in list(live):  # a bug or a database lost for good: these trials run again elsewhere
                _requeue(study, live[number].trial, "error", opts, url, retry_callback)
                _drop(live, beats, trainer, number, result)
            raise
        if stop.is_set():
            _with_db_retry("store reports", reports.store, max(opts.db_retry_for, 300.0), url)
            for number in list(live):
                _requeue(study, live[number].trial, "interrupted", opts, url, retry_callback)
                _drop(live, beats, trainer, number, result)
            result.interrupted = True


def _drop(live: dict[int, _Live], beats: Any, trainer: PopulationTrainer, number: int, result: Any) -> None:
    item = live.pop(number)
    beats.discard(item.trial._trial_id)
    trainer.remove(number)
    result.ran += 1
    result.failed += 1
    result.trials.append(number)


def _requeue(study: optuna.Study, trial: optuna.Trial, reason: str, opts: Any, url: str, callback: Any) -> None:
    """Fail a running member's trial with ``reason`` and queue its parameters again (as the single loop does)."""
    from hpo.worker import _tell, _with_db_retry

    _with_db_retry(
        "record a trial's outcome", lambda: trial.set_user_attr("reason", reason), max(opts.db_retry_for, 300.0), url
    )
    frozen, told = _tell(study, trial, TrialState.FAIL, None, opts, url)
    if told:
        _with_db_retry("re-queue the trial", lambda: callback(None)(study, frozen), max(opts.db_retry_for, 300.0), url)


def _ask(
    view: _StudyView, name: str, budget: int | None, storage: optuna.storages.RDBStorage, opts: Any, want: int
) -> list[optuna.Trial]:
    """Up to ``want`` new trials; their slots are taken inside the budget lock, so the global budget is never
    exceeded, and the sampler draws outside it (:func:`hpo.worker.take_slots`), reading the study through ``view``."""
    from hpo.storage import quiet_optuna
    from hpo.worker import take_slots

    ids, _ = take_slots(view._study, name, budget, storage, opts, want)
    for trial_id in ids:
        view.created(trial_id)
    with quiet_optuna():
        return [optuna.Trial(view, trial_id) for trial_id in ids]  # type: ignore[arg-type]


__all__ = [
    "AUTO_MAX_PARAMS",
    "AUTO_SIZE",
    "DEFAULT_SIZE",
    "Event",
    "PopulationTrainer",
    "largest_model",
    "population_size",
    "run_population",
    "train_members",
]
