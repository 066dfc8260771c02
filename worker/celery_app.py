"""The worker's Celery app: `celery -A worker.celery_app worker` (or `kiln worker`)."""

import logging
import os

from celery.signals import worker_process_init

from kiln.db import reset_engine
from kiln.dispatch import make_celery
from kiln.settings import get_settings

app = make_celery(get_settings())
app.conf.include = ["worker.tasks"]


@worker_process_init.connect
def _init_child(**_) -> None:
    # A forked child must open its own database connections, never reuse the parent's.
    reset_engine()
    import torch  # already imported by the parent through worker.tasks; this just configures it

    # Share the cores among the worker processes so two processes never oversubscribe them.
    threads = max(1, (os.cpu_count() or 1) // get_settings().worker_concurrency)
    torch.set_num_threads(threads)
    logging.getLogger("kiln.worker").info("worker process ready: %d torch thread(s)", threads)
