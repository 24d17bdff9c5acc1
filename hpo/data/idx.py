"""MNIST-format IDX files read from a local folder (MNIST, Fashion-MNIST; raw or .gz).

The folder holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte`` (each may end in ``.gz``). The t10k files are the test split; validation is cut from
the training files.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from hpo.data import Splits
from hpo.errors import DataError
from hpo.spec import IdxData

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (raw or gzip) into an array; raises DataError on a corrupt file."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read IDX file: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: corrupt IDX file (truncated header)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: corrupt IDX file (expected {expected} data bytes for shape {shape}, found {len(raw) - header})"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: missing IDX file {stem}[.gz]")


def _images(folder: Path, prefix: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    x = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))
    y = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"))
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"{folder}: {prefix} images {x.shape} and labels {y.shape} do not match")
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return (x.astype(np.float32) / 255.0)[:, None, :, :], y.astype(np.int64)


def load_idx(spec: IdxData) -> Splits:
    folder = Path(spec.path).expanduser()
    if not folder.is_dir():
        raise DataError(f"data.path: no such folder {folder}")
    x, y = _images(folder, "train", spec.limit)
    x_test, y_test = _images(folder, "t10k", spec.limit)
    order = np.random.default_rng(spec.seed).permutation(len(y))
    n_val = max(1, int(round(len(y) * spec.val_fraction)))
    val, train = order[:n_val], order[n_val:]
    n_classes = int(max(y.max(), y_test.max())) + 1
    return Splits(x[train], y[train], x[val], y[val], x_test, y_test, n_classes=n_classes)
