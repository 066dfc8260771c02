"""The reconciler: the database says what should be running; make the broker agree.

Run periodically by every API process. Every step is a conditional UPDATE or an idempotent publish, so two
passes at once would do no harm (the worker's claim lets only one delivery train), but they would do some work
twice: both publish a stranded job, both read the broker. So on PostgreSQL one pass runs at a time across all API
processes and replicas: a pass first takes an advisory lock, and a process that finds it taken skips its turn.
On SQLite (one machine, `kiln up` runs one API process there) every pass runs.
"""

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from kiln.db import utcnow
from kiln.dispatch import job_ids_in_broker, publish_job
from kiln.history import record
from kiln.settings import Settings
from kiln.tables import Job, JobEvent, JobStatus

log = logging.getLogger("kiln.reconciler")
BATCH = 500
# The advisory lock a pass holds on PostgreSQL: any bigint nothing else locks. The per-owner job-limit locks
# (api/services/jobs.py) use hashtext(owner), which is a 32-bit value: this one is far above that range.
LOCK_KEY = int.from_bytes(b"kilnreco")
# A worker takes a message in two steps (kombu pops it from the queue, then records it as unacknowledged), and
# for that moment the broker holds it nowhere: a job is lost only if two reads this far apart both miss it.
SECOND_LOOK_S = 1.0


@dataclass
class Reconciled:
    published: int = 0  # left in the outbox by a failed or never-attempted publish
    requeued: int = 0  # lease expired: the worker died or lost its way to the database
    gave_up: int = 0  # lease expired on the last allowed attempt
    republished: int = 0  # queued, published, but the broker no longer holds the message

    def __bool__(self) -> bool:
        return any(vars(self).values())


def reconcile(session: Session, settings: Settings) -> Reconciled:
    """One pass; nothing (an empty Reconciled) when another process's pass holds the lock."""
    done = Reconciled()
    with sole_pass(session) as sole:
        if not sole:
            log.debug("another process is reconciling; skipping this turn")
            return done
        _expired_leases(session, settings, done)
        _lost_messages(session, settings, done)
        _outbox(session, settings, done)
    return done


@contextlib.contextmanager
def sole_pass(session: Session) -> Iterator[bool]:
    """Whether this pass may run. On PostgreSQL: if pg_try_advisory_xact_lock(LOCK_KEY) succeeds, on a connection
    of its own whose transaction stays open for the whole pass (the pass commits after each job on the session's
    connection, which a transaction-level lock there would not survive). The lock goes with that transaction
    however the pass ends: an exception rolls it back, a process that dies drops the connection. Never waits."""
    engine = session.get_bind()
    if engine.dialect.name != "postgresql":
        yield True
        return
    with engine.connect() as conn, conn.begin():
        yield bool(conn.scalar(select(func.pg_try_advisory_xact_lock(LOCK_KEY))))


def _expired_leases(session: Session, settings: Settings, done: Reconciled) -> None:
    now = utcnow()
    expired = session.execute(
        select(Job.id, Job.attempt, Job.worker, Job.epochs_completed, Job.cancel_requested)
        .where(Job.status == JobStatus.running, Job.lease_expires_at < now)
        .limit(BATCH)
    ).all()
    for job_id, attempt, worker, epoch, cancel_requested in expired:
        still_expired = (Job.id == job_id) & (Job.status == JobStatus.running) & (Job.lease_expires_at < now)
        lost = f"worker {worker} lost during epoch {epoch + 1} (no heartbeat for {settings.lease_s:.0f} s)"
        # Hand-backs (deploys, scale-downs) are not losses: only lost workers count towards giving up.
        losses = 1 + session.scalar(
            select(func.count()).select_from(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == "worker_lost")
        )
        if cancel_requested:  # the user asked it to stop; do not train it again
            changed = session.execute(
                update(Job).where(still_expired).values(
                    status=JobStatus.cancelled, finished_at=now, lease_token=None, lease_expires_at=None
                )
            ).rowcount
            if changed:
                record(session, job_id, "cancelled", f"{lost}; it had been asked to stop, so it is cancelled",
                       attempt=attempt, worker=worker, epoch=epoch)
        elif losses >= settings.max_attempts:
            error = f"worker lost {losses} times; giving up"
            changed = session.execute(
                update(Job).where(still_expired).values(
                    status=JobStatus.failed, error=error, finished_at=now, lease_token=None, lease_expires_at=None
                )
            ).rowcount
            if changed:
                record(session, job_id, "failed", f"{lost}; {error}", attempt=attempt, worker=worker, epoch=epoch)
                done.gave_up += 1
        else:
            # Back to the queue with the lease cleared: the lost attempt's fenced writes now fail, so even a
            # worker that was only cut off, not dead, cannot write beside the next attempt.
            changed = session.execute(
                update(Job).where(still_expired).values(
                    status=JobStatus.queued, lease_token=None, lease_expires_at=None, worker=None, published_at=None
                )
            ).rowcount
            if changed:
                record(session, job_id, "worker_lost", f"{lost}; queued again", attempt=attempt, worker=worker,
                       epoch=epoch)
                done.requeued += 1
        session.commit()


def _lost_messages(session: Session, settings: Settings, done: Reconciled) -> None:
    cutoff = utcnow() - timedelta(seconds=settings.lost_message_grace_s)
    waiting = dict(session.execute(
        select(Job.id, Job.queue).where(Job.status == JobStatus.queued, Job.published_at < cutoff).limit(BATCH)
    ).all())
    if not waiting:
        return
    session.rollback()  # end the read transaction before the broker reads (SQLite: release the snapshot)

    def not_held() -> set[str] | None:
        held = job_ids_in_broker(settings, set(waiting.values()), delivered_within_s=settings.lease_s)
        return None if held is None else set(waiting) - held

    if missing := not_held():
        time.sleep(SECOND_LOOK_S)
        again = not_held()
        missing = None if again is None else missing & again
    if not missing:  # None: the broker cannot be read right now; the next pass tries again
        return
    for job_id in missing:
        changed = session.execute(
            update(Job).where(Job.id == job_id, Job.status == JobStatus.queued, Job.published_at < cutoff)
            .values(published_at=None)
        ).rowcount
        if changed:
            record(session, job_id, "message_lost", "the broker lost the job's message; publishing it again",
                   attempt=0)
            done.republished += 1
        session.commit()


def _outbox(session: Session, settings: Settings, done: Reconciled) -> None:
    cutoff = utcnow() - timedelta(seconds=settings.outbox_grace_s)
    stranded = session.execute(
        select(Job.id, Job.queue)
        .where(Job.status == JobStatus.queued, Job.published_at.is_(None), Job.created_at < cutoff)
        .order_by(Job.created_at)
        .limit(BATCH)
    ).all()
    session.rollback()  # end the read transaction before publishing (SQLite: release the snapshot)
    for job_id, queue in stranded:
        if not publish_job(job_id, queue):
            break  # the broker is down: the rest waits for the next round, not behind a timeout each
        done.published += 1
