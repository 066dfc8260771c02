"""Celery tasks: thin wrappers over the runner and the predictor, taking ids and plain data only."""

import socket

from kiln.dispatch import PREDICT_TASK, TRAIN_TASK
from kiln.logs import job_context
from worker.celery_app import app
from worker.predict import predict_rows
from worker.runner import run_job


@app.task(name=TRAIN_TASK, bind=True)
def train(self, job_id: str) -> None:
    with job_context(job_id):  # every line logged meanwhile carries the job's id (KILN_LOG_FORMAT=json)
        run_job(job_id, worker=self.request.hostname or socket.gethostname())


@app.task(name=PREDICT_TASK, ignore_result=False, acks_late=False)
def predict(job_id: str, inputs: list[list[float]]) -> dict:
    with job_context(job_id):
        return predict_rows(job_id, inputs)
