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

import logging
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
import torch

from hpo import data as data_sources
from hpo.errors import HpoError
from hpo.limits import MAX_POPULATION
from hpo.models import ACTIVATION_FNS, cnn
from hpo.objectives.training import METRICS, EpochResult, Loss, TrainConfig, resolve_config
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
    multi = spec.multi_objective  # Optuna prunes single-objective trials only; members are pruned and compared
    if isinstance(value, str) and value.strip().lower() == "auto":
        mlp = isinstance(obj, TrainingObjective) and obj.model.kind == "mlp"
        if mlp and spec.metric in METRICS and not multi and not spec.callbacks:
            return AUTO_SIZE if largest_model(spec) <= AUTO_MAX_PARAMS else 1
        return 1
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise HpoError(f"population size: must be a whole number >= 1 or auto (got {value!r})") from None
    if size < 1:
        raise HpoError(f"population size: must be >= 1 (got {size})")
    if size > MAX_POPULATION:
        raise HpoError(f"population size: at most {MAX_POPULATION} trials trained at once (got {size})")
    if size > 1:
        if multi:
            raise HpoError("population mode trains single-objective studies only; this study has several metrics")
        if spec.callbacks:
            raise HpoError("population mode calls no callbacks (its trials train stacked); leave out one or the other")
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


__all__ = [
    "AUTO_MAX_PARAMS",
    "AUTO_SIZE",
    "DEFAULT_SIZE",
    "Event",
    "PopulationTrainer",
    "largest_model",
    "population_size",
    "train_members",
]
