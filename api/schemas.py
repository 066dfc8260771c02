"""Response bodies of the public API (see API.md)."""

from datetime import datetime
from typing import Annotated, Any, Literal

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
    grad_norm_per_layer: dict[str, float | None] | None  # which weights took the blame (null: it overflowed)
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
    progress: float  # 0..1: epochs completed of those asked for; 1 once succeeded (early stopping included)
    eta_seconds: float | None  # running: the latest epoch's duration times the epochs left; else None
    # queued: why no live worker can take it (none serves its queue, or none has the GPU it asks for); else None
    waiting_reason: str | None = None

    @classmethod
    def of(cls, job: Job, latest: EpochMetric | None, waiting_reason: str | None = None) -> "JobOut":
        epochs = job.spec.get("epochs") or 1
        progress = 1.0 if job.status == JobStatus.succeeded else min(1.0, job.epochs_completed / epochs)
        eta = None
        if job.status == JobStatus.running and latest is not None:
            eta = round(latest.duration_s * max(0, epochs - job.epochs_completed), 3)
        return cls(
            progress=progress, eta_seconds=eta, waiting_reason=waiting_reason,
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


FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Raw rows, as the dataset's features (standardisation is applied by kiln); at most 1024 rows. Models compute
    # in float32, so a value beyond its range would become infinite inside the model: refused here.
    inputs: list[list[Annotated[float, Field(allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)]]] = Field(
        min_length=1, max_length=1024
    )

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


# --- the OpenAPI description of error answers ---------------------------------------------------------

# What each error status means on this API. Every one carries the same body (ErrorResponse), so a client (and a
# schema checker such as schemathesis) can rely on the document for every answer a route gives.
_ERRORS: dict[int, dict[str, Any]] = {
    400: {"description": "The body could not be read at all (for example, bytes that are not UTF-8)."},
    401: {
        "description": "Missing, malformed, unknown or revoked API key.",
        "headers": {"WWW-Authenticate": {"description": "Always `Bearer`.", "schema": {"type": "string"}}},
    },
    404: {"description": "No such id, or one owned by someone else (the same answer for both)."},
    409: {"description": "The job's state does not allow this yet (or any more); the message says which."},
    413: {"description": "The request body is over the server's limit."},
    422: {"description": "The request is invalid; `details` names each field and what is wrong with it."},
    429: {
        "description": "Over a per-owner limit (jobs queued or running at once); try again later.",
        "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}},
    },
    503: {
        "description": "The database, the broker or a predictor is unreachable; try again.",
        "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}},
    },
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for a route's error answers. Every /v1 route can answer 401 (no valid key), 422
    (an invalid parameter) and 503 (the database is down); name the others. FastAPI documents them under the
    route's response class's media type: give a route that answers text use `response_class=Response` (no media
    type, so these stay application/json) and document its 200 explicitly, as GET /v1/jobs/{id}/logs does."""
    wanted = sorted({401, 422, 503, *statuses})
    return {status: {**_ERRORS[status], "model": ErrorResponse} for status in wanted}


class Readiness(BaseModel):
    status: Literal["ready"]
    checks: dict[str, bool]  # {"database": true, "broker": true}


class WorkerOut(BaseModel):
    """A worker as the registry knows it (GET /v1/workers)."""

    name: str  # the Celery node name; jobs name it in `worker`
    host: str
    pid: int
    queues: list[str]
    concurrency: int
    devices: list[dict[str, Any]]  # {"id": "cpu" | "cuda:N", "kind", "name", "memory_gb", ...}
    version: str
    started_at: datetime
    last_seen: datetime
    state: Literal["online", "lost", "stopped"]
    running: int  # jobs running on it, all owners
    running_jobs: list[str]  # the caller's own jobs among them


class WorkerList(BaseModel):
    items: list[WorkerOut]
