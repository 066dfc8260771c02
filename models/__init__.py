"""The model zoo: pure torch modules built from a ModelSpec, with no knowledge of Celery, SQL or HTTP.

Every model takes its rows flat, (n, prod(in_shape)), as kiln stores them; those that need the shape
(cnn, rnn) unflatten it in forward().
"""

import math
from collections.abc import Callable

from torch import nn

from kiln.spec import ModelSpec
from models.autoencoder import Autoencoder
from models.cnn import CNN
from models.mlp import build_mlp
from models.rnn import RNN

# One builder per ModelSpec "type", called as builder(spec, in_shape, out_features). A new architecture adds
# its spec to kiln.spec, its size to kiln.model_size, and one entry here.
BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": lambda spec, in_shape, out: build_mlp(spec, math.prod(in_shape), out),
    "cnn": CNN,
    "rnn": RNN,
    "autoencoder": Autoencoder,
}


def build_model(model_spec: ModelSpec, in_shape: int | tuple[int, ...], out_features: int) -> nn.Module:
    """A freshly initialised model for rows of shape `in_shape` (an int: flat rows of that many features).
    Initialisation draws from torch's global RNG: seed it first."""
    try:
        builder = BUILDERS[model_spec.type]
    except KeyError:
        raise ValueError(f"unknown model type {model_spec.type!r}; known: {', '.join(BUILDERS)}") from None
    return builder(model_spec, (in_shape,) if isinstance(in_shape, int) else tuple(in_shape), out_features)
