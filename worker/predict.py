"""Predictions from a succeeded job's weights, for the predictor worker (`kiln worker --role predict`)."""

from functools import lru_cache

import numpy as np
from torch import nn

from kiln.settings import get_settings
from kiln.storage import WEIGHTS, make_store
from models.weights import load_weights, predict_with_probabilities


@lru_cache(maxsize=16)
def _model(job_id: str) -> tuple[nn.Module, dict]:
    # A succeeded job's weights never change, so the job id is a sound cache key.
    file = make_store(get_settings()).open_artifact(job_id, WEIGHTS)
    if file is None:
        raise FileNotFoundError(f"the weights of job {job_id} are missing from the artifact store")
    with file:
        return load_weights(file.read())


def predict_rows(job_id: str, inputs: list[list[float]]) -> dict:
    """{"predictions": [...], "probabilities": [[...]] | None}, or {"error": sentence} for inputs that
    do not fit the model (the API turns that into a 422)."""
    try:
        model, meta = _model(job_id)
        predictions, probabilities = predict_with_probabilities(model, meta, np.asarray(inputs, dtype=np.float32))
    except (ValueError, FileNotFoundError) as exc:
        return {"error": str(exc)}
    return {
        "predictions": predictions.tolist(),
        "probabilities": None if probabilities is None else probabilities.round(6).tolist(),
    }
