"""Lean optimizers for small models: torch.optim's update rules without its per-call machinery.

For the lesson's ``[2, 10, 1]`` model a training step costs a few microseconds of arithmetic, and
``torch.optim.Optimizer.step`` (hooks, profiler records, per-parameter state dictionaries, one kernel per tensor on
the CPU) costs more than the forward pass. :class:`LeanOptimizer` applies the same arithmetic as torch.optim's
``foreach`` implementation — SGD (with momentum and weight decay), Adam, AdamW, RMSprop — with one ``torch._foreach_*``
call per line of the update. ``tests/test_optim.py`` checks that its trajectories equal torch.optim's.
"""

from __future__ import annotations

import math

import torch
from torch import nn

RMSPROP_ALPHA = 0.99
EPS = 1e-8


class LeanOptimizer:
    """One of ``sgd``, ``sgd_momentum``, ``adam``, ``adamw``, ``rmsprop`` over a list of parameters.

    Example:
        >>> opt = LeanOptimizer(list(model.parameters()), "adam", lr=1e-3)  # doctest: +SKIP
        >>> loss.backward(); opt.step(); opt.zero_grad()  # doctest: +SKIP
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        kind: str,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        if kind not in ("sgd", "sgd_momentum", "adam", "adamw", "rmsprop"):
            raise ValueError(f"unknown optimizer {kind!r}")
        self.params = params
        self.kind, self.lr, self.weight_decay = kind, lr, weight_decay
        self.momentum = momentum if kind == "sgd_momentum" else 0.0
        self.beta1, self.beta2 = betas
        self.t = 0
        self.buf: list[torch.Tensor] | None = None  # momentum buffer / Adam's first moment
        self.sq: list[torch.Tensor] | None = None  # Adam's second moment / RMSprop's square average
        if kind in ("adam", "adamw"):
            self.buf = [torch.zeros_like(p) for p in params]
        if kind in ("adam", "adamw", "rmsprop"):
            self.sq = [torch.zeros_like(p) for p in params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor] | None = None) -> None:
        """One update from each parameter's ``.grad``, or from ``grads`` (one per parameter, in order)."""
        params = self.params
        if grads is None:
            grads = [p.grad for p in params]
        kind, lr, wd = self.kind, self.lr, self.weight_decay
        if wd and kind != "adamw":
            grads = torch._foreach_add(grads, params, alpha=wd)
        if kind == "sgd":
            torch._foreach_add_(params, grads, alpha=-lr)
        elif kind == "sgd_momentum":
            if self.buf is None:  # PyTorch starts the buffer at the first gradient
                self.buf = [g.clone() for g in grads]
            else:
                torch._foreach_mul_(self.buf, self.momentum)
                torch._foreach_add_(self.buf, grads)
            torch._foreach_add_(params, self.buf, alpha=-lr)
        elif kind == "rmsprop":
            assert self.sq is not None
            torch._foreach_mul_(self.sq, RMSPROP_ALPHA)
            torch._foreach_addcmul_(self.sq, grads, grads, value=1 - RMSPROP_ALPHA)
            avg = torch._foreach_sqrt(self.sq)
            torch._foreach_add_(avg, EPS)
            torch._foreach_addcdiv_(params, grads, avg, value=-lr)
        else:  # adam, adamw
            assert self.buf is not None and self.sq is not None
            self.t += 1
            if kind == "adamw" and wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            b1, b2 = self.beta1, self.beta2
            torch._foreach_lerp_(self.buf, grads, 1 - b1)
            torch._foreach_mul_(self.sq, b2)
            torch._foreach_addcmul_(self.sq, grads, grads, value=1 - b2)
            denom = torch._foreach_sqrt(self.sq)
            torch._foreach_div_(denom, math.sqrt(1 - b2**self.t))
            torch._foreach_add_(denom, EPS)
            torch._foreach_addcdiv_(params, self.buf, denom, value=-(lr / (1 - b1**self.t)))
