"""JobSpec: the wire contract for a training job, shared by the API, the workers and the SDK.

Pure data: no code, no import paths, no pickles. Unknown fields are refused and every number is
bounded, so a spec that validates is safe to queue.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from kiln.catalog import BUILTIN_DATASETS, LOSSES_FOR_TASK, Task

LossName = Literal["mse", "bce", "cross_entropy"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class MLPSpec(StrictModel):
    """A multi-layer perceptron: Linear -> activation -> dropout, per hidden layer."""

    type: Literal["mlp"]
    hidden: list[Annotated[int, Field(ge=1, le=4096)]] = Field(default=[64], max_length=16)
    activation: Literal["relu", "tanh", "gelu", "sigmoid"] = "relu"
    dropout: FiniteFloat = Field(default=0.0, ge=0.0, le=0.9)


ModelSpec = Annotated[MLPSpec, Field(discriminator="type")]


class DataSpec(StrictModel):
    dataset: str = Field(
        min_length=1,
        max_length=64,
        description="A built-in dataset name: " + ", ".join(BUILTIN_DATASETS),
    )
    val_fraction: FiniteFloat = Field(default=0.2, ge=0.0, le=0.5)
    samples: int | None = Field(
        default=None, ge=20, le=200_000, description="Rows to generate (generated datasets only)."
    )

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        if name not in BUILTIN_DATASETS:
            raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(BUILTIN_DATASETS)}")
        return name

    @field_validator("samples")
    @classmethod
    def _samples_only_for_generated(cls, samples: int | None, info: ValidationInfo) -> int | None:
        name = info.data.get("dataset")
        if samples is not None and name in BUILTIN_DATASETS and not BUILTIN_DATASETS[name].generated:
            raise ValueError(f"dataset {name!r} has a fixed size; samples applies to generated datasets only")
        return samples


class SGDSpec(StrictModel):
    type: Literal["sgd"]
    lr: FiniteFloat = Field(default=0.01, gt=0.0, le=10.0)
    momentum: FiniteFloat = Field(default=0.0, ge=0.0, lt=1.0)
    weight_decay: FiniteFloat = Field(default=0.0, ge=0.0, le=1.0)


class AdamSpec(StrictModel):
    type: Literal["adam"]
    lr: FiniteFloat = Field(default=0.001, gt=0.0, le=10.0)
    weight_decay: FiniteFloat = Field(default=0.0, ge=0.0, le=1.0)


OptimizerSpec = Annotated[SGDSpec | AdamSpec, Field(discriminator="type")]


class JobSpec(StrictModel):
    """Everything a worker needs to train one model. Defaults are filled in on validation."""

    name: str | None = Field(default=None, min_length=1, max_length=200, pattern=r"^[\w.\- ]+$")
    model: ModelSpec = Field(default_factory=lambda: MLPSpec(type="mlp"))
    data: DataSpec
    # None means "the natural loss for the dataset's task"; validation replaces it.
    loss: LossName | None = Field(default=None, validate_default=True)
    optimizer: OptimizerSpec = Field(default_factory=lambda: AdamSpec(type="adam"))
    epochs: int = Field(default=10, ge=1, le=10_000)
    batch_size: int = Field(default=64, ge=1, le=65_536)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    # Wall-clock budget for the training; None takes the server's default (KILN_DEFAULT_TIME_LIMIT_S),
    # and the server refuses more than its KILN_MAX_TIME_LIMIT_S.
    time_limit_s: int | None = Field(default=None, ge=1, le=30 * 24 * 3600)

    @field_validator("loss")
    @classmethod
    def _loss_fits_task(cls, loss: str | None, info: ValidationInfo) -> str | None:
        data = info.data.get("data")
        if data is None:  # the data section itself was invalid; that error is reported already
            return loss
        task = BUILTIN_DATASETS[data.dataset].task
        fitting = LOSSES_FOR_TASK[task]
        if loss is None:
            return fitting[0]
        if loss not in fitting:
            raise ValueError(
                f"loss {loss!r} does not fit dataset {data.dataset!r}, a {task.value} task; "
                f"use {' or '.join(repr(x) for x in fitting)}"
            )
        return loss

    @property
    def task(self) -> Task:
        return BUILTIN_DATASETS[self.data.dataset].task
