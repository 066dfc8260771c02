"""The worker's Celery app: `celery -A worker.celery_app worker` (or `kiln worker`)."""

import contextlib
import logging
import os
import signal

import psutil
from celery.signals import worker_process_init, worker_shutting_down

from kiln.db import reset_engine
from kiln.dispatch import make_celery
from kiln.settings import get_settings

log = logging.getLogger("kiln.worker")
app = make_celery(get_settings())
app.conf.include = ["worker.tasks"]
# A broker blip must not kill hours of training: the database, not the message, tracks the job.
app.conf.worker_cancel_long_running_tasks_on_connection_loss = False

# Sent by the worker's main process to its pool processes when it shuts down (billiard uses SIGUSR1).
HANDBACK_SIGNAL = signal.SIGUSR2


@worker_process_init.connect
def _init_child(**_) -> None:
    # A forked child must open its own database connections, never reuse the parent's.
    reset_engine()
    import torch  # already imported by the parent through worker.tasks; this just configures it

    from worker.runner import shutdown_requested

    signal.signal(HANDBACK_SIGNAL, lambda *_: shutdown_requested.set())
    # Share the cores among the worker processes so two processes never oversubscribe them.
    threads = max(1, (os.cpu_count() or 1) // get_settings().worker_concurrency)
    torch.set_num_threads(threads)
    log.info("worker process ready: %d torch thread(s)", threads)


@worker_shutting_down.connect
def _hand_back_running_jobs(sig=None, how=None, **_) -> None:
    # Warm shutdown would wait for every running job to finish, which may take hours. Instead each
    # pool process stops at its next batch boundary and hands its job back to the queue; the next
    # attempt resumes from the last checkpoint.
    children = psutil.Process().children()
    log.info("shutting down (%s): asking %d pool process(es) to hand their jobs back", how, len(children))
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, HANDBACK_SIGNAL)
