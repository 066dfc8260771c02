"""What the built-in datasets are, without loading them: the API validates specs against this."""

from dataclasses import dataclass
from enum import StrEnum


class Task(StrEnum):
    classification = "classification"  # one of several classes: cross-entropy
    binary = "binary"  # yes/no: binary cross-entropy on a single logit
    regression = "regression"  # a real value: mean squared error


# Which losses make sense for which task; the first is the default.
LOSSES_FOR_TASK: dict[Task, tuple[str, ...]] = {
    Task.classification: ("cross_entropy",),
    Task.binary: ("bce", "cross_entropy"),
    Task.regression: ("mse",),
}


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    task: Task
    features: int
    classes: int | None  # None for regression
    rows: int  # default number of rows (generated sets take data.samples instead)
    generated: bool = False


BUILTIN_DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in (
        DatasetInfo("digits", Task.classification, 64, 10, 1797),
        DatasetInfo("iris", Task.classification, 4, 3, 150),
        DatasetInfo("wine", Task.classification, 13, 3, 178),
        DatasetInfo("breast_cancer", Task.binary, 30, 2, 569),
        DatasetInfo("diabetes", Task.regression, 10, None, 442),
        DatasetInfo("moons", Task.binary, 2, 2, 1000, generated=True),
        DatasetInfo("blobs", Task.classification, 2, 3, 1000, generated=True),
        DatasetInfo("regression", Task.regression, 10, None, 1000, generated=True),
    )
}
