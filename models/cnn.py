"""Convolutional network over sequences (1-d) or images (2-d): conv blocks, then an MLP head."""

import math

import torch
from torch import nn

from kiln.catalog import channels_and_extent
from kiln.spec import CNNSpec, MLPSpec
from models.mlp import ACTIVATIONS, build_mlp


class CNN(nn.Module):
    def __init__(self, spec: CNNSpec, in_shape: tuple[int, ...], out_features: int) -> None:
        super().__init__()
        self.in_shape = in_shape
        # Sequences arrive as (steps, channels), the layout an RNN reads; convolutions want channels first.
        self.channels_last = spec.dims == 1
        channels, extent = channels_and_extent(in_shape)
        conv, pool = (nn.Conv1d, nn.MaxPool1d) if spec.dims == 1 else (nn.Conv2d, nn.MaxPool2d)
        blocks: list[nn.Module] = []
        for width in spec.channels:
            blocks += [conv(channels, width, spec.kernel_size, padding="same"), ACTIVATIONS[spec.activation]()]
            if spec.pool:
                blocks.append(pool(2))
            channels = width
        self.features = nn.Sequential(*blocks)
        head = MLPSpec(type="mlp", hidden=spec.hidden, activation=spec.activation, dropout=spec.dropout)
        self.head = build_mlp(head, channels * math.prod(spec.extent_after_blocks(extent)), out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unflatten(1, self.in_shape)
        if self.channels_last:
            x = x.transpose(1, 2)
        return self.head(self.features(x).flatten(1))
