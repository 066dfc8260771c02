"""Run one job: claim it, train it with the pure loop, and record every step under the job's lease.

Celery delivers at least once, so everything here is safe to run twice: the claim is one conditional
UPDATE that only one delivery can win, and every later write is fenced by the lease token it got.
Each epoch: checkpoint on disk (atomic) -> metrics row and checkpoint epoch in one fenced transaction
-> older checkpoint deleted. A new attempt resumes from the checkpoint the database recorded.
"""

import contextlib
import hashlib
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import numpy as np
import torch
from pydantic import ValidationError
from safetensors.numpy import load as load_safetensors
from sqlalchemy import func, literal, or_, select, update
from sqlalchemy.exc import InterfaceError, OperationalError

from kiln.catalog import BUILTIN_DATASETS, DatasetInfo
from kiln.db import UTCDateTime, session_scope, utcnow
from kiln.dispatch import publish_job
from kiln.history import record
from kiln.settings import Settings, get_settings
from kiln.spec import JobSpec
from kiln.storage import ENCODER, WEIGHTS, ArtifactStore
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
    upload: Dataset | None = None  # the uploaded dataset the spec names, as it was validated; None: a built-in


def claim(job_id: str, worker: str, settings: Settings) -> Claim | None:
    """Take the job if it is queued, or running under an expired lease; None if someone else has it."""
    now = utcnow()
    token = str(uuid.uuid4())
    claimable = (Job.id == job_id) & or_(
        Job.status == JobStatus.queued, (Job.status == JobStatus.running) & (Job.lease_expires_at < now)
    )
    with session_scope() as session:
        # Asked to stop while no worker held it (its worker was lost, or it was handed back): never train it.
        if session.execute(
            update(Job).where(claimable, Job.cancel_requested.is_(True))
            .values(status=JobStatus.cancelled, finished_at=now, lease_token=None, lease_expires_at=None)
        ).rowcount:
            record(session, job_id, "cancelled", "cancelled before it could resume", attempt=0, worker=worker)
            return None
        won = session.execute(
            update(Job)
            .where(claimable)
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
        resumed = f", resuming from the epoch-{job.checkpoint_epoch} checkpoint" if job.checkpoint_epoch else ""
        record(session, job_id, "claimed", f"claimed by {worker} (attempt {job.attempt}){resumed}",
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
            job.checkpoint_epoch, limit, job.started_at + timedelta(seconds=limit), upload,
        )


def _fenced(claim: Claim):
    """An UPDATE of this job that matches only while this attempt still holds the lease."""
    return update(Job).where(
        Job.id == claim.job_id, Job.lease_token == claim.token, Job.status == JobStatus.running
    )


def _retrying(write: Callable[[], T], settings: Settings, what: str) -> T:
    """Ride out a database outage shorter than the lease; past that, another attempt takes over."""
    deadline = time.monotonic() + settings.lease_s
    delay = 0.1
    while True:
        try:
            return write()
        except (OperationalError, InterfaceError):
            if time.monotonic() + delay > deadline:
                raise LeaseLost(f"database unreachable for {settings.lease_s:.0f} s while {what}") from None
            log.warning("database unreachable while %s; retrying in %.1f s", what, delay)
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

    def __init__(self, claim: Claim, store: ArtifactStore, settings: Settings) -> None:
        self.claim = claim
        self.store = store
        self.settings = settings

    def on_epoch_end(self, m: EpochMetrics, state: LoopState) -> None:
        path = self.store.checkpoint_path(self.claim.job_id, m.epoch)
        save_checkpoint(path, state.state_dict(), self.claim.spec_digest)
        _retrying(lambda: self._commit(m), self.settings, f"recording epoch {m.epoch}")
        # Only now is the new checkpoint the one a resumed attempt would use.
        for old in self.store.checkpoint_dir(self.claim.job_id).glob("epoch-*.safetensors"):
            if old != path:
                old.unlink(missing_ok=True)
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
            if session.get(EpochMetric, (self.claim.job_id, m.epoch)) is not None:
                return  # this attempt's earlier try committed, and only its acknowledgement was lost
            session.add(
                EpochMetric(
                    job_id=self.claim.job_id, epoch=m.epoch, attempt=self.claim.attempt, train_loss=m.train_loss,
                    val_loss=m.val_loss, val_accuracy=m.val_accuracy, lr=m.lr, duration_s=m.duration_s,
                    samples_per_s=m.samples_per_s, grad_norm=m.grad_norm,
                    grad_norm_per_layer=m.grad_norm_per_layer or None, train_accuracy=m.train_accuracy,
                    val_r2=m.val_r2, created_at=utcnow(),
                )
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
    job_claim = claim(job_id, worker, settings)
    if job_claim is None:
        log.info("job %s: not claimable (taken, finished or cancelled); acknowledging", job_id)
        return None
    log.info("job %s: claimed by %s, attempt %d, resuming after epoch %d", job_id, worker, job_claim.attempt,
             job_claim.resume_epoch)
    try:
        with Lease(job_claim, settings) as lease:
            return _train(job_claim, lease, settings)
    except LeaseLost as exc:
        log.warning("job %s: attempt %d stopped without writing (%s)", job_id, job_claim.attempt, exc or "superseded")
        return None
    except Exception as exc:  # a bug or a resource error: fail the job with a sentence, not silence
        log.exception("job %s: training crashed", job_id)
        with contextlib.suppress(LeaseLost):
            error = f"the worker hit an unexpected {type(exc).__name__}; its log has the details"
            _finish(job_claim, settings, JobStatus.failed, error, None, finished_at=utcnow(), error=error)
        return JobStatus.failed


def _load_upload(upload: Dataset, store: ArtifactStore) -> tuple[np.ndarray, np.ndarray, DatasetInfo]:
    """An uploaded dataset's arrays (safetensors: no pickle), checked against the record the spec was
    validated with."""
    path = store.open_dataset(upload.id)
    if path is None:
        raise RuntimeError(f"the file of dataset {upload.id} is missing from the artifact store")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != upload.sha256:
        raise RuntimeError(f"the file of dataset {upload.id} is damaged: its sha256 is not the upload's")
    info = upload.info()
    arrays = load_safetensors(data)
    x, y, loaded = load_arrays(info.name, arrays["x"].reshape(-1, *info.input_shape), arrays["y"], info.task)
    if loaded != info:
        raise RuntimeError(f"the file of dataset {upload.id} does not match its record ({loaded} is not {info})")
    return x, y, loaded


def _train(claim: Claim, lease: Lease, settings: Settings) -> JobStatus:
    spec = claim.spec
    store = ArtifactStore(settings.artifacts_path)
    store.checkpoint_dir(claim.job_id).mkdir(parents=True, exist_ok=True)
    dataset = _load_upload(claim.upload, store) if claim.upload else None
    job = prepare(spec, torch.device("cpu"), dataset=dataset)
    resume = None
    if claim.resume_epoch:
        try:
            resume = load_checkpoint(store.checkpoint_path(claim.job_id, claim.resume_epoch), claim.spec_digest)
        except (CheckpointError, FileNotFoundError) as exc:
            raise RuntimeError(f"the epoch-{claim.resume_epoch} checkpoint cannot be read ({exc})") from exc

    recorder = EpochRecorder(claim, store, settings)
    try:
        result = fit(job.model, job.data, spec, callbacks=[recorder], should_stop=lease.should_stop, resume=resume)
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
            publish_job(claim.job_id)  # if the broker is unreachable, the reconciler publishes it later
            return JobStatus.queued

    meta = job.meta | {"job_id": claim.job_id}
    sha256 = save_weights(store.path(claim.job_id, WEIGHTS), job.model, meta)
    if spec.model.type == "autoencoder":  # the encoder alone is what embeds new rows
        save_weights(store.path(claim.job_id, ENCODER), *encoder_weights(job.model, meta))
    early = result.stopped.removeprefix("early_stopping: ") if result.stopped else None
    message = f"succeeded after {done} epochs" + (f"; stopped early: {early}" if early else "")
    _finish(claim, settings, JobStatus.succeeded, message, done, finished_at=utcnow(), weights_sha256=sha256,
            stop_reason=early, lr_search=result.lr_search)
    shutil.rmtree(store.checkpoint_dir(claim.job_id), ignore_errors=True)  # a finished job never resumes
    return JobStatus.succeeded
