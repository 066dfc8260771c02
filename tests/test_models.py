"""Unit tests for the model zoo and the self-describing safetensors weight files."""

import hashlib
import io
import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from kiln.catalog import BUILTIN_DATASETS
from kiln.spec import JobSpec, MLPSpec
from models import build_model
from models.weights import FORMAT, WeightsError, load_weights, predict, save_weights
from worker.datasets import load_dataset, split_dataset
from worker.training import output_size


def mlp(**fields) -> MLPSpec:
    return MLPSpec.model_validate({"type": "mlp"} | fields)


def test_mlp_layers():
    model = build_model(mlp(hidden=[8, 4], activation="tanh", dropout=0.1), 5, 3)
    assert isinstance(model, nn.Sequential)
    assert [type(m) for m in model] == [nn.Linear, nn.Tanh, nn.Dropout, nn.Linear, nn.Tanh, nn.Dropout, nn.Linear]
    assert [(m.in_features, m.out_features) for m in model if isinstance(m, nn.Linear)] == [(5, 8), (8, 4), (4, 3)]
    assert model[2].p == 0.1
    assert model(torch.zeros(7, 5)).shape == (7, 3)


@pytest.mark.parametrize(("name", "cls"), [("relu", nn.ReLU), ("gelu", nn.GELU), ("sigmoid", nn.Sigmoid)])
def test_mlp_without_dropout_has_simple_keys(name, cls):
    model = build_model(mlp(hidden=[6], activation=name), 2, 1)
    assert [type(m) for m in model] == [nn.Linear, cls, nn.Linear]
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_unknown_model_type_is_refused():
    with pytest.raises(ValueError, match="unknown model type 'cnn'"):
        build_model(SimpleNamespace(type="cnn"), 2, 1)


def trained_like(dataset: str, loss: str | None = None, seed: int = 0) -> tuple[nn.Module, dict, np.ndarray]:
    """A freshly built model, the metadata the runner writes for it, and raw inputs to predict on."""
    spec = JobSpec.model_validate(
        {"data": {"dataset": dataset}, "loss": loss, "seed": seed,
         "model": {"type": "mlp", "hidden": [16, 8], "activation": "gelu", "dropout": 0.2}}
    )
    info = BUILTIN_DATASETS[dataset]
    x, y = load_dataset(spec.data, spec.seed)
    split = split_dataset(x, y, info.task, spec.data.val_fraction, spec.seed)
    torch.manual_seed(seed)
    out = output_size(info.task, info.classes, spec.loss)
    model = build_model(spec.model, x.shape[1], out)
    meta = {
        "format": FORMAT,
        "model": spec.model.model_dump(mode="json"),
        "in_features": x.shape[1],
        "out_features": out,
        "task": info.task.value,
        "loss": spec.loss,
        "classes": info.classes,
        "input_mean": split.input_mean.tolist(),
        "input_std": split.input_std.tolist(),
        "target_mean": split.target_mean,
        "target_std": split.target_std,
        "spec": spec.model_dump(mode="json"),
    }
    return model, meta, x


@pytest.mark.parametrize(
    ("dataset", "loss"),
    [("iris", None), ("breast_cancer", "bce"), ("breast_cancer", "cross_entropy"), ("diabetes", None)],
)
def test_weights_round_trip(tmp_path, dataset, loss):
    model, meta, x = trained_like(dataset, loss)
    path = tmp_path / "weights.safetensors"
    digest = save_weights(path, model, meta)

    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]  # no temporary file left
    loaded, loaded_meta = load_weights(path)
    assert loaded_meta == json.loads(json.dumps(meta))
    assert not loaded.training
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name

    expected = predict(model, meta, x)
    assert np.array_equal(predict(loaded, loaded_meta, x), expected)
    if meta["task"] == "regression":
        assert expected.dtype == np.float32 and expected.shape == (len(x),)
    else:
        assert expected.dtype == np.int64 and set(np.unique(expected)) <= set(range(meta["classes"]))


def test_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "w.safetensors"
    first, meta, _ = trained_like("iris", seed=1)
    second, _, _ = trained_like("iris", seed=2)
    digest_first = save_weights(path, first, meta)
    digest_second = save_weights(path, second, meta)
    assert digest_first != digest_second == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(load_weights(path)[0][0].weight, second[0].weight)


def test_save_refuses_incomplete_or_unserialisable_metadata(tmp_path):
    model, meta, _ = trained_like("iris")
    path = tmp_path / "w.safetensors"
    with pytest.raises(ValueError, match="lacks input_std"):
        save_weights(path, model, {k: v for k, v in meta.items() if k != "input_std"})
    with pytest.raises(TypeError):
        save_weights(path, model, meta | {"job_id": object()})
    assert list(tmp_path.iterdir()) == []


def test_predict_destandardises_and_thresholds():
    """With all weights zero the output is the last bias, whatever the input."""
    model, meta, x = trained_like("diabetes")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model[-1].bias.fill_(0.5)
    expected = np.float32(0.5 * meta["target_std"] + meta["target_mean"])
    assert np.allclose(predict(model, meta, x[:3]), expected)

    binary, meta, x = trained_like("breast_cancer", "bce")
    with torch.no_grad():
        binary[-1].weight.zero_()
        binary[-1].bias.fill_(-0.1)
    assert predict(binary, meta, x).tolist() == [0] * len(x)

    with pytest.raises(ValueError, match="shape"):
        predict(binary, meta, x[:, :5])


def test_predict_turns_dropout_off_and_restores_the_mode():
    model, meta, x = trained_like("iris")
    model.train()
    first = predict(model, meta, x)
    assert np.array_equal(predict(model, meta, x), first)
    assert model.training


class Boobytrap:
    """Unpickling this creates the marker file: what a malicious "weights" file would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def write_raw_pickle(path: Path, payload: object) -> None:
    path.write_bytes(pickle.dumps(payload))


def write_torch_save(path: Path, payload: object) -> None:
    torch.save({"0.weight": torch.zeros(2), "trap": payload}, path)


@pytest.mark.parametrize(
    ("write", "unsafe_load"),
    [
        (write_raw_pickle, lambda p: pickle.loads(p.read_bytes())),
        (write_torch_save, lambda p: torch.load(io.BytesIO(p.read_bytes()), weights_only=False)),
    ],
    ids=["pickle", "torch.save"],
)
def test_pickles_are_refused_without_being_unpickled(tmp_path, write, unsafe_load):
    marker = tmp_path / "pwned"
    path = tmp_path / "weights.safetensors"
    write(path, Boobytrap(marker))

    with pytest.raises(WeightsError, match="not a safetensors file"):
        load_weights(path)
    assert not marker.exists()

    unsafe_load(path)  # proof that the file was armed: an unpickler would have run it
    assert marker.exists()


def test_a_plain_safetensors_file_is_not_kiln_weights(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"0.weight": torch.zeros(2, 2)}, path, metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="without kiln metadata"):
        load_weights(path)
