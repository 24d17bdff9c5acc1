"""MNIST-1D generated locally with ``mnist1d.data.make_dataset`` (the download path is never used)."""

from __future__ import annotations

import numpy as np

from hpo.data import Splits, split_fractions
from hpo.spec import Mnist1dData


def load_mnist1d(spec: Mnist1dData) -> Splits:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = spec.num_samples
    args.seed = spec.seed
    args.train_split = 1.0  # hpo makes its own seeded three-way split
    data = make_dataset(args)
    x = np.asarray(data["x"], dtype=np.float32)[:, None, :]  # (n, 1 channel, 40)
    y = np.asarray(data["y"], dtype=np.int64)
    return split_fractions(x, y, spec.val_fraction, spec.test_fraction, spec.seed, n_classes=10)
