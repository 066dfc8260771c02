"""A job's visible history: one row per transition, each with a sentence a person can read."""

from sqlalchemy.orm import Session

from kiln.db import utcnow
from kiln.tables import JobEvent


def record(
    session: Session, job_id: str, kind: str, message: str, *, attempt: int,
    worker: str | None = None, epoch: int | None = None,
) -> None:
    session.add(
        JobEvent(job_id=job_id, at=utcnow(), kind=kind, attempt=attempt, worker=worker, epoch=epoch, message=message)
    )
