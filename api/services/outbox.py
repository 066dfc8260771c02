"""The outbox sweep: jobs committed but never handed to the broker get published again."""

from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.services.jobs import publish
from kiln.db import utcnow
from kiln.tables import Job, JobStatus


def publish_stranded(session: Session, older_than_s: float, limit: int = 100) -> int:
    """Publish queued jobs that no broker has seen; returns how many went out."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    stranded = session.scalars(
        select(Job.id)
        .where(Job.status == JobStatus.queued, Job.published_at.is_(None), Job.created_at < cutoff)
        .order_by(Job.created_at)
        .limit(limit)
    ).all()
    return sum(publish(session, job_id) for job_id in stranded)
