"""The Celery app as both sides configure it, and publishing a job by task name.

The API imports only this module: it sends `kiln.train` by name with the job id as its one JSON
argument, so it never imports torch or the task code. Redis carries ids, never job state.
"""

import base64
import contextlib
import json
import logging
import time
from functools import lru_cache

import redis
from celery import Celery
from sqlalchemy import update

from kiln.db import session_scope, utcnow
from kiln.settings import Settings, get_settings
from kiln.spec import ResourcesSpec
from kiln.tables import Job

log = logging.getLogger("kiln.dispatch")

TRAIN_TASK = "kiln.train"
PREDICT_TASK = "kiln.predict"


def predict_queue(settings: Settings) -> str:
    """Predictions have a queue of their own, so hours of training never stand in front of them."""
    return f"{settings.queue}.predict"


def train_queue(settings: Settings, resources: ResourcesSpec) -> str:
    """The queue a job's resources send it to: kiln (CPU), kiln.gpu (CUDA), kiln.auto (either), kiln.<name>."""
    if resources.queue:
        return f"{settings.queue}.{resources.queue}"
    return {"cpu": settings.queue, "cuda": f"{settings.queue}.gpu", "auto": f"{settings.queue}.auto"}[resources.device]


def worker_queues(settings: Settings, *, gpu: bool, extra: tuple[str, ...] = ()) -> list[str]:
    """What one worker process consumes: its device's queue, the jobs that run anywhere, and named pools."""
    device = ResourcesSpec(device="cuda" if gpu else "cpu")
    return [train_queue(settings, device), train_queue(settings, ResourcesSpec(device="auto"))] + [
        train_queue(settings, ResourcesSpec(queue=name)) for name in extra
    ]


def make_celery(settings: Settings) -> Celery:
    if not settings.broker_url:
        raise RuntimeError(
            "KILN_BROKER_URL is not set; point it at Redis (redis://host:6379/0) or start kiln with `kiln up`"
        )
    app = Celery("kiln", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        # JSON only: a message can never smuggle a pickle into a worker.
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        event_serializer="json",
        # The database holds job state; results are kept only for predictions (a request and its reply),
        # in Redis, for minutes.
        task_ignore_result=True,
        result_backend=settings.broker_url,
        result_expires=600,
        result_accept_content=["json"],
        # Long tasks: acknowledge after the run, so a worker that dies leaves the message for another;
        # the database claim makes a second delivery harmless.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            # kombu looks for expired unacknowledged messages every interval x throttle seconds
            # (100 s by default); keep that well inside the visibility timeout, one cheap scan each.
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 10)),
            "unacked_restore_throttle": 1,
        },
        task_default_queue=settings.queue,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    return app


@lru_cache
def producer() -> Celery:
    return make_celery(get_settings())


def publish_train(job_id: str, queue: str) -> None:
    """Hand a committed job to the broker; raises if the broker cannot be reached quickly."""
    producer().send_task(
        TRAIN_TASK,
        args=[job_id],
        queue=queue,
        retry=True,
        retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
    )


def publish_job(job_id: str, queue: str) -> bool:
    """Publish a committed job to its queue and mark it published; if the broker is unreachable it stays in
    the outbox (published_at null) and the reconciler publishes it later."""
    try:
        publish_train(job_id, queue)
    except Exception as exc:
        log.warning("could not publish job %s (%s); left in the outbox", job_id, exc)
        return False
    try:
        with session_scope() as session:
            session.execute(update(Job).where(Job.id == job_id).values(published_at=utcnow()))
    except Exception as exc:  # published all the same; at worst the reconciler publishes it once more
        log.warning("job %s published, but not marked so (%s)", job_id, exc)
    return True


def job_ids_in_broker(
    settings: Settings, queues: set[str], delivered_within_s: float, limit: int = 100_000
) -> set[str] | None:
    """Job ids of the train messages the broker still holds: waiting in one of `queues`, or delivered within the
    last `delivered_within_s` seconds and not yet acknowledged. None when the broker cannot be read (or holds too
    much to read cheaply). A message delivered longer ago whose job is still queued went to a worker that was lost
    before it could claim the job: it would come back only after the visibility timeout (hours), so it counts
    as lost.

    This reads kombu's Redis layout (the queue is a list, unacknowledged messages live in the "unacked" hash,
    their delivery times in the "unacked_index" sorted set), so that a message lost to a broker restart or
    FLUSHALL can be published again.
    """
    try:
        with redis.Redis.from_url(settings.broker_url, socket_timeout=5, socket_connect_timeout=2) as client:
            if sum(client.llen(q) for q in queues) > limit or client.hlen("unacked") > limit:
                return None
            waiting = [raw for q in sorted(queues) for raw in client.lrange(q, 0, -1)]
            recent = client.zrangebyscore("unacked_index", time.time() - delivered_within_s, "+inf")
            delivered = [raw for raw in client.hmget("unacked", recent) if raw is not None] if recent else []
    except redis.RedisError:
        return None
    ids: set[str] = set()
    for raw in waiting + delivered:
        try:
            message = json.loads(raw)
            if isinstance(message, list):  # an unacked entry: [message, exchange, routing key]
                message = message[0]
            headers = message.get("headers") or {}
            if headers.get("task") != TRAIN_TASK:
                continue
            body = message["body"]
            if message["properties"].get("body_encoding") == "base64":
                body = base64.b64decode(body)
            args = json.loads(body)[0]
            ids.add(str(args[0]))
        except (KeyError, ValueError, TypeError, IndexError):
            continue
    return ids


def request_predictions(job_id: str, inputs: list[list[float]], timeout: float) -> dict:
    """Ask a predictor worker for predictions. Raises TimeoutError when the broker cannot be reached,
    no predictor answers in time, or the predictor failed: each is "try again later" for the caller."""
    settings = get_settings()
    try:
        # expires: a predictor started later skips a request nobody waits for any more.
        reply = producer().send_task(PREDICT_TASK, args=[job_id, inputs], queue=predict_queue(settings),
                                     expires=timeout, retry=False)
        answer = reply.get(timeout=timeout, propagate=False)
    except Exception as exc:  # broker or result backend unreachable, or no answer in time
        raise TimeoutError(str(exc) or "no answer") from exc
    if reply.failed():
        raise TimeoutError(f"the predictor failed: {type(answer).__name__}")
    with contextlib.suppress(Exception):
        reply.forget()
    return answer
