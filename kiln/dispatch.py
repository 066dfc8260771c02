"""The Celery app as both sides configure it, and publishing a job by task name.

The API imports only this module: it sends `kiln.train` by name with the job id as its one JSON
argument, so it never imports torch or the task code. Redis carries ids, never job state.
"""

from functools import lru_cache

from celery import Celery

from kiln.settings import Settings, get_settings

TRAIN_TASK = "kiln.train"


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
        # The database holds job state; Celery's result backend is not used.
        task_ignore_result=True,
        # Long tasks: acknowledge after the run, so a worker that dies leaves the message for another;
        # the database claim makes a second delivery harmless.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
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


def publish_train(job_id: str) -> None:
    """Hand a committed job to the broker; raises if the broker cannot be reached quickly."""
    producer().send_task(
        TRAIN_TASK,
        args=[job_id],
        queue=get_settings().queue,
        retry=True,
        retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
    )
