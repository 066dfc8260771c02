"""Job operations behind the routes: plain functions over a Session, scoped by owner in every query."""

import hashlib
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy import and_, case, literal, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.errors import Conflict, InvalidRequest, NotFound
from api.services.pagination import decode_cursor, encode_cursor
from kiln.catalog import BUILTIN_DATASETS
from kiln.db import UTCDateTime, utcnow
from kiln.dispatch import publish_job
from kiln.history import record
from kiln.settings import get_settings
from kiln.spec import JobSpec
from kiln.storage import ENCODER, WEIGHTS, ArtifactStore
from kiln.tables import Dataset, EpochMetric, Job, JobEvent, JobStatus

log = logging.getLogger("kiln.api.jobs")


@dataclass
class Created:
    job: Job
    new: bool  # False when an Idempotency-Key matched an earlier job


def create_job(session: Session, owner: str, spec: JobSpec, idempotency_key: str | None) -> Created:
    if idempotency_key and (earlier := _by_idempotency_key(session, owner, idempotency_key)):
        return Created(earlier, new=False)
    spec = _checked_against_upload(session, owner, spec)
    settings = get_settings()
    if spec.time_limit_s is not None and spec.time_limit_s > settings.max_time_limit_s:
        raise InvalidRequest(
            f"time_limit_s may be at most {settings.max_time_limit_s} s on this server; ask for less.",
            details=[{"field": "body.time_limit_s", "message": f"at most {settings.max_time_limit_s}"}],
        )
    # The stored spec is the normalised one: every default filled in, the server's time limit too.
    spec = spec.model_copy(update={"time_limit_s": spec.time_limit_s or settings.default_time_limit_s})
    job = Job(
        id=str(uuid.uuid4()), owner=owner, name=spec.name, status=JobStatus.queued,
        spec=spec.model_dump(mode="json"), idempotency_key=idempotency_key, created_at=utcnow(),
        epochs_completed=0, checkpoint_epoch=0, attempt=0, cancel_requested=False,
    )
    session.add(job)
    record(session, job.id, "queued", "submitted", attempt=0)
    try:
        session.commit()
    except IntegrityError:
        # Two requests raced with the same key: the other one's job is the answer.
        session.rollback()
        if idempotency_key and (earlier := _by_idempotency_key(session, owner, idempotency_key)):
            return Created(earlier, new=False)
        raise
    # Publish only after the commit, so a worker can never receive an id the database lacks.
    publish_job(job.id)
    return Created(job, new=True)


def _checked_against_upload(session: Session, owner: str, spec: JobSpec) -> JobSpec:
    """The route validated the spec without uploads, where an upload's id passes provisionally: validate it
    again with the owner's dataset of that id, so the loss and model checks apply. An unknown id, or another
    owner's, is refused at body.data.dataset as an unknown name is."""
    name = spec.data.dataset
    if name in BUILTIN_DATASETS:
        return spec
    upload = session.scalar(select(Dataset).where(Dataset.id == name, Dataset.owner == owner))
    body = spec.model_dump(mode="json")
    try:
        return JobSpec.model_validate(body, context={"datasets": {name: upload.info()} if upload else {}})
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
        raise RequestValidationError(errors, body=body) from None


def _by_idempotency_key(session: Session, owner: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.owner == owner, Job.idempotency_key == key))


def get_job(session: Session, owner: str, job_id: str) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id, Job.owner == owner))
    if job is None:
        raise NotFound(f"No job with id {job_id!r}.")
    return job


def latest_metrics(session: Session, job: Job) -> EpochMetric | None:
    if job.epochs_completed == 0:
        return None
    return session.get(EpochMetric, (job.id, job.epochs_completed))


def list_jobs(
    session: Session, owner: str, *, statuses: Sequence[JobStatus], name: str | None, limit: int,
    cursor: str | None,
) -> tuple[list[tuple[Job, EpochMetric | None]], str | None]:
    """Newest first, with each job's latest metrics joined in one query; keyset pagination."""
    query = (
        select(Job, EpochMetric)
        .outerjoin(EpochMetric, and_(EpochMetric.job_id == Job.id, EpochMetric.epoch == Job.epochs_completed))
        .where(Job.owner == owner)
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(limit + 1)
    )
    if statuses:
        query = query.where(Job.status.in_(statuses))
    if name is not None:
        query = query.where(Job.name == name)
    if cursor:
        created_at, last_id = decode_cursor(cursor)
        query = query.where(
            (Job.created_at < created_at) | (and_(Job.created_at == created_at, Job.id < last_id))
        )
    rows = [(job, metric) for job, metric in session.execute(query)]
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1][0]
        next_cursor = encode_cursor(last.created_at, last.id)
    return rows, next_cursor


def job_metrics(session: Session, owner: str, job_id: str, since: int) -> list[EpochMetric]:
    get_job(session, owner, job_id)
    query = (
        select(EpochMetric)
        .where(EpochMetric.job_id == job_id, EpochMetric.epoch > since)
        .order_by(EpochMetric.epoch)
    )
    return list(session.scalars(query))


def cancel_job(session: Session, owner: str, job_id: str) -> Job:
    """Queued: cancelled at once and never starts. Running: flagged; the worker stops at the next batch."""
    job = get_job(session, owner, job_id)
    if job.status.terminal:
        raise _not_cancellable(job)
    # One UPDATE for both cases: a job moved between queued and running meanwhile (claimed, requeued
    # by the reconciler, handed back) is still caught, and the worker or the claim honours the flag.
    queued = Job.status == JobStatus.queued
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_([JobStatus.queued, JobStatus.running]))
        .values(
            cancel_requested=True,
            status=case((queued, JobStatus.cancelled.value), else_=Job.status),
            finished_at=case((queued, literal(utcnow(), UTCDateTime())), else_=Job.finished_at),
        )
        .execution_options(synchronize_session=False)
    )
    session.refresh(job)
    if job.status == JobStatus.cancelled:
        record(session, job_id, "cancelled", "cancelled before it started", attempt=job.attempt)
    elif job.status == JobStatus.running:
        record(session, job_id, "cancel_requested", "cancel requested; stopping at the next batch",
               attempt=job.attempt, worker=job.worker)
    session.commit()
    session.refresh(job)
    if job.status in (JobStatus.succeeded, JobStatus.failed):  # it finished while we asked
        raise _not_cancellable(job)
    return job


def _not_cancellable(job: Job) -> Conflict:
    return Conflict(f"Job {job.id} has already {job.status.value}; only queued or running jobs can be cancelled.")


def job_history(session: Session, owner: str, job_id: str) -> list[JobEvent]:
    get_job(session, owner, job_id)
    return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def weights_file(session: Session, store: ArtifactStore, owner: str, job_id: str, part: str) -> tuple[Job, Path, str]:
    """The job's weights (part "model") or its autoencoder's encoder (part "encoder"), with the sha256."""
    job = get_job(session, owner, job_id)
    if job.status != JobStatus.succeeded:
        raise Conflict(f"Job {job_id} is {job.status.value}; weights can be downloaded once it has succeeded.")
    if part == "encoder" and job.spec["model"]["type"] != "autoencoder":
        raise Conflict(f"Job {job_id} trained a {job.spec['model']['type']}; only an autoencoder has an encoder.")
    path = store.open_artifact(job.id, ENCODER if part == "encoder" else WEIGHTS)
    if path is None or job.weights_sha256 is None:
        raise NotFound(f"The weights of job {job_id} are missing from the artifact store.")
    sha256 = job.weights_sha256 if part == "model" else hashlib.sha256(path.read_bytes()).hexdigest()
    return job, path, sha256
