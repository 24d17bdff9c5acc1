"""Modular arithmetic for grokking: (a op b) mod p over all pairs, a seeded fraction of them for training.

Inputs are the operand pairs as integers ``(a, b)``; models one-hot or embed them. Division multiplies by the
modular inverse of b, so b = 0 is left out.
"""

from __future__ import annotations

import numpy as np

from hpo.data import Splits
from hpo.spec import ModularData


def load_modular(spec: ModularData) -> Splits:
    p = spec.p
    a, b = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
    a, b = a.ravel(), b.ravel()
    if spec.op == "+":
        y = (a + b) % p
    elif spec.op == "-":
        y = (a - b) % p
    elif spec.op == "*":
        y = (a * b) % p
    else:
        keep = b != 0
        a, b = a[keep], b[keep]
        inv = np.array([pow(int(v), p - 2, p) for v in range(p)])
        y = (a * inv[b]) % p
    x = np.stack([a, b], axis=1).astype(np.int64)
    y = y.astype(np.int64)
    order = np.random.default_rng(spec.seed).permutation(len(y))
    n_train = int(round(len(y) * spec.train_fraction))
    train, val = order[:n_train], order[n_train:]
    empty_x, empty_y = x[:0], y[:0]
    return Splits(x[train], y[train], x[val], y[val], empty_x, empty_y, n_classes=p)
