"""An epoch as GET /v1/jobs/{id}/metrics shows it, rendered by the worker when it writes the row (the worker cannot
import the API). api.schemas.EpochMetrics has the same fields in the same order; a test keeps the two alike."""

import json
import math
from typing import Any

EPOCH_FIELDS = ("epoch", "attempt", "train_loss", "val_loss", "val_accuracy", "lr", "duration_s", "samples_per_s",
                "grad_norm", "grad_norm_per_layer", "train_accuracy", "val_r2")


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float in it (dicts included) as None: JSON has no NaN or infinity, and
    pydantic writes them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    return value


def render_epoch(values: dict[str, Any]) -> str:
    """The epoch's JSON object as the API serves it."""
    return json.dumps({name: json_safe(values.get(name)) for name in EPOCH_FIELDS}, separators=(",", ":"))
