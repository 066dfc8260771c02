"""Autoencoder: an MLP encoder down to a latent code and a mirrored MLP decoder back to the input."""

import math

import torch
from torch import nn

from kiln.spec import AutoencoderSpec, MLPSpec
from models.mlp import build_mlp


def encoder_spec(spec: AutoencoderSpec) -> MLPSpec:
    """The encoder is an MLP in its own right: its weights load and predict like any MLP's."""
    return MLPSpec(type="mlp", hidden=spec.encoder, activation=spec.activation, dropout=spec.dropout)


class Autoencoder(nn.Module):
    def __init__(self, spec: AutoencoderSpec, in_shape: tuple[int, ...], out_features: int) -> None:
        super().__init__()
        self.encoder = build_mlp(encoder_spec(spec), math.prod(in_shape), spec.latent)
        decoder = encoder_spec(spec).model_copy(update={"hidden": spec.encoder[::-1]})
        self.decoder = build_mlp(decoder, spec.latent, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))
