"""Built-in datasets as numpy arrays, and the deterministic train/validation split.

Everything comes from scikit-learn: bundled files (no download) or generators seeded by the job.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn import datasets as sk

from kiln.catalog import BUILTIN_DATASETS, Task
from kiln.spec import DataSpec

# Files shipped inside scikit-learn; their size is fixed.
_BUNDLED: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "digits": sk.load_digits,
    "iris": sk.load_iris,
    "wine": sk.load_wine,
    "breast_cancer": sk.load_breast_cancer,
    "diabetes": sk.load_diabetes,
}

# Generated from (rows, seed), so the same spec always gets the same data.
_GENERATED: dict[str, Callable[[int, int], tuple[np.ndarray, np.ndarray]]] = {
    "moons": lambda n, seed: sk.make_moons(n_samples=n, noise=0.2, random_state=seed),
    "blobs": lambda n, seed: sk.make_blobs(n_samples=n, centers=3, n_features=2, random_state=seed),
    "regression": lambda n, seed: sk.make_regression(
        n_samples=n, n_features=10, noise=10.0, random_state=seed
    ),
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
    (so nothing about the validation rows leaks into training)."""
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
