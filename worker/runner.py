"""Run one job: claim it, train it with the pure loop, and record every step under the job's lease.

Celery delivers at least once, so everything here is safe to run twice: the claim is one conditional
UPDATE that only one delivery can win, and every later write is fenced by the lease token it got.
Each epoch: checkpoint written to local scratch and put in the artifact store (whole, or not at all) -> metrics
row and checkpoint epoch in one fenced transaction -> the checkpoint it replaced deleted. A new attempt, on any worker,
fetches the checkpoint the database recorded from the store and resumes from it.
"""

import contextlib
import functools
import hashlib
import logging
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from pydantic import ValidationError
from safetensors.numpy import load as load_safetensors
from sqlalchemy import func, literal, or_, select, update
from sqlalchemy.exc import InterfaceError, OperationalError

from kiln.catalog import BUILTIN_DATASETS, DatasetInfo
from kiln.db import UTCDateTime, dialect_insert, session_scope, utcnow
from kiln.dispatch import publish_job
from kiln.epoch_counts import count_epoch
from kiln.epochs import json_safe, render_epoch
from kiln.history import record
from kiln.settings import Settings, get_settings
from kiln.spec import JobSpec
from kiln.storage import ENCODER, WEIGHTS, Store, StoreUnavailable, checkpoint_name, make_store
from kiln.tables import Dataset, EpochMetric, Job, JobStatus
from models.weights import encoder_weights, save_weights
from worker.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, spec_hash
from worker.datasets import load_arrays
from worker.preparation import prepare
from worker.training import DivergedError, EpochMetrics, LoopState, fit

log = logging.getLogger("kiln.worker")

# Set in a worker process when its Celery worker is shutting down (see worker.celery_app).
shutdown_requested = threading.Event()

T = TypeVar("T")


class LeaseLost(Exception):
    """Another attempt owns this job now (or could not be told otherwise); stop without writing."""


class NeedsGpu(Exception):
    """A CUDA job reached a process without a GPU (routing keeps them apart; a misconfigured consumer does not).
    The claim is not made: the message is acknowledged and the reconciler publishes the job again later."""


@dataclass(frozen=True)
class Claim:
    job_id: str
    token: str
    attempt: int
    worker: str
    spec: JobSpec
    spec_digest: str
    resume_epoch: int  # the checkpoint to resume from; 0 means from scratch
    time_limit_s: int
    deadline: datetime  # the time limit, counted from the job's first start
    queue: str = "kiln"  # where the job goes if it is handed back
    upload: Dataset | None = None  # the uploaded dataset the spec names, as it was validated; None: a built-in


def claim(job_id: str, worker: str, settings: Settings) -> Claim | None:
    """Take the job if it is queued, or running under an expired lease; None if someone else has it."""
    gpu = _gpu_name()  # before the transaction: a process's first call initialises CUDA, which takes seconds
    now = utcnow()
    token = str(uuid.uuid4())
    claimable = (Job.id == job_id) & or_(
        Job.status == JobStatus.queued, (Job.status == JobStatus.running) & (Job.lease_expires_at < now)
    )
    with session_scope() as session:
        # Asked to stop while no worker held it (its worker was lost, or it was handed back): never train it.
        if session.execute(
            _update_job(claimable, Job.cancel_requested.is_(True))
            .values(status=JobStatus.cancelled, finished_at=now, lease_token=None, lease_expires_at=None)
        ).rowcount:
            record(session, job_id, "cancelled", "cancelled before it could resume", attempt=0, worker=worker)
            return None
        won = session.execute(
            _update_job(claimable)
            .values(
                status=JobStatus.running, attempt=Job.attempt + 1, lease_token=token,
                lease_expires_at=now + timedelta(seconds=settings.lease_s), worker=worker,
                started_at=func.coalesce(Job.started_at, literal(now, UTCDateTime())),
                epochs_completed=Job.checkpoint_epoch,
            )
        ).rowcount == 1
        if not won:
            return None
        job = session.get_one(Job, job_id)
        requested = job.spec.get("resources", {}).get("device", "cpu")
        if requested == "cuda" and gpu is None:
            raise NeedsGpu(f"job {job_id} needs a CUDA GPU and worker {worker} has none: left queued; do not "
                           f"start CPU-only workers on the queue {job.queue}")  # rolls the claim back
        resumed = f", resuming from the epoch-{job.checkpoint_epoch} checkpoint" if job.checkpoint_epoch else ""
        where = f"cuda ({gpu})" if training_device(requested).type == "cuda" else "cpu"
        record(session, job_id, "claimed", f"claimed by {worker} on {where} (attempt "
               f"{job.attempt}){resumed}",
               attempt=job.attempt, worker=worker, epoch=job.checkpoint_epoch or None)
        # The spec is validated as at submit: against the owner's upload when it names one.
        name = job.spec["data"]["dataset"]
        upload = None if name in BUILTIN_DATASETS else session.scalar(
            select(Dataset).where(Dataset.id == name, Dataset.owner == job.owner))
        try:
            spec = JobSpec.model_validate(job.spec, context={"datasets": {name: upload.info()} if upload else {}})
        except ValidationError as exc:
            error = f"the spec no longer validates: {exc.errors()[0]['msg'].removeprefix('Value error, ')}"
            session.execute(update(Job).where(Job.id == job_id).values(
                status=JobStatus.failed, error=error, finished_at=now, lease_token=None, lease_expires_at=None))
            record(session, job_id, "failed", error, attempt=job.attempt, worker=worker)
            return None
        limit = job.spec.get("time_limit_s") or settings.default_time_limit_s
        return Claim(
            job_id, token, job.attempt, worker, spec, spec_hash(job.spec),
            job.checkpoint_epoch, limit, job.started_at + timedelta(seconds=limit), job.queue, upload,
        )


def training_device(requested: str) -> torch.device:
    """Where a job asking for device `requested` trains here: "cuda" and "auto" take this process's GPU
    (CUDA_VISIBLE_DEVICES pins one per worker process) when it has one."""
    return torch.device("cuda" if requested != "cpu" and _gpu_name() is not None else "cpu")


@functools.cache
def _gpu_name() -> str | None:
    """This process's GPU (CUDA_VISIBLE_DEVICES pins one per worker process), or None. Asked outside the claim's
    transaction: on a GPU host the first ask initialises CUDA, seconds during which the claim would hold the job's
    row lock (and on SQLite the whole database's write lock)."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _update_job(*criteria):
    """An UPDATE of the jobs matching `criteria`. Runner sessions load the Job only after updating it, so there is
    nothing in the session to synchronise: saying so skips SQLAlchemy's per-statement evaluation (~0.1-0.2 ms)."""
    return update(Job).where(*criteria).execution_options(synchronize_session=False)


def _fenced(claim: Claim):
    """An UPDATE of this job that matches only while this attempt still holds the lease."""
    return _update_job(Job.id == claim.job_id, Job.lease_token == claim.token, Job.status == JobStatus.running)


def _retrying(write: Callable[[], T], settings: Settings, what: str) -> T:
    """Ride out a database or artifact-store outage shorter than the lease. Past that, for the database another
    attempt takes over; for the store the StoreUnavailable propagates and the job fails with its sentence."""
    deadline = time.monotonic() + settings.lease_s
    delay = 0.1
    while True:
        try:
            return write()
        except (OperationalError, InterfaceError, StoreUnavailable) as exc:
            store = isinstance(exc, StoreUnavailable)
            if time.monotonic() + delay > deadline:
                if store:
                    raise StoreUnavailable(f"{exc} Still failing after {settings.lease_s:.0f} s of retries.") from exc
                raise LeaseLost(f"database unreachable for {settings.lease_s:.0f} s while {what}") from None
            log.warning("%s unreachable while %s; retrying in %.1f s", "artifact store" if store else "database",
                        what, delay)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


class Lease:
    """Renews the lease on a background thread and turns a cancel request, a lost lease, the time
    limit or a worker shutdown into a reason the training loop reads at every batch boundary."""

    def __init__(self, claim: Claim, settings: Settings) -> None:
        self.claim = claim
        self.settings = settings
        self.reason: str | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{claim.job_id[:8]}", daemon=True)

    def __enter__(self) -> "Lease":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def should_stop(self) -> str | None:
        if self.reason is None:
            if shutdown_requested.is_set():
                self.reason = "shutdown"
            elif utcnow() >= self.claim.deadline:
                self.reason = "time limit"
        return self.reason

    def _run(self) -> None:
        while not self._done.wait(self.settings.heartbeat_s):
            try:
                self.renew()
            except LeaseLost:
                log.warning("job %s: lease lost; stopping attempt %d", self.claim.job_id, self.claim.attempt)
                self.reason = "lease lost"
                return
            except Exception as exc:  # database briefly unreachable: keep training; the next fenced write decides
                log.warning("job %s: heartbeat failed (%s)", self.claim.job_id, type(exc).__name__)

    def renew(self) -> None:
        expires = utcnow() + timedelta(seconds=self.settings.lease_s)
        with session_scope() as session:
            if session.execute(_fenced(self.claim).values(lease_expires_at=expires)).rowcount != 1:
                raise LeaseLost
            if session.get_one(Job, self.claim.job_id).cancel_requested:
                self.reason = self.reason or "cancelled"


class EpochRecorder:
    """The loop's callback: checkpoint, then the epoch's metrics and checkpoint epoch under the lease."""

    def __init__(self, claim: Claim, store: Store, settings: Settings, scratch: Path) -> None:
        self.claim = claim
        self.store = store
        self.settings = settings
        self.scratch = scratch

    def on_epoch_end(self, m: EpochMetrics, state: LoopState) -> None:
        local = self.scratch / checkpoint_name(m.epoch)
        save_checkpoint(local, state.state_dict(), self.claim.spec_digest)
        # Stored before it is recorded: the database never names a checkpoint the store does not hold whole.
        _retrying(lambda: self.store.put_checkpoint(self.claim.job_id, m.epoch, local), self.settings,
                  f"storing the epoch-{m.epoch} checkpoint")
        _retrying(lambda: self._commit(m), self.settings, f"recording epoch {m.epoch}")
        # Only now is the new checkpoint the one a resumed attempt would use, and the one it replaces, the previous
        # epoch's (this attempt's, or the one it resumed from), can go. A checkpoint stored by an attempt that lost
        # its lease before recording it is overwritten by the next attempt's of the same epoch, then dropped.
        if m.epoch > 1:
            self.store.drop_checkpoint(self.claim.job_id, m.epoch - 1)
        log.info("job %s attempt %d epoch %d train_loss %.4f", self.claim.job_id, self.claim.attempt, m.epoch,
                 m.train_loss)

    def _commit(self, m: EpochMetrics) -> None:
        expires = utcnow() + timedelta(seconds=self.settings.lease_s)
        with session_scope() as session:
            fenced = _fenced(self.claim).values(
                epochs_completed=m.epoch, checkpoint_epoch=m.epoch, lease_expires_at=expires
            )
            if session.execute(fenced).rowcount != 1:
                raise LeaseLost
            values = epoch_values(m, self.claim.attempt)
            row = {"job_id": self.claim.job_id, **values, "rendered": render_epoch(values), "created_at": utcnow()}
            if session.execute(_new_epoch(session.get_bind().dialect.name), row).rowcount == 1:
                count_epoch(session, m.duration_s)  # last: it locks its bucket's row until the commit
            # else this attempt's earlier try committed the epoch, and only its acknowledgement was lost


@functools.cache
def _new_epoch(dialect: str):
    """The epoch's row, unless it is there already; built once per dialect. On the table, not the ORM class, and
    with preserve_rowcount: only then does an INSERT's result carry the rowcount that says whether it wrote."""
    insert = dialect_insert(dialect)(EpochMetric.__table__).on_conflict_do_nothing()
    return insert.execution_options(preserve_rowcount=True)


def epoch_values(m: EpochMetrics, attempt: int) -> dict[str, Any]:
    """The epoch_metrics row's columns for an epoch of the loop. A per-layer gradient norm that overflowed is
    null: JSON has no infinity, and PostgreSQL refuses the row that holds one (the API shows it as null anyway)."""
    return dict(
        epoch=m.epoch, attempt=attempt, train_loss=m.train_loss, val_loss=m.val_loss, val_accuracy=m.val_accuracy,
        lr=m.lr, duration_s=m.duration_s, samples_per_s=m.samples_per_s, grad_norm=m.grad_norm,
        grad_norm_per_layer=json_safe(m.grad_norm_per_layer) or None, train_accuracy=m.train_accuracy, val_r2=m.val_r2,
    )


def _finish(
    claim: Claim, settings: Settings, status: JobStatus, message: str, epoch: int | None, **values: Any
) -> None:
    """The attempt's last fenced write: a terminal status, or back to the queue (values say which)."""

    def write() -> None:
        with session_scope() as session:
            done = session.execute(
                _fenced(claim).values(status=status, lease_token=None, lease_expires_at=None, **values)
            )
            if done.rowcount != 1:
                raise LeaseLost
            record(session, claim.job_id, status.value if status.terminal else "handed_back", message,
                   attempt=claim.attempt, worker=claim.worker, epoch=epoch)

    _retrying(write, settings, f"recording that the job {status.value}")
    log.info("job %s attempt %d finished: %s", claim.job_id, claim.attempt, message)


def run_job(job_id: str, worker: str, settings: Settings | None = None) -> JobStatus | None:
    """Claim and train one job; returns its final status, or None if this delivery had nothing to do."""
    settings = settings or get_settings()
    try:
        job_claim = claim(job_id, worker, settings)
    except NeedsGpu as exc:
        log.error("%s", exc)
        return None
    if job_claim is None:
        log.info("job %s: not claimable (taken, finished or cancelled); acknowledging", job_id)
        return None
    log.info("job %s: claimed by %s, attempt %d, resuming after epoch %d", job_id, worker, job_claim.attempt,
             job_claim.resume_epoch)
    try:
        with Lease(job_claim, settings) as lease:
            return _train(job_claim, lease, settings)
    except LeaseLost as exc:
        log.warning("job %s: attempt %d stopped without writing (%s)", job_id, job_claim.attempt,
                    str(exc) or "superseded")
        return None
    except StoreUnavailable as exc:  # the store's own sentence (and, for a write, how long it was retried)
        log.error("job %s: %s", job_id, exc)
        with contextlib.suppress(LeaseLost):
            error = str(exc)
            _finish(job_claim, settings, JobStatus.failed, error, None, finished_at=utcnow(), error=error)
        return JobStatus.failed
    except Exception as exc:  # a bug or a resource error: fail the job with a sentence, not silence
        log.exception("job %s: training crashed", job_id)
        with contextlib.suppress(LeaseLost):
            error = f"the worker hit an unexpected {type(exc).__name__}; its log has the details"
            _finish(job_claim, settings, JobStatus.failed, error, None, finished_at=utcnow(), error=error)
        return JobStatus.failed


def _load_upload(upload: Dataset, store: Store) -> tuple[np.ndarray, np.ndarray, DatasetInfo]:
    """An uploaded dataset's arrays (safetensors: no pickle), checked against the record the spec was
    validated with."""
    file = store.open_dataset(upload.id)
    if file is None:
        raise RuntimeError(f"the file of dataset {upload.id} is missing from the artifact store")
    with file:
        data = file.read()
    if hashlib.sha256(data).hexdigest() != upload.sha256:
        raise RuntimeError(f"the file of dataset {upload.id} is damaged: its sha256 is not the upload's")
    info = upload.info()
    arrays = load_safetensors(data)
    x, y, loaded = load_arrays(info.name, arrays["x"].reshape(-1, *info.input_shape), arrays["y"], info.task)
    if loaded != info:
        raise RuntimeError(f"the file of dataset {upload.id} does not match its record ({loaded} is not {info})")
    return x, y, loaded


def _train(claim: Claim, lease: Lease, settings: Settings) -> JobStatus:
    # Files are written to local scratch and handed to the store, which may be on another machine (S3). One
    # directory per attempt: a superseded attempt still running on this host never touches its successor's files.
    (settings.data_dir / "scratch").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=settings.data_dir / "scratch", prefix=f"{claim.job_id}.") as scratch:
        return _train_in(claim, lease, settings, make_store(settings), Path(scratch))


def _train_in(claim: Claim, lease: Lease, settings: Settings, store: Store, scratch: Path) -> JobStatus:
    spec = claim.spec
    dataset = _load_upload(claim.upload, store) if claim.upload else None
    job = prepare(spec, training_device(spec.resources.device), dataset=dataset)
    resume = None
    if claim.resume_epoch:
        local = scratch / checkpoint_name(claim.resume_epoch)
        try:
            if not store.fetch_checkpoint(claim.job_id, claim.resume_epoch, local):
                raise FileNotFoundError(f"the artifact store has no {local.name}")
            resume = load_checkpoint(local, claim.spec_digest)
        except (CheckpointError, FileNotFoundError) as exc:
            raise RuntimeError(f"the epoch-{claim.resume_epoch} checkpoint cannot be read ({exc})") from exc
        local.unlink()

    recorder = EpochRecorder(claim, store, settings, scratch)
    try:
        result = fit(job.model, job.data, spec, callbacks=[recorder], should_stop=lease.should_stop, resume=resume,
                     bf16=spec.resources.precision == "bf16")
    except DivergedError as exc:
        _finish(claim, settings, JobStatus.failed, str(exc), exc.epoch, finished_at=utcnow(), error=str(exc))
        return JobStatus.failed
    done = result.history[-1].epoch if result.history else claim.resume_epoch

    match result.stopped:
        case "lease lost":
            raise LeaseLost("superseded")
        case "cancelled":
            _finish(claim, settings, JobStatus.cancelled, f"cancelled during epoch {done + 1}", done,
                    finished_at=utcnow())
            return JobStatus.cancelled
        case "time limit":
            kept = f"the epoch-{done} checkpoint is kept" if done else "no epoch had completed"
            error = f"time limit of {claim.time_limit_s} s exceeded during epoch {done + 1}; {kept}"
            _finish(claim, settings, JobStatus.failed, error, done, finished_at=utcnow(), error=error)
            return JobStatus.failed
        case "shutdown":
            # Hand the job back at once instead of waiting for the lease to lapse; the next attempt
            # resumes from the last checkpoint, so at most the current epoch is trained again.
            _finish(claim, settings, JobStatus.queued,
                    f"handed back by {claim.worker} (shutting down) after epoch {done}", done, worker=None,
                    published_at=None)
            publish_job(claim.job_id, claim.queue)  # if the broker is unreachable, the reconciler publishes it later
            return JobStatus.queued

    meta = job.meta | {"job_id": claim.job_id}
    sha256 = save_weights(scratch / WEIGHTS, job.model, meta)
    _retrying(lambda: store.put_artifact(claim.job_id, WEIGHTS, scratch / WEIGHTS), settings, "storing the weights")
    if spec.model.type == "autoencoder":  # the encoder alone is what embeds new rows
        save_weights(scratch / ENCODER, *encoder_weights(job.model, meta))
        _retrying(lambda: store.put_artifact(claim.job_id, ENCODER, scratch / ENCODER), settings,
                  "storing the encoder")
    early = result.stopped.removeprefix("early_stopping: ") if result.stopped else None
    message = f"succeeded after {done} epochs" + (f"; stopped early: {early}" if early else "")
    _finish(claim, settings, JobStatus.succeeded, message, done, finished_at=utcnow(), weights_sha256=sha256,
            stop_reason=early, lr_search=result.lr_search)
    store.drop_checkpoints(claim.job_id)  # a finished job never resumes
    return JobStatus.succeeded
