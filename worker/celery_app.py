"""The worker's Celery app: `celery -A worker.celery_app worker` (or `kiln worker`)."""

import contextlib
import logging
import os
import signal

import psutil
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)

from kiln.db import end_idle_transactions_after, reset_engine
from kiln.devices import usable_cores
from kiln.dispatch import make_celery
from kiln.logs import use_json
from kiln.settings import get_settings

log = logging.getLogger("kiln.worker")
app = make_celery(get_settings())
app.conf.include = ["worker.tasks"]
# Worker hosts are the ones a network cut strands mid-transaction; see kiln.db.
end_idle_transactions_after(get_settings().lease_s)
# A broker blip must not kill hours of training: the database, not the message, tracks the job.
app.conf.worker_cancel_long_running_tasks_on_connection_loss = False

# Sent by the worker's main process to its pool processes when it shuts down (billiard uses SIGUSR1).
HANDBACK_SIGNAL = signal.SIGUSR2


# How many pool processes this worker runs (its --concurrency), set in the main process before the pool forks.
_pool_size: int | None = None


@worker_init.connect
def _before_forking(sender=None, **_) -> None:
    global _pool_size
    concurrency = getattr(sender, "concurrency", None)
    _pool_size = concurrency if isinstance(concurrency, int) and concurrency > 0 else None
    # What a job would otherwise import on its first run in every pool process, imported once here and inherited
    # by each fork: torch.optim imports torch._dynamo on an optimizer's first use (~0.8 s, some 800 modules),
    # worker.datasets loads scikit-learn's bundled datasets, the first engine its database dialect and driver.
    # Modules only: no torch op runs and no connection opens before the fork.
    import sklearn.datasets  # noqa: F401
    import torch._dynamo  # noqa: F401
    from sqlalchemy import make_url

    make_url(get_settings().db_url).get_dialect().import_dbapi()


def torch_threads(pool_size: int) -> int:
    """Torch threads for each of `pool_size` processes sharing this machine's cores (those this process may run on)."""
    return max(1, usable_cores() // pool_size)


@worker_process_init.connect
def _init_child(**_) -> None:
    # A forked child must open its own database connections, never reuse the parent's.
    reset_engine()
    import torch  # already imported by the parent through worker.tasks; this just configures it

    from worker.runner import shutdown_requested

    signal.signal(HANDBACK_SIGNAL, lambda *_: shutdown_requested.set())
    # Share the cores among this Celery worker's pool processes so they never oversubscribe them (several Celery
    # workers on one host, as `kiln worker` runs on a GPU host, each size their own): by the pool's real size (a
    # `celery ... --concurrency N` command line sets no KILN_WORKER_CONCURRENCY), else by the setting.
    threads = torch_threads(_pool_size or get_settings().worker_concurrency)
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


_heartbeat = None  # worker.registry.Heartbeat, once the worker is ready


@worker_ready.connect
def _register(sender=None, **_) -> None:
    # In the main process, which stays responsive while pool processes train: it keeps the registry fresh.
    global _heartbeat
    from worker.registry import Heartbeat

    queues = sorted(sender.app.amqp.queues.consume_from or sender.app.amqp.queues)
    _heartbeat = Heartbeat(get_settings(), sender.hostname, queues, sender.controller.concurrency)
    _heartbeat.start()


@worker_shutdown.connect
def _unregister(**_) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()


@after_setup_logger.connect
@after_setup_task_logger.connect
def _json_logs(logger=None, **_) -> None:
    if get_settings().log_format == "json":
        use_json(logger)
