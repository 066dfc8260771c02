"""Built-in datasets as numpy arrays, and the deterministic train/validation split.

Everything comes from scikit-learn (bundled files, no download) or is generated from the job's seed.
Rows are flat, (n, features), whatever their layout: kiln.catalog's input_shape says how a row unflattens.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn import datasets as sk

from kiln.catalog import BUILTIN_DATASETS, DatasetInfo, Task
from kiln.spec import DataSpec

# Files shipped inside scikit-learn; their size is fixed.
_BUNDLED: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "digits": sk.load_digits,
    "iris": sk.load_iris,
    "wine": sk.load_wine,
    "breast_cancer": sk.load_breast_cancer,
    "diabetes": sk.load_diabetes,
}


def make_sine(n: int, seed: int, steps: int = 32, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Noisy sine windows, (n, steps); the label is the frequency band: class k makes between k+1 and k+2
    cycles per window. Amplitude (0.5..1.5) and phase are random, and each step has gaussian noise (0.3), so
    windows near a band's edge are ambiguous: no model reaches 100%."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, classes, n)
    cycles = 1 + label + rng.uniform(0.0, 1.0, n)
    phase = rng.uniform(0.0, 2 * np.pi, n)
    amplitude = rng.uniform(0.5, 1.5, n)
    t = np.arange(steps) / steps
    x = amplitude[:, None] * np.sin(2 * np.pi * cycles[:, None] * t + phase[:, None])
    return x + rng.normal(0.0, 0.3, (n, steps)), label


# Generated from (rows, seed), so the same spec always gets the same data.
_GENERATED: dict[str, Callable[[int, int], tuple[np.ndarray, np.ndarray]]] = {
    "moons": lambda n, seed: sk.make_moons(n_samples=n, noise=0.2, random_state=seed),
    "blobs": lambda n, seed: sk.make_blobs(n_samples=n, centers=3, n_features=2, random_state=seed),
    "regression": lambda n, seed: sk.make_regression(
        n_samples=n, n_features=10, noise=10.0, random_state=seed
    ),
    "sine": make_sine,
}


def load_dataset(data_spec: DataSpec, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """x as float32 (n, features); y as int64 (n,) class labels, or float32 (n,) for regression."""
    info = BUILTIN_DATASETS[data_spec.dataset]
    if info.generated:
        x, y = _GENERATED[info.name](data_spec.samples or info.rows, seed)
    else:
        x, y = _BUNDLED[info.name](return_X_y=True)
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.float32 if info.task is Task.regression else np.int64)
    # The API validated the spec against the catalog; a different scikit-learn must not silently differ.
    if x.shape[1] != info.features:
        raise RuntimeError(f"dataset {info.name!r} has {x.shape[1]} features, the catalog says {info.features}")
    return x, y


def load_arrays(
    name: str, x: np.ndarray, y: np.ndarray | None, task: Task
) -> tuple[np.ndarray, np.ndarray, DatasetInfo]:
    """A user's arrays checked and in kiln's form: x float32 flat (n, features), y int64 labels (0..k-1; 0 or 1
    for binary) or float32 values, and the DatasetInfo that specs are validated against.

    x may be shaped: (n, features) is a table, (n, steps, channels) a sequence, (n, channels, height, width) an
    image (give a single-channel image its channel axis). For Task.reconstruction y may be None: unlabelled
    rows, that only an autoencoder trains on.
    """
    x = np.asarray(x)
    if x.ndim not in (2, 3, 4) or len(x) < 2 or 0 in x.shape:
        raise ValueError(f"x must have shape (n, features), (n, steps, channels) or (n, channels, height, width) "
                         f"with n >= 2, not {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
        raise ValueError("x must hold finite numbers only")
    if y is None:
        if task is not Task.reconstruction:
            raise ValueError(f"a {task.value} dataset needs labels y")
        y = np.zeros(len(x))
    y = np.asarray(y)
    if y.shape != (len(x),):
        raise ValueError(f"y must have shape ({len(x)},), one value per row of x, not {y.shape}")
    if not np.issubdtype(y.dtype, np.number) or not np.isfinite(y).all():
        raise ValueError("y must hold finite numbers only")
    classes = None
    if task in (Task.classification, Task.binary):
        if not np.array_equal(y, np.round(y)) or y.min() < 0:
            raise ValueError(f"a {task.value} dataset's labels must be the integers 0..k-1")
        classes = 2 if task is Task.binary else int(y.max()) + 1
        if y.max() >= classes or classes < 2:
            raise ValueError(f"a {task.value} dataset's labels must be 0..{classes - 1} with at least 2 classes")
    y = y.astype(np.float32 if classes is None else np.int64)
    info = DatasetInfo(name, task, tuple(int(d) for d in x.shape[1:]), classes, len(x))
    return x.reshape(len(x), -1).astype(np.float32), y, info


@dataclass
class Split:
    x_train: np.ndarray  # standardised with the train statistics below
    y_train: np.ndarray  # standardised too for regression
    x_val: np.ndarray  # 0 rows when val_fraction is 0
    y_val: np.ndarray
    input_mean: np.ndarray  # float32 (features,), from the train rows only
    input_std: np.ndarray  # float32 (features,), zeros replaced by 1
    target_mean: float | None = None  # regression only
    target_std: float | None = None


def split_dataset(x: np.ndarray, y: np.ndarray, task: Task, val_fraction: float, seed: int) -> Split:
    """Shuffle with `seed`, hold out `val_fraction` of the rows, and standardise with train statistics
    (so nothing about the validation rows leaks into training).

    Standardisation is per feature for every layout (per pixel of an image, per step of a sequence): one rule,
    whose statistics are vectors as wide as the flat rows, so weights files and predict() need no layout."""
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = int(len(x) * val_fraction)
    val, train = order[:n_val], order[n_val:]

    mean, std = _mean_std(x[train])
    x = (x - mean) / std
    target_mean = target_std = None
    if task is Task.regression:
        target_mean, target_std = (float(v) for v in _mean_std(y[train]))
        y = ((y - target_mean) / target_std).astype(np.float32)
    return Split(x[train], y[train], x[val], y[val], mean, std, target_mean, target_std)


def _mean_std(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # float64 accumulation, float32 result; a constant column keeps std 1 instead of dividing by zero.
    mean = a.mean(axis=0, dtype=np.float64)
    std = a.std(axis=0, dtype=np.float64)
    std = np.where(std == 0, 1.0, std)
    return mean.astype(np.float32), std.astype(np.float32)
