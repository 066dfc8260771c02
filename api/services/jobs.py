"""Job operations behind the routes: plain functions over a Session, scoped by owner in every query."""

import hashlib
import logging
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy import Connection, and_, bindparam, case, func, literal, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.errors import Conflict, InvalidRequest, NotFound, TooManyRequests
from api.schemas import EpochMetrics, JobOut
from api.services.pagination import decode_cursor, encode_cursor
from kiln import reads
from kiln.catalog import BUILTIN_DATASETS, DatasetInfo
from kiln.db import UTCDateTime, utcnow
from kiln.dispatch import publish_job, train_queue
from kiln.history import record
from kiln.model_size import estimate_parameters, output_size
from kiln.settings import Settings, get_settings
from kiln.spec import JobSpec, training_task
from kiln.storage import ENCODER, WEIGHTS, Store, is_id
from kiln.tables import Dataset, EpochMetric, Job, JobEvent, JobStatus
from kiln.workers import LiveWorker, live_workers, live_workers_on_loop, waiting_reasons

log = logging.getLogger("kiln.api.jobs")


@dataclass
class Created:
    job: Job
    new: bool  # False when an Idempotency-Key matched an earlier job


def create_job(session: Session, owner: str, spec: JobSpec, idempotency_key: str | None) -> Created:
    if idempotency_key and (earlier := _by_idempotency_key(session, owner, idempotency_key)):
        return Created(earlier, new=False)
    settings = get_settings()
    spec, dataset = _checked_against_dataset(session, owner, spec)
    _check_bounds(spec, dataset, settings)
    # The stored spec is the normalised one: every default filled in, the server's time limit too.
    spec = spec.model_copy(update={"time_limit_s": spec.time_limit_s or settings.default_time_limit_s})
    job = Job(
        id=str(uuid.uuid4()), owner=owner, name=spec.name, status=JobStatus.queued,
        spec=spec.model_dump(mode="json"), queue=train_queue(settings, spec.resources),
        idempotency_key=idempotency_key, created_at=utcnow(),
        epochs_completed=0, checkpoint_epoch=0, attempt=0, cancel_requested=False,
    )
    session.add(job)
    record(session, job.id, "queued", "submitted", attempt=0)
    try:
        _check_active_limit(session, owner, settings.max_active_jobs)
        session.commit()
    except IntegrityError:
        # Two requests raced with the same key: the other one's job is the answer.
        session.rollback()
        if idempotency_key and (earlier := _by_idempotency_key(session, owner, idempotency_key)):
            return Created(earlier, new=False)
        raise
    except TooManyRequests:
        session.rollback()
        raise
    # Publish only after the commit, so a worker can never receive an id the database lacks.
    publish_job(job.id, job.queue)
    return Created(job, new=True)


def _checked_against_dataset(session: Session, owner: str, spec: JobSpec) -> tuple[JobSpec, DatasetInfo]:
    """The spec and its dataset. The route validated the spec without uploads, where an upload's id passes
    provisionally: validate it again with the owner's dataset of that id, so the loss and model checks apply.
    An unknown id, or another owner's, is refused at body.data.dataset as an unknown name is."""
    name = spec.data.dataset
    if name in BUILTIN_DATASETS:
        return spec, BUILTIN_DATASETS[name]
    upload = session.scalar(select(Dataset).where(Dataset.id == name, Dataset.owner == owner))
    body = spec.model_dump(mode="json")
    datasets = {name: upload.info()} if upload else {}
    try:
        spec = JobSpec.model_validate(body, context={"datasets": datasets})
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
        raise RequestValidationError(errors, body=body) from None
    return spec, datasets[name]  # validation refuses a name with no dataset


def _refuse(field: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, details=[{"field": f"body.{field}", "message": message}])


def _check_bounds(spec: JobSpec, dataset: DatasetInfo, settings: Settings) -> None:
    """What one job may cost this server, from the spec alone: nothing is allocated to find out."""
    if spec.time_limit_s is not None and spec.time_limit_s > settings.max_time_limit_s:
        raise _refuse("time_limit_s", f"time_limit_s may be at most {settings.max_time_limit_s} s on this server; "
                                      "ask for less.")
    out = output_size(training_task(spec.model, dataset), dataset.classes, spec.loss, dataset.features)
    parameters = estimate_parameters(spec.model, dataset.input_shape, out)
    if parameters > settings.max_parameters:
        raise _refuse("model", f"This model would have {parameters:,} parameters on dataset {dataset.name!r}; this "
                               f"server allows {settings.max_parameters:,}. Use fewer or narrower layers.")
    rows = spec.data.samples or dataset.rows
    if spec.epochs * rows > settings.max_epoch_rows:
        raise _refuse("epochs", f"{spec.epochs:,} epochs over {rows:,} rows is {spec.epochs * rows:,} rows of "
                                f"training; this server allows {settings.max_epoch_rows:,} per job. Ask for at most "
                                f"{settings.max_epoch_rows // rows:,} epochs.")


def _check_active_limit(session: Session, owner: str, limit: int) -> None:
    """Counts the owner's queued and running jobs, the new one included (it is flushed first). Concurrent submits
    are serialised per owner: by an advisory lock on PostgreSQL, and on SQLite by the write lock the INSERT took."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:owner))"), {"owner": owner})
    session.flush()
    active = session.scalar(
        select(func.count()).select_from(Job)
        .where(Job.owner == owner, Job.status.in_((JobStatus.queued, JobStatus.running)))
    )
    if active > limit:
        raise TooManyRequests(
            f"You have {limit} jobs queued or running, the most this server allows at once; wait for one to finish "
            "or cancel one, then submit again.", retry_after_s=30,
        )


def _by_idempotency_key(session: Session, owner: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.owner == owner, Job.idempotency_key == key))


def get_job(session: Session, owner: str, job_id: str) -> Job:
    _check_id(job_id)
    job = session.scalar(select(Job).where(Job.id == job_id, Job.owner == owner))
    if job is None:
        raise _no_job(job_id)
    return job


def _check_id(job_id: str) -> None:
    if not is_id(job_id):  # not one kiln issued: no such job, and nothing odd reaches the database
        raise _no_job(job_id)


def _no_job(job_id: str) -> NotFound:
    return NotFound(f"No job with id {job_id[:100]!r}.")


def with_latest_metrics():
    """Jobs, each with its latest epoch (None before the first) in the same row: one query, not one per job."""
    latest = and_(EpochMetric.job_id == Job.id, EpochMetric.epoch == Job.epochs_completed)
    return select(Job, EpochMetric).outerjoin(EpochMetric, latest)


# GET /v1/jobs/{id} is the route clients poll, so its read is cut down (BENCHMARKS.md, section 5, has what each
# cut bought): one Core statement built once, not per request (building it and its cache key was a fifth of the
# route's CPU); plain rows, not ORM objects; an autocommit connection, not a session (one round trip: no BEGIN,
# no ROLLBACK), on the event loop (kiln.reads); only the columns shown. The row carries the job's
# columns that JobOut shows, and its queue (waiting_reasons reads it), under their own names, and the latest epoch's
# columns as latest_<name>.
METRIC_FIELDS = list(EpochMetrics.model_fields)  # also api.services.metrics's columns
_job, _epoch = Job.__table__, EpochMetric.__table__
_POLLED = (
    select(*(c for c in _job.c if c.name in JobOut.model_fields or c.name == "queue"),
           *(_epoch.c[name].label(f"latest_{name}") for name in METRIC_FIELDS))
    .outerjoin(_epoch, and_(_epoch.c.job_id == _job.c.id, _epoch.c.epoch == _job.c.epochs_completed))
    .where(_job.c.id == bindparam("job_id"), _job.c.owner == bindparam("owner"))
)


async def job_json(owner: str, job_id: str) -> bytes:
    """GET /v1/jobs/{id}: the job and its latest epoch in one query, serialised once. The row stands in for the
    Job: it has the job's columns under their names, which is what JobOut.of and waiting_reasons read."""
    _check_id(job_id)
    found = await reads.rows(_POLLED, job_id=job_id, owner=owner)
    if not found:
        raise _no_job(job_id)
    job = found[0]
    latest = None
    if job.latest_epoch is not None:
        latest = EpochMetrics(**{name: getattr(job, f"latest_{name}") for name in METRIC_FIELDS})
    reason = None
    if job.status == JobStatus.queued:
        live = _recent_live()
        if live is None:
            live = _keep_live(await live_workers_on_loop(get_settings().lease_s))
        reason = waiting_reasons([job], live).get(job.id)
    return JobOut.of(job, latest, reason).model_dump_json().encode()


# A queued job's waiting reason depends on which workers are live, and that changes on the heartbeat's timescale
# (a worker counts as live for the whole lease after its last report). So each API process reads the registry at
# most once a second, not on every poll of a queued job: that read was nearly half the API's CPU per such poll
# (1.2 -> 0.65 ms; BENCHMARKS.md, section 5). One snapshot per process: an API process serves one database.
LIVE_WORKERS_MAX_AGE_S = 1.0
_live: tuple[float, list[LiveWorker]] = (-math.inf, [])


def _recent_live() -> list[LiveWorker] | None:
    """The snapshot, or None when it is over a second old."""
    read_at, live = _live
    return live if time.monotonic() - read_at <= LIVE_WORKERS_MAX_AGE_S else None


def _keep_live(live: list[LiveWorker]) -> list[LiveWorker]:
    global _live
    _live = (time.monotonic(), live)
    return live


def waiting(db: Session | Connection, jobs: list[Job]) -> dict[str, str]:
    """Why the queued ones among `jobs` cannot start yet, by id (no query unless one is queued, and then at most
    one a second)."""
    if not any(job.status == JobStatus.queued for job in jobs):
        return {}
    live = _recent_live()
    if live is None:
        live = _keep_live(live_workers(db, get_settings().lease_s))
    return waiting_reasons(jobs, live)


def latest_metrics(session: Session, job: Job) -> EpochMetric | None:
    if job.epochs_completed == 0:
        return None
    return session.get(EpochMetric, (job.id, job.epochs_completed))


def job_out(session: Session, job: Job) -> JobOut:
    """The job as the API shows it: with its latest epoch and, while queued, why it cannot start yet."""
    return JobOut.of(job, latest_metrics(session, job), waiting(session, [job]).get(job.id))


def list_jobs(
    session: Session, owner: str, *, statuses: Sequence[JobStatus], name: str | None, limit: int,
    cursor: str | None,
) -> tuple[list[tuple[Job, EpochMetric | None]], str | None]:
    """Newest first, with each job's latest metrics joined in one query; keyset pagination."""
    query = (
        with_latest_metrics()
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


def job_log(session: Session, owner: str, job_id: str, after_epoch: int = 0) -> str:
    """The job's log as text, in time order: every transition and every epoch, or only the epochs after
    `after_epoch` (a follower's next read: epochs are committed in order, one row each, so it misses none; the
    few transitions always come whole, since two writers may commit theirs out of order)."""
    job = get_job(session, owner, job_id)
    lines: list[tuple] = []
    for event in session.execute(select(JobEvent.at, JobEvent.id, JobEvent.kind, JobEvent.message)
                                 .where(JobEvent.job_id == job_id).order_by(JobEvent.id)):
        lines.append((event.at, 0, event.id, f"{event.kind:<16} {event.message}"))
    epochs = job.spec.get("epochs", 0)
    columns = (EpochMetric.epoch, EpochMetric.train_loss, EpochMetric.val_loss, EpochMetric.val_accuracy,
               EpochMetric.lr, EpochMetric.duration_s, EpochMetric.attempt, EpochMetric.created_at)
    for m in session.execute(select(*columns).where(EpochMetric.job_id == job_id, EpochMetric.epoch > after_epoch)
                             .order_by(EpochMetric.epoch)):
        parts = [f"epoch {m.epoch}/{epochs}", f"train_loss {m.train_loss:.6g}"]
        parts += [f"{name} {value:.6g}" for name, value in (("val_loss", m.val_loss), ("val_accuracy", m.val_accuracy))
                  if value is not None]
        parts += [f"lr {m.lr:.3g}", f"{m.duration_s:.2f}s", f"attempt {m.attempt}"]
        lines.append((m.created_at, 1, m.epoch, f"{'epoch':<16} " + "  ".join(parts)))
    return "".join(f"{at.isoformat().replace('+00:00', 'Z')} {text}\n" for at, *_, text in sorted(lines))


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


def weights_file(
    session: Session, store: Store, owner: str, job_id: str, part: str
) -> tuple[Job, BinaryIO, str]:
    """The job's weights (part "model") or its autoencoder's encoder (part "encoder"), opened, with the sha256."""
    job = get_job(session, owner, job_id)
    if job.status != JobStatus.succeeded:
        raise Conflict(f"Job {job_id} is {job.status.value}; weights can be downloaded once it has succeeded.")
    if part == "encoder" and job.spec["model"]["type"] != "autoencoder":
        raise Conflict(f"Job {job_id} trained a {job.spec['model']['type']}; only an autoencoder has an encoder.")
    name = ENCODER if part == "encoder" else WEIGHTS
    if job.weights_sha256 is None or (file := store.open_artifact(job.id, name)) is None:
        raise NotFound(f"The weights of job {job_id} are missing from the artifact store.")
    if part == "model":
        return job, file, job.weights_sha256
    sha256 = hashlib.file_digest(file, "sha256").hexdigest()
    file.seek(0)
    return job, file, sha256
