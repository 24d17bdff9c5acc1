"""Grokking: modular arithmetic, where the time to generalise is what the hyperparameters decide.

A trial trains the operand MLP or the one-layer transformer (``model.kind``) with AdamW, full batch unless
``batch_size`` is set, for ``steps`` steps. Every ``eval_every`` steps it measures training and validation accuracy.
The metric, ``steps_to_generalise``, is the first evaluated step at which validation accuracy reaches ``threshold``;
a trial that never gets there is censored at ``steps + eval_every`` (one evaluation past the budget), so every
trial has a value and "never" ranks behind "at the last step". Studies minimise it.

What goes to the pruner: at each evaluation step the trial reports the value its metric would have if training
ended there, censored at the full budget: the step at which it reached the threshold, or ``steps + eval_every`` while
it has not. It is in the metric's own units, lower is better as in the study's direction, it only ever improves (from
"censored" to the step it generalised), and the final value is the last one reported. Optuna's median and percentile
pruners compare a trial's best value so far with the other trials' values at the same step, so a trial is stopped
once it has not generalised by a step at which most finished trials had; during the plateau, when no trial has
generalised, all values tie and nothing is pruned on noise (reporting ``1 - val_accuracy`` would prune half the
trials there on differences of a few validation examples). Successive halving and Hyperband promote the trials that
generalised by a rung. A trial that stops at the threshold (``stop_at_threshold``) reports its now-fixed value for
the remaining evaluation steps too, so that pruners comparing trials at equal steps still see it. ``memorise_by``
prunes a trial whose training accuracy is still below 0.99 at that step (``reason=not_memorised``): weight decay too
large, or a learning rate too small, to learn at all.

A loss that becomes NaN or infinite prunes the trial with ``reason=diverged``, as in the training objective.

With ``checkpoint`` (as the training objective's, :mod:`hpo.objectives.checkpoints`) a trial saves its state every
``every_steps`` steps (default: at every evaluation) and when its worker is stopped; a re-queued copy resumes from the
step saved (``resumed_from``: steps done) and ends with the same curve and value as an uninterrupted run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import optuna
import pydantic
import torch
from torch import nn

from hpo import data as data_sources
from hpo import threads as hpo_threads
from hpo.errors import SpecError
from hpo.models import ModularTransformer, OperandMLP
from hpo.objectives import Context
from hpo.spec import GrokkingObjective, ModularData

METRIC = "steps_to_generalise"
MEMORISED = 0.99


@dataclass(frozen=True)
class GrokConfig:
    """A trial's resolved settings: the objective's fields overridden by the trial's parameters."""

    data: ModularData
    steps: int
    batch_size: int | None
    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    layers: tuple[int, ...]
    activation: str
    d_model: int
    n_heads: int
    d_mlp: int


def resolve_config(obj: GrokkingObjective, params: dict[str, Any]) -> GrokConfig:
    """Merge the objective's fields with a trial's parameters.

    ``train_fraction``, ``p`` and ``op`` override the data; ``layers`` (a list), or ``width`` x ``depth``, the MLP's
    hidden layers; ``d_model``, ``n_heads``, ``d_mlp`` the transformer.

    Raises:
        SpecError: a parameter outside what the objective accepts (one line naming it).
    """
    data = obj.data
    overrides = {k: params[k] for k in ("train_fraction", "p", "op") if k in params}
    if overrides:
        try:
            data = ModularData.model_validate({**data.model_dump(), **overrides})
        except pydantic.ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            field = ".".join(str(x) for x in err["loc"]) or next(iter(overrides))
            msg = str(err["msg"]).removeprefix("Value error, ")
            raise SpecError(f"space.{field}: {msg}") from None
    layers = list(obj.model.layers)
    if "layers" in params:
        layers = list(params["layers"]) if isinstance(params["layers"], list) else [int(params["layers"])]
    elif "width" in params or "depth" in params:
        layers = [int(params.get("width", layers[0] if layers else 200))] * int(params.get("depth", len(layers)))
    batch_size = params.get("batch_size", obj.batch_size)
    cfg = GrokConfig(
        data=data,
        steps=int(params.get("steps", obj.steps)),
        batch_size=None if batch_size in (None, "full") else int(batch_size),
        lr=float(params.get("lr", obj.lr)),
        weight_decay=float(params.get("weight_decay", obj.weight_decay)),
        beta1=float(params.get("beta1", obj.beta1)),
        beta2=float(params.get("beta2", obj.beta2)),
        layers=tuple(layers),
        activation=str(params.get("activation", obj.model.activation)),
        d_model=int(params.get("d_model", obj.model.d_model)),
        n_heads=int(params.get("n_heads", obj.model.n_heads)),
        d_mlp=int(params.get("d_mlp", obj.model.d_mlp)),
    )
    checks = {
        "steps": cfg.steps >= 1,
        "lr": cfg.lr > 0,
        "weight_decay": cfg.weight_decay >= 0,
        "beta1": 0 <= cfg.beta1 < 1,
        "beta2": 0 <= cfg.beta2 < 1,
        "batch_size": cfg.batch_size is None or cfg.batch_size >= 1,
        "layers": all(n >= 1 for n in cfg.layers),
        "d_model": cfg.d_model >= 1 and cfg.n_heads >= 1 and cfg.d_model % cfg.n_heads == 0,
    }
    for name, ok in checks.items():
        if not ok:
            raise SpecError(f"space.{name}: value out of range for the grokking objective")
    return cfg


def build_model(obj: GrokkingObjective, cfg: GrokConfig) -> nn.Module:
    p = cfg.data.p
    if obj.model.kind == "transformer":
        return ModularTransformer(p, cfg.d_model, cfg.n_heads, cfg.d_mlp, obj.model.n_layers)
    if obj.model.kind == "mlp":
        return OperandMLP(p, list(cfg.layers), cfg.activation)
    raise SpecError(f"objective.model.kind: the grokking objective takes mlp or transformer (got {obj.model.kind!r})")


@dataclass
class Evaluation:
    step: int
    train_loss: float
    train_accuracy: float
    val_accuracy: float


class Diverged(Exception):
    pass


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.inference_mode():
        correct = sum(
            int((model(x[i : i + 16384]).argmax(1) == y[i : i + 16384]).sum()) for i in range(0, len(x), 16384)
        )
    model.train()
    return correct / max(len(x), 1)


def train(
    obj: GrokkingObjective,
    params: dict[str, Any],
    seed: int,
    *,
    device: str = "cpu",
    on_eval: Any = None,
    check_stop: Any = None,
    checkpoint: Any = None,
    on_resume: Any = None,
) -> list[Evaluation]:
    """Train one configuration; ``on_eval(evaluation)`` runs after each evaluation and returns True to stop.

    ``checkpoint``: a :class:`hpo.objectives.checkpoints.Checkpointer` to resume from and save to, or None. It saves
    after every ``every_steps``-th step's evaluation (default: every evaluation) and, when asked to stop, before the
    next step; its "epoch" is the number of steps done. It holds what the loop carries between steps (the loss summed
    since the last evaluation, the minibatch order and its cursor) and the evaluations so far, so a resumed trial goes
    on exactly as an uninterrupted one.

    Raises:
        Diverged: the training loss became NaN or infinite (args: message, step).
    """
    cfg = resolve_config(obj, params)
    splits = data_sources.load(cfg.data)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_model(obj, cfg).to(device)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        weight_decay=cfg.weight_decay,
        foreach=device != "cpu",
    )
    x = torch.from_numpy(splits.x_train).to(device)
    y = torch.from_numpy(splits.y_train).to(device)
    xv = torch.from_numpy(splits.x_val).to(device)
    yv = torch.from_numpy(splits.y_val).to(device)
    n = len(x)
    bs = cfg.batch_size if cfg.batch_size is not None and cfg.batch_size < n else None
    perm, cursor = None, n
    history: list[Evaluation] = []
    total = torch.zeros((), device=device)
    since, first = 0, 1
    every = obj.eval_every
    if checkpoint is not None:
        from hpo.objectives import Interrupted
        from hpo.objectives.checkpoints import LoopState

        every = checkpoint.cfg.every_steps or obj.eval_every
        loop: list[Any] = []  # [steps since the last evaluation, cursor, minibatch order]: filled at each save
        checkpoint.extra["history"], checkpoint.records["history"] = history, Evaluation
        checkpoint.extra["loop"] = loop
        resumed = checkpoint.load(model, opt, device)
        if resumed is not None:
            first = resumed.epoch + 1
            gen.set_state(resumed.gen_state)
            total = resumed.losses[0].to(device)
            since, cursor, perm = loop[0], loop[1], None if loop[2] is None else loop[2].to(device)
            if on_resume is not None:
                on_resume(history)

        def save(done: int) -> None:
            loop[:] = [since, cursor, None if perm is None else perm.cpu()]
            checkpoint.save(model, opt, LoopState(done, 0, [total], gen.get_state()))

    for step in range(first, cfg.steps + 1):
        if checkpoint is not None:
            try:
                if check_stop is not None:
                    check_stop()
            except Interrupted:  # asked to stop: save where the loop stands, so the copy loses nothing
                if step > first:
                    save(step - 1)
                raise
        elif check_stop is not None:
            check_stop()
        if bs is None:
            xb, yb = x, y
        else:
            if cursor + bs > n:
                perm, cursor = torch.randperm(n, generator=gen).to(device), 0
            idx = perm[cursor : cursor + bs]
            cursor += bs
            xb, yb = x[idx], y[idx]
        loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach()
        since += 1
        if step % obj.eval_every == 0 or step == cfg.steps:
            train_loss = float(total) / since
            total.zero_()
            since = 0
            if not math.isfinite(train_loss):
                raise Diverged(f"training loss became {train_loss} by step {step}", step)
            ev = Evaluation(step, train_loss, _accuracy(model, x, y), _accuracy(model, xv, yv))
            history.append(ev)
            if on_eval is not None and on_eval(ev):
                break
        if checkpoint is not None and step % every == 0 and step < cfg.steps:
            save(step)
    return history


def censored(obj: GrokkingObjective, steps: int) -> int:
    """The metric of a trial that never reached the threshold within ``steps``: one evaluation past the budget."""
    return steps + obj.eval_every


def objective(trial: optuna.trial.BaseTrial, ctx: Context) -> float:
    """Train the trial's configuration; return the first step at which validation accuracy reached the threshold."""
    obj = ctx.spec.objective
    assert isinstance(obj, GrokkingObjective)
    if ctx.spec.metric != METRIC:
        raise SpecError(f"metric: the grokking objective produces {METRIC!r} (got {ctx.spec.metric!r})")
    if ctx.spec.direction != "minimize":
        raise SpecError(f"direction: {METRIC} is minimised (got {ctx.spec.direction!r})")
    steps = resolve_config(obj, ctx.params).steps
    started = time.perf_counter()
    state: dict[str, Any] = {"generalised_at": None, "memorised_at": None, "last": None}
    curve: dict[str, list[float]] = {"step": [], "train_accuracy": [], "val_accuracy": []}
    from hpo.objectives.checkpoints import checkpoint_for

    ckpt = checkpoint_for(trial, obj.checkpoint)
    marks: list[Any] = [None, None]  # generalised_at, memorised_at: what a checkpoint carries of ``state``
    if ckpt is not None:
        ckpt.extra.update({f"curve.{key}": values for key, values in curve.items()})
        ckpt.extra["marks"] = marks

    def record(last: Evaluation | None) -> None:
        g = state["generalised_at"]
        trial.set_user_attr("steps_reached", last.step if last else 0)
        trial.set_user_attr("train_accuracy", round(last.train_accuracy, 6) if last else None)
        trial.set_user_attr("val_accuracy", round(last.val_accuracy, 6) if last else None)
        trial.set_user_attr("memorised_step", state["memorised_at"])
        trial.set_user_attr("generalised", g is not None)
        trial.set_user_attr(METRIC, g if g is not None else censored(obj, steps))
        trial.set_user_attr("curve", curve)
        trial.set_user_attr("train_seconds", round(time.perf_counter() - started, 3))

    def on_eval(ev: Evaluation) -> bool:
        state["last"] = ev
        for key in curve:
            curve[key].append(round(getattr(ev, key), 4) if key != "step" else ev.step)
        if state["memorised_at"] is None and ev.train_accuracy >= MEMORISED:
            state["memorised_at"] = ev.step
        if state["generalised_at"] is None and ev.val_accuracy >= obj.threshold:
            state["generalised_at"] = ev.step
        marks[:] = [state["generalised_at"], state["memorised_at"]]
        g = state["generalised_at"]
        value = float(g if g is not None else censored(obj, steps))
        trial.report(value, ev.step)
        if obj.memorise_by is not None and state["memorised_at"] is None and ev.step >= obj.memorise_by:
            record(ev)
            trial.set_user_attr("reason", "not_memorised")
            raise optuna.TrialPruned(f"training accuracy {ev.train_accuracy:.3f} < {MEMORISED} at step {ev.step}")
        if trial.should_prune():
            record(ev)
            trial.set_user_attr("reason", "pruned")
            raise optuna.TrialPruned(f"pruned at step {ev.step}: not generalised yet")
        if g is not None and obj.stop_at_threshold:
            # The metric is fixed now; let pruners that compare at equal steps see it at every later step.
            for later in range(ev.step + obj.eval_every, steps + 1, obj.eval_every):
                trial.report(value, later)
            if steps % obj.eval_every and ev.step < steps:
                trial.report(value, steps)
            return True
        return False

    cfg = resolve_config(obj, ctx.params)
    with torch.device("meta"):  # the model's size, without its memory (hpo.threads: one thread for a small step)
        size = sum(p.numel() for p in build_model(obj, cfg).parameters())
    rows = cfg.batch_size or round(cfg.data.p**2 * cfg.data.train_fraction)

    def resumed(history: list[Evaluation]) -> None:  # a checkpoint was loaded: go on from what it holds
        state["generalised_at"], state["memorised_at"] = marks
        state["last"] = history[-1] if history else None

    try:
        with hpo_threads.use(hpo_threads.for_step(size, rows, torch.get_num_threads())) as used:
            trial.set_user_attr("threads", used)
            train(
                obj, ctx.params, ctx.seed, device=ctx.device, on_eval=on_eval, check_stop=ctx.check_stop,
                checkpoint=ckpt, on_resume=resumed,
            )  # fmt: skip
    except optuna.TrialPruned:
        if ckpt is not None:
            ckpt.finish()
        raise
    except Diverged as exc:
        if ckpt is not None:
            ckpt.finish()
        record(state["last"])
        trial.set_user_attr("reason", "diverged")
        trial.set_user_attr("diverged_step", exc.args[1])
        raise optuna.TrialPruned(f"diverged: {exc.args[0]}") from None
    record(state["last"])
    if ckpt is not None:
        ckpt.finish()
    g = state["generalised_at"]
    return float(g if g is not None else censored(obj, steps))
