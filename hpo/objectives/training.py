"""The generic supervised training loop.

Fast on purpose, because an HPO service spends its time here: the data stays as tensors (one permutation per epoch,
contiguous slices of it as mini-batches, no DataLoader), no host sync inside an epoch (the batch losses are kept on
the device and read once per epoch, which is also where divergence is checked), validation runs in one pass under
``inference_mode``, MLPs call ``F.linear`` directly (:class:`hpo.models.MLP`), and small models step with
:class:`hpo.objectives.optim.LeanOptimizer` (torch.optim's arithmetic without its per-call overhead).

Each epoch reports the study's metric (``val_accuracy``, ``val_loss`` or ``train_loss``) to the trial and asks the
pruner. A loss that becomes NaN or infinite prunes the trial with ``reason=diverged`` and the epoch.

With several objectives (``metrics: [val_accuracy, train_seconds]``) the trial returns a tuple in ``metrics`` order
and reports nothing (Optuna prunes single-objective trials only); the compute metrics are ``train_seconds`` (wall
time of the training loop: epochs and validation, not loading data or building the model; a resumed checkpoint's
trial counts this run's time only), ``optimizer_steps`` (epochs x ceil(n_train / batch size)) and ``samples_seen``
(epochs x n_train). Every complete trial stores all three as user attributes, whatever the study's metrics.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import optuna
import torch
from torch import nn

from hpo import data as data_sources
from hpo import threads as hpo_threads
from hpo.models import ACTIVATION_FNS, MLP, cnn, mlp
from hpo.objectives import Context
from hpo.objectives.optim import LeanOptimizer
from hpo.spec import COMPUTE_METRICS, TRAINING_METRICS, TrainingObjective
from hpo.storage import set_trial_attrs

METRICS = TRAINING_METRICS
#: Below this many parameters a training step is dominated by per-call overhead: use :class:`LeanOptimizer`.
SMALL_MODEL = 200_000


@dataclass(frozen=True)
class TrainConfig:
    """A trial's resolved settings: the objective's defaults overridden by the trial's parameters."""

    batch_size: int
    lr: float
    epochs: int
    optimizer: str
    momentum: float
    weight_decay: float
    beta1: float
    beta2: float
    layers: tuple[int, ...]
    activation: str
    channels: tuple[int, ...]


def resolve_config(obj: TrainingObjective, params: dict[str, Any]) -> TrainConfig:
    """Merge defaults and parameters; ``n_layers`` x ``units`` or ``layers`` set the hidden layers."""
    d = obj.defaults.model_dump()
    layers = list(obj.model.layers)
    if "layers" in params:
        layers = list(params["layers"]) if isinstance(params["layers"], list) else [int(params["layers"])]
    elif "n_layers" in params or "units" in params:
        n = int(params.get("n_layers", len(layers)))
        units = int(params.get("units", layers[0] if layers else 10))
        layers = [units] * n
    channels = params.get("channels", obj.model.channels)
    return TrainConfig(
        batch_size=int(params.get("batch_size", d["batch_size"])),
        lr=float(params.get("lr", d["lr"])),
        epochs=int(params.get("epochs", d["epochs"])),
        optimizer=str(params.get("optimizer", d["optimizer"])),
        momentum=float(params.get("momentum", d["momentum"])),
        weight_decay=float(params.get("weight_decay", d["weight_decay"])),
        beta1=float(params.get("beta1", d["beta1"])),
        beta2=float(params.get("beta2", d["beta2"])),
        layers=tuple(layers),
        activation=str(params.get("activation", obj.model.activation)),
        channels=tuple(channels if isinstance(channels, list) else [int(channels)]),
    )


def build_model(obj: TrainingObjective, cfg: TrainConfig, input_shape: tuple[int, ...], n_out: int) -> nn.Module:
    if obj.model.kind == "cnn":
        if len(input_shape) not in (2, 3):
            raise optuna.exceptions.OptunaError("cnn needs (C, L) or (C, H, W) inputs")
        return cnn(input_shape, list(cfg.channels), n_out, cfg.activation)
    return mlp(math.prod(input_shape), list(cfg.layers), n_out, cfg.activation)


def build_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer | LeanOptimizer:
    """sgd, sgd_momentum, adam, adamw, rmsprop with the trial's lr, momentum, weight decay and betas.

    Small models get :class:`LeanOptimizer` (torch.optim's arithmetic without its per-step overhead), larger ones
    torch.optim itself.
    """
    betas = (cfg.beta1, cfg.beta2)
    if sum(p.numel() for p in params) < SMALL_MODEL:
        return LeanOptimizer(params, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, betas)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd_momentum":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


class Loss:
    """The lesson's ``mse`` (on a sigmoid output), ``bce`` on logits, or ``cross_entropy``."""

    def __init__(self, kind: str, n_classes: int) -> None:
        if kind in ("mse", "bce") and n_classes != 2:
            raise ValueError(f"loss {kind!r} is for two classes; this data has {n_classes}")
        self.kind = kind
        self.n_out = 1 if kind in ("mse", "bce") else n_classes

    def target(self, y: torch.Tensor) -> torch.Tensor:
        return y.float().unsqueeze(1) if self.n_out == 1 else y

    def __call__(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.kind == "mse":
            return nn.functional.mse_loss(torch.sigmoid(out), target)
        if self.kind == "bce":
            return nn.functional.binary_cross_entropy_with_logits(out, target)
        return nn.functional.cross_entropy(out, target)

    def correct(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.n_out == 1:
            return ((out > 0).float() == target).sum()
        return (out.argmax(1) == target).sum()


class Diverged(Exception):
    pass


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    #: up to this epoch: wall time of the training loop (s), optimizer steps, training samples seen
    train_seconds: float = 0.0
    optimizer_steps: int = 0
    samples_seen: int = 0

    def metric(self, name: str) -> float:
        if name == "val_error":
            return 1.0 - self.val_accuracy
        return float(getattr(self, name))


def evaluate(model: nn.Module, loss: Loss, x: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """Loss and accuracy over a whole split in one pass (chunked for large splits)."""
    model.eval()
    total_loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device)
    n = len(x)
    chunk = 8192
    with torch.inference_mode():
        for i in range(0, n, chunk):
            out = model(x[i : i + chunk])
            t = target[i : i + chunk]
            total_loss += loss(out, t) * len(t)
            correct += loss.correct(out, t)
    model.train()
    return float(total_loss) / n, float(correct) / n


def train(
    obj: TrainingObjective,
    params: dict[str, Any],
    seed: int,
    *,
    device: str = "cpu",
    on_epoch: Any = None,
    check_stop: Any = None,
    checkpoint: Any = None,
) -> tuple[nn.Module, list[EpochResult]]:
    """Train one configuration; ``on_epoch(result)`` runs after each epoch (reporting, pruning).

    ``checkpoint``: a :class:`hpo.objectives.checkpoints.Checkpointer` to resume from and save to, or None.

    Raises:
        Diverged: the training or validation loss became NaN or infinite.
    """
    splits = data_sources.load(obj.data)
    cfg = resolve_config(obj, params)
    loss = Loss(obj.loss, splits.n_classes)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_model(obj, cfg, splits.input_shape, loss.n_out).to(device)
    opt = build_optimizer(cfg, list(model.parameters()))
    with _threads_for(model, cfg.batch_size):
        return _train_loop(model, opt, loss, splits, cfg, gen, device, on_epoch, check_stop, checkpoint)


@contextlib.contextmanager
def _threads_for(model: nn.Module, rows: int) -> Iterator[None]:
    """One torch thread for a small step (:func:`hpo.threads.for_step`): splitting its tiny kernels across threads
    costs more than it saves (measured here: the lesson's model ran 5x slower per step with 2 threads than with 1 on a
    busy 2-core machine); else the worker's threads."""
    n_params = sum(p.numel() for p in model.parameters())
    with hpo_threads.use(hpo_threads.for_step(n_params, rows, torch.get_num_threads())):
        yield


def _train_loop(
    model: nn.Module,
    opt: torch.optim.Optimizer | LeanOptimizer,
    loss: Loss,
    splits: data_sources.Splits,
    cfg: TrainConfig,
    gen: torch.Generator,
    device: str,
    on_epoch: Any,
    check_stop: Any,
    checkpoint: Any = None,
) -> tuple[nn.Module, list[EpochResult]]:
    x = torch.from_numpy(splits.x_train).to(device)
    y = loss.target(torch.from_numpy(splits.y_train)).to(device)
    xv = torch.from_numpy(splits.x_val).to(device)
    yv = loss.target(torch.from_numpy(splits.y_val)).to(device)
    n, bs = len(x), cfg.batch_size
    history: list[EpochResult] = []
    manual = MLPGradients(model, loss.kind) if isinstance(model, MLP) and isinstance(opt, LeanOptimizer) else None
    first_epoch, resumed = 1, None
    loop_started, outside = time.perf_counter(), 0.0  # train_seconds: the loop's time, not on_epoch's
    if checkpoint is not None:
        from hpo.objectives import Interrupted
        from hpo.objectives.checkpoints import LoopState

        checkpoint.extra["history"] = history
        checkpoint.records["history"] = EpochResult  # saved as plain dicts (weights_only loading)
        resumed = checkpoint.load(model, opt, device)
        if resumed is not None:
            gen.set_state(resumed.gen_state)
            first_epoch = resumed.epoch + 1
    for epoch in range(first_epoch, cfg.epochs + 1):
        gen_before = gen.get_state() if checkpoint is not None else None
        perm = torch.randperm(n, generator=gen).to(device)
        xs, ys = x[perm], y[perm]
        losses = []
        first = 0
        if resumed is not None:  # the checkpoint's epoch goes on from the step it reached
            losses, first, resumed = resumed.losses, resumed.step * bs, None
        for i in range(first, n, bs):
            if checkpoint is not None:
                try:
                    if check_stop is not None:
                        check_stop()
                except Interrupted:  # asked to stop: save where the loop stands, so the copy loses nothing
                    checkpoint.save(model, opt, LoopState(epoch - 1, i // bs, losses, gen_before))
                    raise
                if i > first and checkpoint.due(False, epoch):
                    checkpoint.save(model, opt, LoopState(epoch - 1, i // bs, losses, gen_before))
            elif check_stop is not None:
                check_stop()
            if manual is not None:
                batch_loss, grads = manual(xs[i : i + bs], ys[i : i + bs])
                opt.step(grads)  # type: ignore[call-arg]
                losses.append(batch_loss)
                continue
            batch_loss = loss(model(xs[i : i + bs]), ys[i : i + bs])
            opt.zero_grad(set_to_none=True)
            batch_loss.backward()
            opt.step()
            losses.append(batch_loss.detach())
        train_loss = float(torch.stack(losses).mean())  # the one host sync of the epoch
        if not math.isfinite(train_loss):
            raise Diverged(f"training loss became {train_loss} in epoch {epoch}", epoch)
        val_loss, val_acc = evaluate(model, loss, xv, yv)
        if not math.isfinite(val_loss):
            raise Diverged(f"validation loss became {val_loss} in epoch {epoch}", epoch)
        seconds = time.perf_counter() - loop_started - outside
        steps = epoch * -(-n // bs)
        result = EpochResult(epoch, train_loss, val_loss, val_acc, seconds, steps, epoch * n)
        history.append(result)
        if on_epoch is not None:
            before = time.perf_counter()
            on_epoch(result)
            outside += time.perf_counter() - before
        if checkpoint is not None and checkpoint.due(True, epoch):
            checkpoint.save(model, opt, LoopState(epoch, 0, [], gen.get_state()))
    return model, history


class MLPGradients:
    """An MLP's batch loss and its gradients with the backward pass written out, for small models.

    For the lesson's ``[2, 10, 1]`` model at batch 16 the autograd engine (graph recording, ``backward``'s Python
    wrapper, the engine's scheduling) was ~45 % of a training step; the arithmetic is a few microseconds. Here the
    backward pass is the same arithmetic as autograd's, as explicit ops (two matrix products and a sum per layer,
    the activation's and the loss's own ``*_backward`` kernels): the same gradients up to float rounding
    (``tests/test_training.py`` compares them with autograd's, and whole trajectories). Population mode's stacked
    MLP (:class:`hpo.objectives.vectorised.StackedMLP`) does the same over K members.
    """

    def __init__(self, model: MLP, loss: str) -> None:
        self.layers = [(layer.weight, layer.bias) for layer in model.linears]
        self.act, self.activation, self.loss = ACTIVATION_FNS[model.activation], model.activation, loss

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the batch's mean loss, gradients in ``model.parameters()`` order)."""
        if x.dim() > 2:
            x = x.flatten(1)
        hs, zs = [x], []
        last = len(self.layers) - 1
        for j, (w, b) in enumerate(self.layers):
            z = torch.addmm(b, hs[-1], w.t())
            if j != last:
                zs.append(z)
                hs.append(self.act(z))
        value, dz = output_loss_and_grad(self.loss, z, y)
        grads: list[torch.Tensor] = [z] * (2 * len(self.layers))
        for j in range(last, -1, -1):
            grads[2 * j] = dz.t().mm(hs[j])
            grads[2 * j + 1] = dz.sum(0)
            if j:
                dh = dz.mm(self.layers[j][0])
                dz = activation_backward(self.activation, dh, zs[j - 1], hs[j])
        return value, grads


def output_loss_and_grad(
    kind: str, out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A loss over the rows of ``out`` and its gradient by ``out``: one model's ``(B, n_out)`` (the loss a scalar) or
    K members' ``(K, B, n_out)`` (each member's loss, ``(K,)``). ``mse`` on a sigmoid output, ``bce`` on logits,
    ``cross_entropy`` (targets: ``(..., B, 1)`` floats, or ``(..., B)`` class indices). The loss is each row's
    weighted by ``weight`` (``(K, B)``), or None: the mean over the rows, as :class:`Loss` computes it.
    Used by :class:`MLPGradients` and by population mode's stacked MLP."""
    w = 1.0 / out.shape[-2] if weight is None else weight.unsqueeze(-1)
    # The mean as sum(rows) * (1 / B): a sum and an in-place scale cost half of ``mean`` at these shapes.
    if kind == "mse":
        s = torch.sigmoid(out)
        diff = s - target
        sq = diff.square()
        value = sq.sum((-2, -1)).mul_(w) if weight is None else (sq.squeeze(-1) * weight).sum(-1)
        return value, torch.ops.aten.sigmoid_backward(diff * (2 * w), s)
    if kind == "bce":
        rows = nn.functional.binary_cross_entropy_with_logits(out, target, reduction="none").squeeze(-1)
        value = rows.sum(-1).mul_(w) if weight is None else (rows * weight).sum(-1)
        return value, (torch.sigmoid(out) - target).mul_(w)
    logp = torch.log_softmax(out, -1)  # cross entropy: its gradient is the softmax minus the one-hot target
    index = target.unsqueeze(-1)
    rows = -logp.gather(-1, index).squeeze(-1)
    value = rows.sum(-1).mul_(w) if weight is None else (rows * weight).sum(-1)
    grad = logp.exp_()
    grad.scatter_add_(-1, index, grad.new_full(index.shape, -1.0))
    return value, grad.mul_(w)


def activation_backward(kind: str, dh: torch.Tensor, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The gradient by ``z`` given ``dh``, the gradient by ``h = activation(z)``."""
    if kind == "relu":
        return torch.ops.aten.threshold_backward(dh, h, 0)
    if kind == "tanh":
        return torch.ops.aten.tanh_backward(dh, h)
    if kind == "sigmoid":
        return torch.ops.aten.sigmoid_backward(dh, h)
    return torch.ops.aten.gelu_backward(dh, z)


def test_accuracy(obj: TrainingObjective, model: nn.Module, device: str = "cpu") -> float:
    """Accuracy on the held-out test split (never used for selection)."""
    splits = data_sources.load(obj.data)
    if len(splits.y_test) == 0:
        raise optuna.exceptions.OptunaError("this data source has no test split")
    loss = Loss(obj.loss, splits.n_classes)
    xt = torch.from_numpy(splits.x_test).to(device)
    yt = loss.target(torch.from_numpy(splits.y_test)).to(device)
    return evaluate(model, loss, xt, yt)[1]


def objective(trial: optuna.trial.BaseTrial, ctx: Context) -> float | tuple[float, ...]:
    """Train the trial's configuration; report the study's metric every epoch; prune on request or divergence.

    With several objectives: return the metrics as a tuple in the file's ``metrics`` order; report nothing."""
    obj = ctx.spec.objective
    assert isinstance(obj, TrainingObjective)
    names = ctx.spec.metric_names
    metric, multi = names[0], ctx.spec.multi_objective
    for name in names:
        if name not in METRICS + (COMPUTE_METRICS if multi else ()):
            raise optuna.exceptions.OptunaError(f"metric {name!r} is not produced by the training objective")
    curve: list[float] = []
    used: dict[str, Any] = {}  # the torch threads training ran with, read inside it (hpo.threads)
    from hpo.objectives.checkpoints import checkpoint_for

    ckpt = checkpoint_for(trial, obj.checkpoint)
    if ckpt is not None:
        ckpt.extra["curve"] = curve

    def on_epoch(r: EpochResult) -> None:
        used.setdefault("threads", torch.get_num_threads())
        curve.append(round(r.train_loss, 6))
        if multi:  # Optuna prunes (and takes reports of) single-objective trials only
            return
        value = r.metric(metric)
        trial.report(value, r.epoch)
        if trial.should_prune():
            set_trial_attrs(trial, {"epochs_reached": r.epoch, "train_loss": curve, "reason": "pruned", **used})
            raise optuna.TrialPruned(f"pruned at epoch {r.epoch} with {metric}={value:.4g}")

    try:
        model, history = train(
            obj, ctx.params, ctx.seed, device=ctx.device, on_epoch=on_epoch, check_stop=ctx.check_stop, checkpoint=ckpt
        )
    except optuna.TrialPruned:
        if ckpt is not None:
            ckpt.finish()
        raise
    except Diverged as exc:
        if ckpt is not None:
            ckpt.finish()
        attrs = {"reason": "diverged", "diverged_epoch": exc.args[1], "epochs_reached": exc.args[1] - 1}
        set_trial_attrs(trial, {**attrs, "train_loss": curve, **used})
        raise optuna.TrialPruned(f"diverged: {exc.args[0]}") from None
    last = history[-1]
    done: dict[str, Any] = {
        "epochs_reached": last.epoch,
        "train_loss": curve,
        "val_loss": round(last.val_loss, 6),
        "val_accuracy": round(last.val_accuracy, 6),
        "train_seconds": round(last.train_seconds, 3),
        "optimizer_steps": last.optimizer_steps,
        "samples_seen": last.samples_seen,
        **used,
    }
    if obj.evaluate_test:
        done["test_accuracy"] = test_accuracy(obj, model, ctx.device)
    set_trial_attrs(trial, done)
    if ckpt is not None:
        ckpt.finish()
    if multi:  # train_seconds as stored (ms), so the value and the attribute agree
        return tuple(float(done[n]) if n in COMPUTE_METRICS else last.metric(n) for n in names)
    return last.metric(metric)


def evaluate_on_test(spec: Any, frozen: optuna.trial.FrozenTrial) -> tuple[float, float]:
    """Re-train a stored trial with its seed and parameters; return (its (first) metric again, test accuracy)."""
    from hpo import space
    from hpo.errors import HpoError

    obj = spec.objective
    if not isinstance(obj, TrainingObjective):
        raise HpoError(f"evaluate: the {obj.kind!r} objective has no test split to evaluate on")
    params = space.suggest(optuna.trial.FixedTrial(frozen.params, frozen.number), spec.space)
    seed = int(frozen.user_attrs.get("seed", 0))
    model, history = train(obj, params, seed, device=str(frozen.user_attrs.get("device", "cpu")))
    return history[-1].metric(spec.metric_names[0]), test_accuracy(
        obj, model, str(frozen.user_attrs.get("device", "cpu"))
    )
