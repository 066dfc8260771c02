"""Run one job: claim it, train it with the pure loop, and record every step under the job's lease.

Celery delivers at least once, so everything here is safe to run twice: the claim is one conditional
UPDATE that only one delivery can win, and every later write is fenced by the lease token it got.
"""

import contextlib
import logging
import threading
import uuid
from dataclasses import dataclass
from datetime import timedelta

import torch
from sqlalchemy import delete, or_, update

from kiln.catalog import BUILTIN_DATASETS
from kiln.db import session_scope, utcnow
from kiln.settings import Settings, get_settings
from kiln.spec import JobSpec
from kiln.storage import WEIGHTS, ArtifactStore
from kiln.tables import EpochMetric, Job, JobStatus
from models import build_model
from models.weights import save_weights
from worker.datasets import load_dataset, split_dataset
from worker.training import DivergedError, EpochMetrics, LoopState, TrainData, fit, output_size

log = logging.getLogger("kiln.worker")


class LeaseLost(Exception):
    """Another attempt owns this job now; this one must stop without writing anything."""


@dataclass(frozen=True)
class Claim:
    job_id: str
    token: str
    attempt: int
    spec: JobSpec


def claim(job_id: str, worker: str, settings: Settings) -> Claim | None:
    """Take the job if it is queued, or running under an expired lease; None if someone else has it."""
    now = utcnow()
    token = str(uuid.uuid4())
    with session_scope() as session:
        won = session.execute(
            update(Job)
            .where(
                Job.id == job_id,
                or_(
                    Job.status == JobStatus.queued,
                    (Job.status == JobStatus.running) & (Job.lease_expires_at < now),
                ),
            )
            .values(
                status=JobStatus.running, attempt=Job.attempt + 1, lease_token=token,
                lease_expires_at=now + timedelta(seconds=settings.lease_s), worker=worker,
                started_at=now, epochs_completed=0,
            )
        ).rowcount == 1
        if not won:
            return None
        # Without checkpoints a new attempt starts over, so an earlier attempt's epochs are void.
        session.execute(delete(EpochMetric).where(EpochMetric.job_id == job_id))
        job = session.get_one(Job, job_id)
        return Claim(job_id, token, job.attempt, JobSpec.model_validate(job.spec))


def _fenced(claim: Claim):
    """An UPDATE of this job that matches only while this attempt still holds the lease."""
    return update(Job).where(
        Job.id == claim.job_id, Job.lease_token == claim.token, Job.status == JobStatus.running
    )


class Lease:
    """Renews the lease on a background thread and turns a cancel request into an in-memory flag
    that the training loop reads at every batch boundary (no database query per batch)."""

    def __init__(self, claim: Claim, settings: Settings) -> None:
        self.claim = claim
        self.settings = settings
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{claim.job_id[:8]}", daemon=True)

    def __enter__(self) -> "Lease":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def should_stop(self) -> str | None:
        if self.lost.is_set():
            return "lease lost"
        return "cancelled" if self.cancelled.is_set() else None

    def _run(self) -> None:
        while not self._done.wait(self.settings.heartbeat_s):
            try:
                self.renew()
            except LeaseLost:
                log.warning("job %s: lease lost; stopping this attempt", self.claim.job_id)
                self.lost.set()
                return
            except Exception:  # database briefly unreachable: keep training, try again next beat
                log.warning("job %s: heartbeat failed", self.claim.job_id, exc_info=True)

    def renew(self) -> None:
        expires = utcnow() + timedelta(seconds=self.settings.lease_s)
        with session_scope() as session:
            if session.execute(_fenced(self.claim).values(lease_expires_at=expires)).rowcount != 1:
                raise LeaseLost
            if session.get_one(Job, self.claim.job_id).cancel_requested:
                self.cancelled.set()


class EpochRecorder:
    """The training loop's callback: one metrics row per epoch, written under the lease."""

    def __init__(self, claim: Claim, settings: Settings) -> None:
        self.claim = claim
        self.settings = settings

    def on_epoch_end(self, m: EpochMetrics, state: LoopState) -> None:
        expires = utcnow() + timedelta(seconds=self.settings.lease_s)
        with session_scope() as session:
            fenced = _fenced(self.claim).values(epochs_completed=m.epoch, lease_expires_at=expires)
            if session.execute(fenced).rowcount != 1:
                raise LeaseLost
            session.add(
                EpochMetric(
                    job_id=self.claim.job_id, epoch=m.epoch, train_loss=m.train_loss, val_loss=m.val_loss,
                    val_accuracy=m.val_accuracy, lr=m.lr, duration_s=m.duration_s,
                    samples_per_s=m.samples_per_s, created_at=utcnow(),
                )
            )
        log.info("job %s epoch %d train_loss %.4f", self.claim.job_id, m.epoch, m.train_loss)


def _finish(claim: Claim, status: JobStatus, **values) -> None:
    with session_scope() as session:
        done = session.execute(
            _fenced(claim).values(status=status, finished_at=utcnow(), lease_token=None, **values)
        )
        if done.rowcount != 1:
            raise LeaseLost


def run_job(job_id: str, worker: str, settings: Settings | None = None) -> JobStatus | None:
    """Claim and train one job; returns its final status, or None if this delivery had nothing to do."""
    settings = settings or get_settings()
    job_claim = claim(job_id, worker, settings)
    if job_claim is None:
        log.info("job %s: not claimable (taken, finished or cancelled); acknowledging", job_id)
        return None
    log.info("job %s: claimed by %s, attempt %d", job_id, worker, job_claim.attempt)
    try:
        with Lease(job_claim, settings) as lease:
            return _train(job_claim, lease, settings)
    except LeaseLost:
        log.warning("job %s: attempt %d superseded; its results are discarded", job_id, job_claim.attempt)
        return None
    except Exception as exc:  # a bug or a resource error: fail the job with a sentence, not silence
        log.exception("job %s: training crashed", job_id)
        with contextlib.suppress(LeaseLost):
            _finish(job_claim, JobStatus.failed, error=f"the worker crashed: {type(exc).__name__}: {exc}")
        return JobStatus.failed


def _train(claim: Claim, lease: Lease, settings: Settings) -> JobStatus:
    spec = claim.spec
    info = BUILTIN_DATASETS[spec.data.dataset]
    x, y = load_dataset(spec.data, spec.seed)
    split = split_dataset(x, y, info.task, spec.data.val_fraction, spec.seed)
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, x.shape[1], output_size(info.task, info.classes, spec.loss))
    data = TrainData.from_split(split, info.task, spec.loss, torch.device("cpu"))
    try:
        result = fit(model, data, spec, callbacks=[EpochRecorder(claim, settings)], should_stop=lease.should_stop)
    except DivergedError as exc:
        _finish(claim, JobStatus.failed, error=str(exc))
        return JobStatus.failed
    if lease.lost.is_set():
        raise LeaseLost
    if result.stopped == "cancelled":
        _finish(claim, JobStatus.cancelled)
        return JobStatus.cancelled

    meta = {
        "format": "kiln.weights/1",
        "model": spec.model.model_dump(mode="json"),
        "in_features": int(x.shape[1]),
        "out_features": output_size(info.task, info.classes, spec.loss),
        "task": info.task.value,
        "loss": spec.loss,
        "classes": info.classes,
        "input_mean": split.input_mean.tolist(),
        "input_std": split.input_std.tolist(),
        "target_mean": split.target_mean,
        "target_std": split.target_std,
        "spec": spec.model_dump(mode="json"),
        "job_id": claim.job_id,
    }
    path = ArtifactStore(settings.artifacts_path).path(claim.job_id, WEIGHTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    sha256 = save_weights(path, model, meta)
    _finish(claim, JobStatus.succeeded, weights_sha256=sha256)
    return JobStatus.succeeded
