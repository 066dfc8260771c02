"""The worker registry: each `kiln worker` upserts its row at start and on every heartbeat, and marks it
stopped on a clean shutdown. A row whose heartbeat is older than the lease is a lost worker; its jobs are
recovered by the lease machinery (the reconciler), not by anything here."""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, func, select, update
from sqlalchemy.orm import Session

from kiln import reads
from kiln.db import utcnow
from kiln.tables import Job, JobStatus, Worker


def report(session: Session, worker: Worker) -> None:
    """Insert or refresh the worker's row (its name is its key)."""
    now = utcnow()
    done = session.execute(
        update(Worker).where(Worker.name == worker.name).values(
            host=worker.host, pid=worker.pid, queues=worker.queues, concurrency=worker.concurrency,
            devices=worker.devices, version=worker.version, started_at=worker.started_at, last_seen=now,
            stopped_at=None,
        )
    )
    if done.rowcount == 0:
        worker.last_seen = now
        session.add(worker)
    session.commit()


def mark_stopped(session: Session, name: str) -> None:
    session.execute(update(Worker).where(Worker.name == name).values(stopped_at=utcnow(), last_seen=utcnow()))
    session.commit()


@dataclass
class WorkerView:
    worker: Worker
    state: str  # "online", "lost" (no heartbeat within the lease) or "stopped" (shut down cleanly)
    running: int  # jobs running on it, all owners
    running_jobs: list[str]  # of those, the caller's own job ids (others' ids are not theirs to see)

    def as_dict(self) -> dict[str, Any]:
        w = self.worker
        return {
            "name": w.name, "host": w.host, "pid": w.pid, "queues": w.queues, "concurrency": w.concurrency,
            "devices": w.devices, "version": w.version, "started_at": w.started_at, "last_seen": w.last_seen,
            "state": self.state, "running": self.running, "running_jobs": self.running_jobs,
        }


def list_workers(session: Session, owner: str, lease_s: float, forget_after: timedelta) -> list[WorkerView]:
    """Workers seen within forget_after, newest first, with their state and what runs on them."""
    now = utcnow()
    workers = session.scalars(
        select(Worker).where(Worker.last_seen > now - forget_after).order_by(Worker.last_seen.desc())
    ).all()
    running = dict(session.execute(
        select(Job.worker, func.count()).where(Job.status == JobStatus.running).group_by(Job.worker)
    ).all())
    mine: dict[str, list[str]] = {}
    for job_id, name in session.execute(
        select(Job.id, Job.worker).where(Job.status == JobStatus.running, Job.owner == owner)
    ):
        mine.setdefault(name, []).append(job_id)
    return [
        WorkerView(w, _state(w, now, lease_s), running.get(w.name, 0), sorted(mine.get(w.name, [])))
        for w in workers
    ]


def _state(worker: Worker, now: datetime, lease_s: float) -> str:
    if worker.stopped_at is not None:
        return "stopped"
    return "online" if now - worker.last_seen <= timedelta(seconds=lease_s) else "lost"


@dataclass(frozen=True)
class LiveWorker:
    """What a waiting job's reason needs of a live worker."""

    queues: list[str]
    devices: list[dict[str, Any]]


# Two columns, no ORM objects; `since` is now minus the lease.
_LIVE = select(Worker.queues, Worker.devices).where(Worker.stopped_at.is_(None), Worker.last_seen > bindparam("since"))


def live_workers(db: Session | Connection, lease_s: float) -> list[LiveWorker]:
    """The workers that reported within the lease and have not stopped."""
    rows = db.execute(_LIVE, {"since": utcnow() - timedelta(seconds=lease_s)})
    return [LiveWorker(queues, devices) for queues, devices in rows]


async def live_workers_on_loop(lease_s: float) -> list[LiveWorker]:
    """live_workers, for a read on the API's event loop (kiln.reads)."""
    rows = await reads.rows(_LIVE, since=utcnow() - timedelta(seconds=lease_s))
    return [LiveWorker(queues, devices) for queues, devices in rows]


def waiting_reasons(jobs: Sequence[Job], live: Sequence[LiveWorker]) -> dict[str, str]:
    """Why each queued job among `jobs` cannot start, given the live workers, when none of them could take it (a
    job merely waiting its turn has no entry): the sentence names the queue and the command that would serve it."""
    reasons = {}
    for job in jobs:
        if job.status != JobStatus.queued:
            continue
        resources = job.spec.get("resources") or {}
        serving = [w for w in live if job.queue in w.queues]
        if resources.get("queue"):
            start = f"start one with `kiln worker --queue {resources['queue']}`"
        elif resources.get("device") == "cuda":
            start = "start `kiln worker` on a host with an NVIDIA GPU"
        else:
            start = "start one with `kiln worker`"
        if not serving:
            reasons[job.id] = f"no live worker takes jobs from queue {job.queue!r}; {start}"
        elif resources.get("device") == "cuda" and not any(
            d.get("kind") == "cuda" for w in serving for d in w.devices
        ):
            reasons[job.id] = f"the live workers on queue {job.queue!r} have no usable GPU; {start}"
    return reasons


def host_is_serving(session: Session, host: str, lease_s: float) -> bool:
    """Whether a worker on `host` has reported within the lease (a container's health: its heartbeat is alive)."""
    seen = session.scalar(
        select(func.max(Worker.last_seen)).where(Worker.host == host, Worker.stopped_at.is_(None))
    )
    return seen is not None and utcnow() - seen <= timedelta(seconds=lease_s)
