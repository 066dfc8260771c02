"""What the built-in datasets are, without loading them: the API validates specs against this."""

import math
from dataclasses import dataclass
from enum import StrEnum


class Task(StrEnum):
    classification = "classification"  # one of several classes: cross-entropy
    binary = "binary"  # yes/no: binary cross-entropy on a single logit
    regression = "regression"  # a real value: mean squared error (or l1, huber)
    reconstruction = "reconstruction"  # an autoencoder's: the inputs are the targets, labels are ignored


# Which losses make sense for which task; the first is the default.
LOSSES_FOR_TASK: dict[Task, tuple[str, ...]] = {
    Task.classification: ("cross_entropy",),
    Task.binary: ("bce", "cross_entropy"),
    Task.regression: ("mse", "l1", "huber"),
    Task.reconstruction: ("mse", "l1", "huber"),
}


class Layout(StrEnum):
    """How one row's values are arranged, told by the rank of its input_shape."""

    tabular = "tabular"  # (features,)
    sequence = "sequence"  # (steps, channels): time runs along the first axis
    image = "image"  # (channels, height, width)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    task: Task
    # One row's shape. Rows are stored flat, (n, prod(input_shape)), whatever the layout: models that need the
    # shape (cnn, rnn) unflatten it themselves, so files, standardisation and predict() stay layout-blind.
    input_shape: tuple[int, ...]
    classes: int | None  # None for regression
    rows: int  # default number of rows (generated sets take data.samples instead)
    generated: bool = False

    @property
    def features(self) -> int:
        return math.prod(self.input_shape)

    @property
    def layout(self) -> Layout:
        return {1: Layout.tabular, 2: Layout.sequence, 3: Layout.image}[len(self.input_shape)]


def channels_and_extent(input_shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """(channels, spatial extent) of a sequence row (steps, channels) or an image row (channels, height, width)."""
    if len(input_shape) == 2:
        steps, channels = input_shape
        return channels, (steps,)
    channels, *extent = input_shape
    return channels, tuple(extent)


BUILTIN_DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in (
        DatasetInfo("digits", Task.classification, (1, 8, 8), 10, 1797),
        DatasetInfo("iris", Task.classification, (4,), 3, 150),
        DatasetInfo("wine", Task.classification, (13,), 3, 178),
        DatasetInfo("breast_cancer", Task.binary, (30,), 2, 569),
        DatasetInfo("diabetes", Task.regression, (10,), None, 442),
        DatasetInfo("moons", Task.binary, (2,), 2, 1000, generated=True),
        DatasetInfo("blobs", Task.classification, (2,), 3, 1000, generated=True),
        DatasetInfo("regression", Task.regression, (10,), None, 1000, generated=True),
        # Noisy sine windows of 32 steps; the class is the frequency band (see worker.datasets).
        DatasetInfo("sine", Task.classification, (32, 1), 3, 1000, generated=True),
    )
}
