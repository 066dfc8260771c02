"""Celery tasks: thin wrappers over the runner, taking ids only."""

import socket

from kiln.dispatch import TRAIN_TASK
from worker.celery_app import app
from worker.runner import run_job


@app.task(name=TRAIN_TASK, bind=True)
def train(self, job_id: str) -> None:
    run_job(job_id, worker=self.request.hostname or socket.gethostname())
