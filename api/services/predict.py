"""Predictions: the API validates and forwards; a predictor worker holds the model (the API has no torch)."""

import math

from sqlalchemy.orm import Session

from api.errors import ApiError, Conflict, InvalidRequest
from api.services.jobs import get_job
from kiln.dispatch import request_predictions
from kiln.settings import get_settings
from kiln.tables import JobStatus


class NoPredictor(ApiError):
    status = 503
    code = "no_predictor"


def predict(session: Session, owner: str, job_id: str, inputs: list[list[float]]) -> dict:
    job = get_job(session, owner, job_id)
    if job.status != JobStatus.succeeded:
        raise Conflict(f"Job {job_id} is {job.status.value}; predictions come from a job that has succeeded.")
    session.close()  # hold no database connection while waiting for the predictor
    timeout = get_settings().predict_timeout_s
    try:
        answer = request_predictions(job_id, inputs, timeout)
    except TimeoutError as exc:
        raise NoPredictor(
            f"No prediction within {timeout:g} s ({exc}); check that a predictor runs "
            "(`kiln worker --role predict`) and try again.",
            headers={"Retry-After": "5"},
        ) from exc
    if "error" in answer:
        raise InvalidRequest(f"The inputs do not fit this model: {answer['error']}.",
                             details=[{"field": "body.inputs", "message": answer["error"]}])
    if not _finite(answer["predictions"]) or not _finite(answer.get("probabilities")):
        message = "the model's outputs are not finite for these inputs; send values nearer the training data"
        raise InvalidRequest(f"No prediction: {message}.", details=[{"field": "body.inputs", "message": message}])
    return answer


def _finite(value) -> bool:
    """Whether every number in a nested list is finite (inputs far outside the training data can overflow)."""
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)
