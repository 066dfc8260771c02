"""The model zoo: pure torch modules built from a ModelSpec, with no knowledge of Celery, SQL or HTTP."""

from collections.abc import Callable

from torch import nn

from kiln.spec import ModelSpec
from models.mlp import build_mlp

# One builder per ModelSpec "type". A new architecture adds its spec to kiln.spec and one entry here.
BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": build_mlp,
}


def build_model(model_spec: ModelSpec, in_features: int, out_features: int) -> nn.Module:
    """A freshly initialised model (initialisation draws from torch's global RNG: seed it first)."""
    try:
        builder = BUILDERS[model_spec.type]
    except KeyError:
        raise ValueError(f"unknown model type {model_spec.type!r}; known: {', '.join(BUILDERS)}") from None
    return builder(model_spec, in_features, out_features)
