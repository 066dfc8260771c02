"""Live job events for Server-Sent Events streams, from one shared database watcher per API process.

However many clients stream, the watcher reads the jobs someone is watching once per tick (with one registry
read while any of them is queued, for its waiting reason), and the new epochs only of the jobs that gained some;
each stream gets what changed through an in-memory queue. The database
stays the source of truth: a stream starts (and resumes, from Last-Event-ID) with a read of its own, and fills
any gap between that read and the watcher's first notice with one more. Nothing is lost if a notice is: the
next one carries the job's whole state.

An event's id is the number of epochs delivered with it and before it, so `Last-Event-ID: N` resumes with the
job's current status and the epochs after N.
"""

import asyncio
import contextlib
import json
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.schemas import EpochMetrics, JobOut
from api.services.jobs import job_out, latest_metrics, waiting
from kiln.db import get_sessionmaker
from kiln.tables import TERMINAL, EpochMetric, Job

log = logging.getLogger("kiln.api.events")

KEEPALIVE_S = 15.0


@dataclass
class Change:
    """A watched job's state after it changed, with the epochs that landed since the watcher last looked."""

    job: dict
    epochs: list[dict] = field(default_factory=list)


def epoch_payload(metric: EpochMetric) -> dict:
    return EpochMetrics.model_validate(metric).model_dump(mode="json")


def epochs_after(session: Session, job_id: str, after: int, upto: int) -> list[EpochMetric]:
    query = select(EpochMetric).where(EpochMetric.job_id == job_id, EpochMetric.epoch > after,
                                      EpochMetric.epoch <= upto)
    return list(session.scalars(query.order_by(EpochMetric.epoch)))


class JobWatcher:
    """Polls the watched jobs every `interval` seconds while anyone is watching, and idles otherwise."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self._queues: dict[str, set[asyncio.Queue[Change]]] = defaultdict(set)
        self._seen: dict[str, tuple] = {}  # job id -> what _poll compares: status, epochs, ..., waiting reason
        self._wake = asyncio.Event()

    @contextlib.contextmanager
    def subscribe(self, job_id: str):
        queue: asyncio.Queue[Change] = asyncio.Queue(maxsize=256)
        self._queues[job_id].add(queue)
        self._wake.set()
        try:
            yield queue
        finally:
            self._queues[job_id].discard(queue)
            if not self._queues[job_id]:
                del self._queues[job_id]
                self._seen.pop(job_id, None)

    async def run(self) -> None:
        while True:
            if not self._queues:
                self._wake.clear()
                await self._wake.wait()
            try:
                changes = await run_in_threadpool(self._poll, list(self._queues))
            except Exception:
                log.warning("watching jobs failed; will retry", exc_info=True)
                changes = {}
            for job_id, change in changes.items():
                for queue in list(self._queues.get(job_id, ())):
                    with contextlib.suppress(asyncio.QueueFull):  # a stuck client: its next notice says it all
                        queue.put_nowait(change)
            await asyncio.sleep(self.interval)

    def _poll(self, job_ids: list[str]) -> dict[str, Change]:
        changes: dict[str, Change] = {}
        with get_sessionmaker()() as session:
            jobs = list(session.scalars(select(Job).where(Job.id.in_(job_ids))))
            reasons = waiting(session, jobs)  # a queued job's reason changes as workers come and go
            for job in jobs:
                state = (job.status, job.epochs_completed, job.cancel_requested, job.attempt, reasons.get(job.id))
                before = self._seen.get(job.id)
                self._seen[job.id] = state
                if before == state:
                    continue
                gained = before is not None and before[1] < job.epochs_completed
                new = epochs_after(session, job.id, before[1], job.epochs_completed) if gained else []
                # The latest epoch is among `new` when there are new ones: then latest_metrics finds it loaded.
                payload = JobOut.of(job, latest_metrics(session, job), reasons.get(job.id)).model_dump(mode="json")
                changes[job.id] = Change(payload, [epoch_payload(m) for m in new])
        return changes


def sse(event: str, data: dict, event_id: int) -> str:
    return f"id: {event_id}\nevent: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def stream_job(watcher: JobWatcher, job_id: str, after: int) -> AsyncIterator[str]:
    """The SSE text of one job: its status, the epochs after `after`, then each change until it ends.
    The caller has checked that the job exists and is the caller's."""
    with watcher.subscribe(job_id) as queue:
        # Read after subscribing: any change from here on also reaches the queue.
        state = await run_in_threadpool(_read_job, job_id)
        sent, last_status = after, None

        async def emit(state: dict, epochs: list[dict]) -> AsyncIterator[str]:
            nonlocal sent, last_status
            upto = state["epochs_completed"]
            if (epochs[0]["epoch"] if epochs else upto + 1) > sent + 1 and upto > sent:
                # What the stream has read and what the watcher sends may leave a gap: read it.
                epochs = await run_in_threadpool(_read_epochs, job_id, sent, upto) + epochs
            for epoch in epochs:
                if epoch["epoch"] == sent + 1:
                    sent += 1
                    yield sse("epoch", epoch, sent)
            if _status_key(state) != last_status:
                last_status = _status_key(state)
                yield sse("status", state, sent)

        # The job's state first, then what it has trained so far (after `after`), then each change.
        last_status = _status_key(state)
        yield sse("status", state, sent)
        async for text in emit(state, []):
            yield text
        while state["status"] not in TERMINAL_NAMES:
            try:
                change = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except TimeoutError:
                yield ": keepalive\n\n"
                continue
            state = change.job
            async for text in emit(state, change.epochs):
                yield text
        yield sse("end", state, sent)


def _status_key(state: dict) -> tuple:
    """What makes a new `status` event worth sending (the latest metrics travel as `epoch` events)."""
    return (state["status"], state["cancel_requested"], state["attempt"], state["epochs_completed"],
            state["waiting_reason"])


TERMINAL_NAMES = frozenset(status.value for status in TERMINAL)


def _read_job(job_id: str) -> dict:
    with get_sessionmaker()() as session:
        return job_out(session, session.get_one(Job, job_id)).model_dump(mode="json")


def _read_epochs(job_id: str, after: int, upto: int) -> list[dict]:
    with get_sessionmaker()() as session:
        return [epoch_payload(m) for m in epochs_after(session, job_id, after, upto)]
