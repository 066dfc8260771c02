"""Predictions: the API validates and forwards; a predictor worker holds the model (the API has no torch)."""

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
    return answer
