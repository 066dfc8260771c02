"""ORM tables. The database is the single source of truth for every job's state."""

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from kiln.catalog import DatasetInfo, Task
from kiln.db import Base, UTCDateTime, utcnow


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
        Index("ix_jobs_owner_created", "owner", "created_at"),
        # The outbox: jobs committed but not yet handed to the broker.
        Index("ix_jobs_status_published", "status", "published_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    name: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, native_enum=False, length=16, create_constraint=False, validate_strings=True),
        default=JobStatus.queued,
    )
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    # The Celery queue the job is published to, from its spec's resources (kiln.dispatch.train_queue).
    queue: Mapped[str] = mapped_column(String(100), default="kiln", server_default="kiln")

    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    epochs_completed: Mapped[int] = mapped_column(Integer, default=0)
    # The newest checkpoint known to be on disk (recorded only after its file is fsynced and renamed).
    checkpoint_epoch: Mapped[int] = mapped_column(Integer, default=0)
    # Claim and lease: only the holder of lease_token may write progress for this attempt.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    lease_token: Mapped[str | None] = mapped_column(String(36))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)

    error: Mapped[str | None] = mapped_column(Text)
    # Why a job that succeeded stopped before its last epoch (early stopping), as a sentence.
    stop_reason: Mapped[str | None] = mapped_column(Text)
    # With optimizer.lr "auto": {"lr": chosen rate, "sweep": [[lr, loss], ...]}.
    lr_search: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    weights_sha256: Mapped[str | None] = mapped_column(String(64))


class EpochMetric(Base):
    """Exactly one row per (job, epoch), written under the job's lease, and never changed after."""

    __tablename__ = "epoch_metrics"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer)  # which attempt trained this epoch
    train_loss: Mapped[float] = mapped_column(Float)
    val_loss: Mapped[float | None] = mapped_column(Float)
    val_accuracy: Mapped[float | None] = mapped_column(Float)
    lr: Mapped[float] = mapped_column(Float)
    duration_s: Mapped[float] = mapped_column(Float)
    samples_per_s: Mapped[float] = mapped_column(Float)
    grad_norm: Mapped[float | None] = mapped_column(Float)
    grad_norm_per_layer: Mapped[dict[str, float | None] | None] = mapped_column(JSON)
    train_accuracy: Mapped[float | None] = mapped_column(Float)
    val_r2: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # kiln.epochs.render_epoch of this row, written with it: a long history is then read by joining these, where
    # rendering 10,000 epochs from their columns took PostgreSQL 30 ms (api.services.metrics). None in rows
    # written before.
    rendered: Mapped[str | None] = mapped_column(Text)


class EpochDurations(Base):
    """How many epochs took at most `le` seconds (and more than the bucket below), and their seconds, for /metrics'
    histogram (kiln.epoch_counts): counted in the transaction that writes each epoch's row, never decreased."""

    __tablename__ = "epoch_durations"

    le: Mapped[float] = mapped_column(Float, primary_key=True)  # the bucket's upper bound in seconds; inf past the last
    epochs: Mapped[int] = mapped_column(BigInteger)
    seconds: Mapped[float] = mapped_column(Float)


class JobEvent(Base):
    """A job's visible history: each transition, with a sentence saying what happened and where."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    attempt: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(String(200))
    epoch: Mapped[int | None] = mapped_column(Integer)
    message: Mapped[str] = mapped_column(Text)


class Dataset(Base):
    """An uploaded dataset's description; its arrays are a safetensors file in the artifact store, keyed by id."""

    __tablename__ = "datasets"
    __table_args__ = (Index("ix_datasets_owner_created", "owner", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    task: Mapped[Task] = mapped_column(
        Enum(Task, native_enum=False, length=16, create_constraint=False, validate_strings=True)
    )
    rows: Mapped[int] = mapped_column(Integer)
    features: Mapped[int] = mapped_column(Integer)
    classes: Mapped[int | None] = mapped_column(Integer)  # None for regression
    # The original label of each class index (classification, binary), to map predictions back; else None.
    labels: Mapped[list[Any] | None] = mapped_column(JSON)
    input_shape: Mapped[list[int]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    sha256: Mapped[str] = mapped_column(String(64))  # of the stored file

    def info(self) -> DatasetInfo:
        """What specs are validated against; named by id, as a spec's data.dataset names it."""
        return DatasetInfo(self.id, self.task, tuple(self.input_shape), self.classes, self.rows)


class ApiKey(Base):
    """An owner's API key. Only its sha256 digest is stored; the key itself is shown once, at creation.
    The short id is public (it is the key's second part) and names the key in listings, logs and revocation."""

    __tablename__ = "api_keys"
    __table_args__ = (Index("ix_api_keys_owner", "owner"),)

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    name: Mapped[str | None] = mapped_column(String(200))
    digest: Mapped[str] = mapped_column(String(64))  # sha256 of the whole key, hex
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Worker(Base):
    """A `kiln worker` (one Celery node) as it last reported itself; its heartbeat keeps last_seen fresh."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)  # the Celery node name, as in jobs.worker
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    queues: Mapped[list[str]] = mapped_column(JSON)
    concurrency: Mapped[int] = mapped_column(Integer)
    # [{"id": "cpu", "kind": "cpu", "name": ..., "cores": 16, "memory_gb": 125.7}, {"id": "cuda:0", ...}]
    devices: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    version: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # a clean shutdown; None while it runs
