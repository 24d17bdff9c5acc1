"""scikit-learn's 8x8 handwritten digits (1,797 images, shipped with scikit-learn), scaled to [0, 1]."""

from __future__ import annotations

import numpy as np

from hpo.data import Splits, split_fractions
from hpo.spec import DigitsData


def load_digits(spec: DigitsData) -> Splits:
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    if spec.images:
        x = x.reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    return split_fractions(x, y, spec.val_fraction, spec.test_fraction, spec.seed, n_classes=10)
