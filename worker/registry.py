"""The worker's own entry in the registry (kiln.workers): what it is, kept fresh by a heartbeat thread in
the Celery main process, so it reports even while every pool process is busy training."""

import logging
import os
import socket
import threading

import psutil

from kiln import __version__
from kiln.db import get_sessionmaker, utcnow
from kiln.devices import host_gpus, visible
from kiln.settings import Settings
from kiln.tables import Worker
from kiln.workers import mark_stopped, report

log = logging.getLogger("kiln.worker.registry")


def detect_devices() -> list[dict]:
    """The CPU, and each GPU this process may use (CUDA_VISIBLE_DEVICES applies) with a torch built for CUDA.
    From nvidia-smi: this runs in the Celery main process, which must not initialise CUDA before it forks."""
    import torch

    devices = [{
        "id": "cpu", "kind": "cpu", "name": socket.gethostname(), "cores": os.cpu_count() or 1,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
    }]
    if torch.backends.cuda.is_built():
        devices += [gpu.as_device() for gpu in visible(host_gpus())]
    return devices


class Heartbeat:
    def __init__(self, settings: Settings, name: str, queues: list[str], concurrency: int) -> None:
        self.settings = settings
        self.row = dict(name=name, host=socket.gethostname(), pid=os.getpid(), queues=queues,
                        concurrency=concurrency, devices=detect_devices(), version=__version__, started_at=utcnow())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kiln-registry", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                with get_sessionmaker()() as session:
                    report(session, Worker(**self.row))
            except Exception:  # the database may be down for a while; the next beat tries again
                log.warning("could not report to the worker registry", exc_info=True)
            if self._stop.wait(self.settings.heartbeat_s):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            with get_sessionmaker()() as session:
                mark_stopped(session, self.row["name"])
        except Exception:
            log.warning("could not mark this worker stopped; it will show as lost", exc_info=True)
