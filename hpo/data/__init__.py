"""Data sources: one module per source, each returning a seeded train / validation / test :class:`Splits`.

Arrays are NumPy (float32 inputs, int64 labels); the objectives turn them into tensors. Nothing here downloads:
sources are generated (spirals, mnist1d, modular), ship with a package (digits) or are read from a local path (idx).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from hpo.spec import DataSpec


@dataclass(frozen=True)
class Splits:
    """Train, validation and test arrays. The test split never takes part in model selection."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def split_fractions(
    x: np.ndarray, y: np.ndarray, val_fraction: float, test_fraction: float, seed: int, n_classes: int
) -> Splits:
    """Shuffle with ``seed`` and cut into train / validation / test."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    n_val = int(round(len(y) * val_fraction))
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return Splits(x[train], y[train], x[val], y[val], x[test], y[test], n_classes)


@functools.lru_cache(maxsize=8)
def load(spec: DataSpec) -> Splits:
    """Load (and cache per process) the data a spec describes."""
    if spec.source == "spirals":
        from hpo.data.spirals import load_spirals

        return load_spirals(spec)
    if spec.source == "digits":
        from hpo.data.digits import load_digits

        return load_digits(spec)
    if spec.source == "mnist1d":
        from hpo.data.mnist1d import load_mnist1d

        return load_mnist1d(spec)
    if spec.source == "idx":
        from hpo.data.idx import load_idx

        return load_idx(spec)
    if spec.source == "modular":
        from hpo.data.modular import load_modular

        return load_modular(spec)
    raise AssertionError(spec.source)


__all__ = ["Splits", "load", "split_fractions"]
