"""Multi-layer perceptron: Linear -> activation -> dropout per hidden layer, then a Linear head."""

from torch import nn

from kiln.spec import MLPSpec

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
}


def build_mlp(spec: MLPSpec, in_features: int, out_features: int) -> nn.Sequential:
    # A flat nn.Sequential keeps state_dict keys simple ("0.weight", "2.bias", ...), so weight files
    # are easy to inspect with any safetensors reader.
    layers: list[nn.Module] = []
    width = in_features
    for hidden in spec.hidden:
        layers += [nn.Linear(width, hidden), ACTIVATIONS[spec.activation]()]
        if spec.dropout > 0:
            layers.append(nn.Dropout(spec.dropout))
        width = hidden
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)
