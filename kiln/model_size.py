"""Model sizes from the spec alone, without torch and without allocating anything: the API can bound a job's
parameter count before queueing it, and the worker knows how wide the model's output must be."""

import math
from collections.abc import Sequence

from kiln.catalog import Task, channels_and_extent
from kiln.spec import AutoencoderSpec, CNNSpec, MLPSpec, ModelSpec, RNNSpec

RNN_GATES = {"rnn": 1, "lstm": 4, "gru": 3}  # weight blocks per layer: one per gate (plus the cell input)


def output_size(task: Task, classes: int | None, loss: str, features: int | None = None) -> int:
    """Width of the model's last layer: one logit or value, one logit per class, or (reconstruction) the
    input's width."""
    if task is Task.reconstruction:
        if features is None:
            raise ValueError("a reconstruction's output is as wide as its input: pass features")
        return features
    if loss in ("bce", "mse", "l1", "huber"):
        return 1
    if task is Task.binary:
        return 2
    if classes is None:
        raise ValueError(f"cross_entropy needs a class count for a {task.value} task")
    return classes


def _dense(width: int, hidden: Sequence[int], out: int) -> int:
    """Linear layers width -> hidden... -> out, each with a bias."""
    widths = [width, *hidden, out]
    return sum((a + 1) * b for a, b in zip(widths, widths[1:], strict=False))


def estimate_parameters(model: ModelSpec, in_shape: tuple[int, ...], out: int) -> int:
    """The number of parameters models.build_model(model, in_shape, out) will have."""
    match model:
        case MLPSpec():
            return _dense(math.prod(in_shape), model.hidden, out)
        case CNNSpec():
            channels, extent = channels_and_extent(in_shape)
            convs = 0
            for c in model.channels:
                convs += (channels * model.kernel_size**model.dims + 1) * c
                channels = c
            return convs + _dense(channels * math.prod(model.extent_after_blocks(extent)), model.hidden, out)
        case RNNSpec():
            directions = 2 if model.bidirectional else 1
            width, hidden, recurrent = in_shape[1], model.hidden_size, 0
            for _ in range(model.layers):
                # per direction and gate: input weights, hidden weights, and two biases (torch keeps both)
                recurrent += directions * RNN_GATES[model.cell] * hidden * (width + hidden + 2)
                width = hidden * directions
            return recurrent + _dense(width, [], out)
        case AutoencoderSpec():
            features = math.prod(in_shape)
            return _dense(features, model.encoder, model.latent) + _dense(model.latent, model.encoder[::-1], out)
    raise ValueError(f"unknown model type {model.type!r}")
