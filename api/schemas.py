"""Response bodies of the public API (see API.md)."""

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kiln.catalog import Task
from kiln.tables import EpochMetric, Job, JobStatus


class EpochMetrics(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    epoch: int
    attempt: int  # which attempt trained it (more than 1 after a worker was lost and the job resumed)
    train_loss: float
    val_loss: float | None
    val_accuracy: float | None
    lr: float
    duration_s: float
    samples_per_s: float
    grad_norm: float | None  # L2 norm of all gradients, averaged over the epoch's batches
    grad_norm_per_layer: dict[str, float] | None  # which weights took the blame
    train_accuracy: float | None
    val_r2: float | None  # regression only


class JobOut(BaseModel):
    id: str
    name: str | None
    status: JobStatus
    spec: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    epochs_completed: int
    checkpoint_epoch: int
    attempt: int
    worker: str | None
    cancel_requested: bool
    latest_metrics: EpochMetrics | None
    error: str | None
    stop_reason: str | None  # why a succeeded job stopped before its last epoch (early stopping)
    lr_search: dict[str, Any] | None  # optimizer.lr "auto": {"lr": chosen, "sweep": [[lr, loss], ...]}

    @classmethod
    def of(cls, job: Job, latest: EpochMetric | None) -> "JobOut":
        return cls(
            id=job.id, name=job.name, status=job.status, spec=job.spec,
            created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
            epochs_completed=job.epochs_completed, checkpoint_epoch=job.checkpoint_epoch, attempt=job.attempt,
            worker=job.worker,
            cancel_requested=job.cancel_requested,
            latest_metrics=EpochMetrics.model_validate(latest) if latest else None,
            error=job.error, stop_reason=job.stop_reason, lr_search=job.lr_search,
        )


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class JobMetrics(BaseModel):
    job_id: str
    epochs: list[EpochMetrics]


class JobEventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: datetime
    kind: str
    attempt: int
    worker: str | None
    epoch: int | None
    message: str


class JobHistory(BaseModel):
    job_id: str
    events: list[JobEventOut]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Raw rows, as the dataset's features (standardisation is applied by kiln); at most 1024 rows.
    inputs: list[list[Annotated[float, Field(allow_inf_nan=False)]]] = Field(min_length=1, max_length=1024)

    @field_validator("inputs")
    @classmethod
    def _rectangular(cls, rows: list[list[float]]) -> list[list[float]]:
        if len({len(row) for row in rows}) != 1 or not 0 < len(rows[0]) <= 65_536:
            raise ValueError("every row must have the same number of values (between 1 and 65536)")
        return rows


class Predictions(BaseModel):
    job_id: str
    # Class indices (classification, binary), values in target units (regression), reconstructed rows
    # (autoencoder).
    predictions: list[Any]
    probabilities: list[list[float]] | None  # per class, for classification and binary tasks


class DatasetOut(BaseModel):
    """An uploaded dataset; a JobSpec trains on it with data.dataset set to its id."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    task: Task  # classification, binary or regression (task "auto" resolved at upload)
    rows: int
    features: int
    classes: int | None  # None for regression
    # The original label of each class index (the targets are stored as 0..classes-1); None for regression.
    labels: list[Any] | None
    created_at: datetime


class DatasetList(BaseModel):
    items: list[DatasetOut]
    next_cursor: str | None


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    error: ErrorBody
