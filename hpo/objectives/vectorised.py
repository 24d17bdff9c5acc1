"""K models trained as one: stacked parameters, a vectorised optimizer, per-member losses.

Every member's parameters live in one row of a flat ``(K, P)`` leaf tensor, so autograd gives every member's
gradient in one ``(K, P)`` tensor and the optimizer updates all members with a dozen element-wise operations,
whatever the number of layers. Per-step overhead, which dominates small models, is paid once for all K.

* :class:`StackedMLP` builds hpo's MLP natively: each linear layer over K members is one ``torch.baddbmm`` with the
  weights viewed as ``(K, in, out)``. Each member is initialised exactly as :func:`hpo.models.mlp` initialises it
  under ``torch.manual_seed(seed)`` (the single model is built and its parameters copied into the row), so a member
  starts where the single-trial run with the same seed starts.
* :class:`FuncStack` is the fallback for any other module (hpo's CNN): members stacked with
  ``torch.func.stack_module_state`` and run with ``vmap(functional_call)``.
* :class:`VecOptimizer` reproduces ``torch.optim``'s update math for SGD (with momentum, PyTorch's buffer
  initialisation on the first step, coupled weight decay), Adam (bias correction), AdamW (decoupled decay) and RMSprop
  (``eps`` added after the square root, ``alpha=0.99``), with every hyperparameter a per-member value and the kind
  itself per member, so members with different optimizers share one stacked model.
* :func:`row_losses` gives each member's loss per example (``mse`` on a sigmoid output, ``bce`` on logits,
  ``cross_entropy``); the caller averages over each member's own batch and sums over members before ``backward``,
  which keeps every member's gradient exactly its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from hpo.models import ACTIVATION_FNS, mlp
from hpo.objectives.training import activation_backward, output_loss_and_grad

OPTIMIZER_KINDS = ("sgd", "sgd_momentum", "adam", "adamw", "rmsprop")
RMSPROP_ALPHA = 0.99  # torch.optim.RMSprop's default, which hpo's single-trial loop uses
EPS = 1e-8  # Adam's, AdamW's and RMSprop's default eps


def _flatten(modules: Sequence[nn.Module]) -> torch.Tensor:
    """One row per module: its parameters, in ``parameters()`` order, flattened and concatenated."""
    return torch.stack([torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in modules])


class StackedModel:
    """A model over K members whose parameters are the rows of a flat ``(K, P)`` tensor passed to ``forward``."""

    n_params: int
    shapes: list[tuple[int, ...]]

    def forward(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def loss_and_grad(
        self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, loss: str, weight: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member's loss ``sum_i weight_i * loss_i`` over its rows, ``(K,)``, and its gradient, ``(K, P)``.

        ``weight`` is ``(K, B)``, or None for each member's mean over its B rows. The members' losses are summed
        for ``backward``, so each row of the gradient is exactly its own member's.
        """
        p = flat.detach().requires_grad_(True)
        rows = row_losses(loss, self.forward(p, x), y)
        member = rows.mean(1) if weight is None else (rows * weight).sum(1)
        (grad,) = torch.autograd.grad(member.sum(), p)
        return member.detach(), grad

    def unflatten(self, row: torch.Tensor) -> list[torch.Tensor]:
        """One member's parameters, shaped as the single model's ``parameters()``."""
        out, i = [], 0
        for shape in self.shapes:
            n = math.prod(shape)
            out.append(row[i : i + n].view(shape))
            i += n
        return out


class StackedMLP(StackedModel):
    """hpo's MLP (``[in, *layers, out]``, activation between layers) over K members as batched matmuls.

    ``forward(flat, x)``: ``x`` is ``(K, B, *input_shape)``, the result ``(K, B, out)``.
    """

    def __init__(self, in_features: int, layers: Sequence[int], out_features: int, activation: str = "relu") -> None:
        self.sizes = [in_features, *layers, out_features]
        self.act = ACTIVATION_FNS[activation]
        self.activation = activation
        self.shapes = []
        self.offsets: list[tuple[int, int, int, int]] = []  # weight start, bias start, in, out
        i = 0
        for a, b in zip(self.sizes[:-1], self.sizes[1:], strict=True):
            self.offsets.append((i, i + a * b, a, b))
            self.shapes += [(b, a), (b,)]
            i += a * b + b
        self.n_params = i
        self._cached: tuple[tuple[int, int, torch.device], list[tuple[torch.Tensor, ...]]] | None = None

    def init(self, seeds: Sequence[int]) -> torch.Tensor:
        """``(K, P)`` parameters: member k as ``torch.manual_seed(seeds[k]); hpo.models.mlp(...)`` initialises it."""
        models = []
        for s in seeds:
            torch.default_generator.manual_seed(s)  # what torch.manual_seed does for the CPU, without the rest
            models.append(mlp(self.sizes[0], self.sizes[1:-1], self.sizes[-1], self.activation))
        return _flatten(models)

    def _weights(self, flat: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        w0, b0, a, b = self.offsets[j]
        k = flat.shape[0]
        return flat[:, w0 : w0 + a * b].view(k, b, a), flat[:, b0 : b0 + b].view(k, 1, b)

    def _layers(self, flat: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(weight, its transpose, bias) views of each layer, made once per parameter tensor: the optimizer updates
        ``flat`` in place, so the views stay valid. (The cache keeps the tensor alive, so no other tensor can take
        its address while it is cached.)"""
        key = (flat.data_ptr(), flat.shape[0], flat.device)
        if self._cached is None or self._cached[0] != key:
            views = []
            for j in range(len(self.offsets)):
                w, bias = self._weights(flat, j)
                views.append((w, w.transpose(1, 2), bias))
            self._cached = (key, views)
        return self._cached[1]

    def forward(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        k = flat.shape[0]
        h = x.reshape(k, x.shape[1], -1)
        last = len(self.offsets) - 1
        for j in range(len(self.offsets)):
            w, bias = self._weights(flat, j)
            h = torch.baddbmm(bias, h, w.transpose(1, 2))
            if j != last:
                h = self.act(h)
        return h

    def loss_and_grad(
        self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, loss: str, weight: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As the base class's, with the backward pass written out (two batched matmuls per layer) instead of
        autograd's: for small models autograd's bookkeeping costs more than the arithmetic. (``flat`` is a plain
        tensor, so no graph is recorded.)"""
        k = flat.shape[0]
        layers = self._layers(flat)
        hs = [x.reshape(k, x.shape[1], -1)]
        zs: list[torch.Tensor] = []
        last = len(layers) - 1
        for j, (_, wt, bias) in enumerate(layers):
            z = torch.baddbmm(bias, hs[-1], wt)
            if j != last:
                zs.append(z)
                hs.append(self.act(z))
        member, dz = output_loss_and_grad(loss, z, y, weight)
        grads: list[torch.Tensor] = [flat] * (2 * len(layers))
        for j in range(last, -1, -1):
            grads[2 * j] = torch.bmm(dz.transpose(1, 2), hs[j]).view(k, -1)
            grads[2 * j + 1] = dz.sum(1)
            if j:
                dh = torch.bmm(dz, layers[j][0])
                dz = activation_backward(self.activation, dh, zs[j - 1], hs[j])
        return member, torch.cat(grads, 1)


class FuncStack(StackedModel):
    """Any module over K members: ``torch.func.stack_module_state`` + ``vmap(functional_call)`` (no buffers)."""

    def __init__(self, build: Callable[[], nn.Module]) -> None:
        self.build = build
        template = build()
        if list(template.buffers()):
            raise ValueError("FuncStack stacks parameters only; this module has buffers")
        self.names = [n for n, _ in template.named_parameters()]
        self.shapes = [tuple(p.shape) for p in template.parameters()]
        self.n_params = sum(p.numel() for p in template.parameters())
        self.template = template.to("meta")

        def one(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(self.template, params, (x,))

        self._call = torch.func.vmap(one)

    def init(self, seeds: Sequence[int]) -> torch.Tensor:
        models = []
        for s in seeds:
            torch.manual_seed(s)
            models.append(self.build())
        params, _ = torch.func.stack_module_state(models)
        return torch.cat([params[n].detach().reshape(len(models), -1) for n in self.names], dim=1)

    def forward(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        k = flat.shape[0]
        params, i = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            n = math.prod(shape)
            params[name] = flat[:, i : i + n].view(k, *shape)
            i += n
        return self._call(params, x)


# --------------------------------------------------------------------------- optimizer


class VecOptimizer:
    """SGD, SGD with momentum, Adam, AdamW and RMSprop over the rows of a flat ``(K, P)`` parameter tensor.

    Every member has its own kind, learning rate, momentum, weight decay and betas; all follow one update written
    with per-member coefficients (``s1``: momentum buffer / first moment / gradient; ``s2``: second moment)::

        g  = grad + wd_coupled * p                   # SGD, Adam, RMSprop: weight decay added to the gradient
        p  = p * (1 - lr * wd_decoupled)             # AdamW: decoupled decay, before the update
        s1 = a1 * s1 + c1 * g                        # sgd: (0, 1)  momentum: (m, 1)  adam: (b1, 1-b1)  rmsprop: (0, 1)
        s2 = a2 * s2 + c2 * g * g                    # adam: (b2, 1-b2)  rmsprop: (0.99, 0.01)  sgd: (0, 0)
        p  = p - step_size * s1 / (sqrt(s2) / bc2 + eps)   # sgd: eps = 1, so the denominator is 1

    with Adam's bias corrections ``step_size = lr / (1 - b1^t)``, ``bc2 = sqrt(1 - b2^t)``, ``t`` each member's own
    step count. PyTorch's SGD starts its momentum buffer at the first gradient; ``m * 0 + g`` is the same value.
    A member that does not step this time gets ``a = 1, c = 0, step_size = 0``: its state is left as it was.
    """

    def __init__(self) -> None:
        self.kind: list[str] = []
        z = np.zeros(0)
        self.lr, self.momentum, self.wd, self.beta1, self.beta2 = z, z, z, z, z
        self.steps = np.zeros(0, dtype=np.int64)
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None
        self._static()

    def add(
        self, kind: str, lr: float, momentum: float, weight_decay: float, beta1: float, beta2: float, n_params: int
    ) -> None:
        if kind not in OPTIMIZER_KINDS:
            raise ValueError(f"unknown optimizer {kind!r}")
        self.kind.append(kind)
        self.lr = np.append(self.lr, lr)
        self.momentum = np.append(self.momentum, momentum if kind == "sgd_momentum" else 0.0)
        self.wd = np.append(self.wd, weight_decay)
        self.beta1 = np.append(self.beta1, beta1)
        self.beta2 = np.append(self.beta2, beta2)
        self.steps = np.append(self.steps, 0)
        for name in ("s1", "s2"):
            state = getattr(self, name)
            if state is not None:
                setattr(self, name, torch.cat([state, state.new_zeros(1, n_params)]))
        self._static()

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only these members (in this order): the others leave, their state with them."""
        idx = list(rows)
        self.kind = [self.kind[i] for i in idx]
        for name in ("lr", "momentum", "wd", "beta1", "beta2", "steps"):
            setattr(self, name, getattr(self, name)[idx])
        for name in ("s1", "s2"):
            state = getattr(self, name)
            if state is not None:
                setattr(self, name, state[idx])
        self._static()

    def _static(self) -> None:
        kind = np.array(self.kind, dtype=object)
        self.adam = np.isin(kind, ("adam", "adamw"))
        self.rms = kind == "rmsprop"
        adaptive = self.adam | self.rms
        self.a1 = np.where(self.adam, self.beta1, self.momentum)
        self.c1 = np.where(self.adam, 1.0 - self.beta1, 1.0)
        self.a2 = np.where(self.adam, self.beta2, np.where(self.rms, RMSPROP_ALPHA, 0.0))
        self.c2 = np.where(self.adam, 1.0 - self.beta2, np.where(self.rms, 1.0 - RMSPROP_ALPHA, 0.0))
        self.eps = np.where(adaptive, EPS, 1.0)
        decoupled = kind == "adamw"
        self.wd_coupled = np.where(decoupled, 0.0, self.wd)
        self.wd_decoupled = np.where(decoupled, self.wd, 0.0)
        self.any_adaptive = bool(adaptive.any())
        self.any_momentum = bool((self.a1 != 0).any())
        self.any_coupled = bool((self.wd_coupled != 0).any())
        self.any_decoupled = bool((self.wd_decoupled != 0).any())
        self.any_adam = bool(self.adam.any())
        self._all_on: tuple[torch.Tensor, ...] | None = None

    def _corrections(self, steps: np.ndarray, on: np.ndarray | None = None) -> torch.Tensor:
        """Rows 0 (step size, with Adam's first-moment correction) and 5 (Adam's sqrt(1 - b2^t))."""
        t = np.maximum(steps, 1)
        bc1 = np.where(self.adam, 1.0 - self.beta1**t, 1.0)
        bc2 = np.where(self.adam, np.sqrt(1.0 - self.beta2**t), 1.0)
        size = self.lr / bc1 if on is None else np.where(on, self.lr / bc1, 0.0)
        return torch.from_numpy(np.stack([size, bc2]).astype(np.float32))

    def _coefficients(self, on: np.ndarray) -> torch.Tensor:
        """``(9, K, 1)``: step size, a1, c1, a2, c2, bc2, eps, coupled decay, decoupled factor; a member that does
        not step gets ``a = 1, c = 0``, step size 0 and factor 1, which leave its state and parameters as they are."""
        corr = self._corrections(self.steps, on).numpy()
        rows = [
            corr[0],
            np.where(on, self.a1, 1.0),
            np.where(on, self.c1, 0.0),
            np.where(on, self.a2, 1.0),
            np.where(on, self.c2, 0.0),
            corr[1],
            self.eps,
            self.wd_coupled,
            np.where(on, 1.0 - self.lr * self.wd_decoupled, 1.0),
        ]
        return torch.from_numpy(np.stack(rows).astype(np.float32)).unsqueeze(-1)

    def step(self, p: torch.Tensor, grad: torch.Tensor, stepping: np.ndarray | None = None) -> None:
        """Update the rows of ``p`` (a plain tensor, in place) whose ``stepping`` entry is true (all rows when it
        is None)."""
        if stepping is None:  # every member steps: the coefficients other than Adam's corrections are fixed
            self.steps += 1
            if self._all_on is None or self._all_on[0].device != p.device:
                self._all_on = self._coefficients(np.ones(len(self.kind), dtype=bool)).to(p.device).unbind(0)
            coefs = self._all_on
            if self.any_adam:
                size, bc2 = self._corrections(self.steps).to(p.device).unsqueeze(-1).unbind(0)
                coefs = (size, *coefs[1:5], bc2, *coefs[6:])
        else:
            self.steps = self.steps + stepping
            coefs = self._coefficients(stepping).to(p.device).unbind(0)
        step_size, a1, c1, a2, c2, bc2_t, eps, wd_c, decay = coefs
        g = grad.addcmul(p, wd_c) if self.any_coupled else grad
        if self.any_decoupled:
            p.mul_(decay)
        if not self.any_adaptive and not self.any_momentum:
            p.addcmul_(g, step_size, value=-1.0)  # plain SGD for every member: p - lr * g
            return
        if self.s1 is None:
            self.s1 = torch.zeros_like(p)
        self.s1.mul_(a1).addcmul_(g, c1)
        if not self.any_adaptive:
            p.addcmul_(self.s1, step_size, value=-1.0)
            return
        if self.s2 is None:
            self.s2 = torch.zeros_like(p)
        self.s2.mul_(a2).addcmul_(g, g * c2)
        denom = self.s2.sqrt().div_(bc2_t).add_(eps)
        p.sub_((self.s1 * step_size).div_(denom))


# --------------------------------------------------------------------------- losses


def row_losses(kind: str, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each member's loss per example, ``(K, B)``: ``mse`` on a sigmoid output, ``bce`` on logits, ``cross_entropy``.

    ``out`` is ``(K, B, n_out)``; ``target`` is ``(K, B, 1)`` floats for mse/bce, ``(K, B)`` class indices otherwise.
    """
    if kind == "mse":
        return (torch.sigmoid(out) - target).square().squeeze(-1)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(out, target, reduction="none").squeeze(-1)
    k, b = out.shape[:2]
    return F.cross_entropy(out.reshape(k * b, -1), target.reshape(-1), reduction="none").view(k, b)


def row_correct(kind: str, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each member's number of correct predictions, ``(K,)``."""
    if kind in ("mse", "bce"):
        return ((out > 0).to(target.dtype) == target).squeeze(-1).sum(1)
    return (out.argmax(-1) == target).sum(1)


__all__ = [
    "FuncStack",
    "OPTIMIZER_KINDS",
    "StackedMLP",
    "StackedModel",
    "VecOptimizer",
    "row_correct",
    "row_losses",
]
