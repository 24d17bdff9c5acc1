"""Two interlaced spirals, as the lesson draws them (docs/lesson.md).

phi ~ U[1, 15]; point = ((phi + 1) cos phi, phi sin phi) + N(0, noise^2) per coordinate; the second half of the
points is negated and labelled 1. Train, validation and test sets are drawn independently, from one seed.
"""

from __future__ import annotations

import numpy as np

from hpo.data import Splits
from hpo.spec import SpiralsData


def make_spirals(n: int, rng: np.random.Generator, noise: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points of the two spirals and their 0/1 labels."""
    phi = rng.uniform(1.0, 15.0, size=n)
    x = np.stack([(phi + 1.0) * np.cos(phi), phi * np.sin(phi)], axis=1)
    x = x + rng.normal(0.0, noise, size=x.shape)
    y = np.zeros(n, dtype=np.int64)
    half = n // 2
    x[half:] *= -1.0
    y[half:] = 1
    return x.astype(np.float32), y


def load_spirals(spec: SpiralsData) -> Splits:
    rng = np.random.default_rng(spec.seed)
    train = make_spirals(spec.n_train, rng, spec.noise)
    val = make_spirals(spec.n_val, rng, spec.noise)
    test = make_spirals(spec.n_test, rng, spec.noise)
    return Splits(*train, *val, *test, n_classes=2)
