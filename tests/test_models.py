"""Unit tests for the model zoo and the self-describing safetensors weight files."""

import hashlib
import io
import json
import math
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter
from safetensors.torch import save_file
from torch import nn

from kiln.catalog import BUILTIN_DATASETS, Task
from kiln.model_size import estimate_parameters
from kiln.spec import DataSpec, JobSpec, MLPSpec, ModelSpec
from models import build_model
from models.weights import FORMAT, WeightsError, encoder_weights, load_weights, predict, save_weights
from worker.datasets import load_arrays, load_dataset, split_dataset
from worker.preparation import prepare
from worker.training import fit, output_size

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    with pytest.raises(ValueError, match="unknown model type 'transformer'"):
        build_model(SimpleNamespace(type="transformer"), 2, 1)


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


# --- every model type ----------------------------------------------------------------------------------


# (model spec, one row's shape, output width): every type, and the options that change its parameter count
SHAPES = [
    ({"type": "mlp", "hidden": [7, 5], "dropout": 0.1}, (4,), 3),
    ({"type": "mlp", "hidden": []}, (1, 8, 8), 10),
    ({"type": "cnn", "dims": 2, "channels": [4, 6], "kernel_size": 3, "hidden": [9]}, (1, 8, 8), 10),
    ({"type": "cnn", "dims": 2, "channels": [3, 3, 3], "kernel_size": 1, "hidden": []}, (3, 9, 12), 2),
    ({"type": "cnn", "dims": 2, "channels": [5], "pool": False, "hidden": [4, 4], "dropout": 0.2}, (2, 5, 5), 1),
    ({"type": "cnn", "dims": 1, "channels": [4, 8], "kernel_size": 5, "hidden": [6]}, (32, 1), 3),
    ({"type": "cnn", "dims": 1, "channels": [4], "kernel_size": 7, "pool": False, "hidden": []}, (10, 3), 1),
    ({"type": "rnn", "cell": "rnn", "hidden_size": 5}, (12, 1), 3),
    ({"type": "rnn", "cell": "lstm", "hidden_size": 6, "layers": 2, "dropout": 0.1}, (12, 2), 1),
    ({"type": "rnn", "cell": "gru", "hidden_size": 4, "layers": 3, "bidirectional": True}, (12, 3), 4),
    ({"type": "rnn", "cell": "lstm", "hidden_size": 3, "bidirectional": True}, (7, 1), 2),
    ({"type": "autoencoder", "encoder": [16, 8], "latent": 3}, (20,), 20),
    ({"type": "autoencoder", "encoder": [], "latent": 5, "dropout": 0.1}, (1, 8, 8), 64),
]


@pytest.mark.parametrize(("raw", "in_shape", "out"), SHAPES, ids=[f"{s[0]['type']}-{i}" for i, s in enumerate(SHAPES)])
def test_parameter_estimate_matches_the_built_model(raw, in_shape, out):
    spec = model_spec(raw)
    model = build_model(spec, in_shape, out)
    assert estimate_parameters(spec, in_shape, out) == sum(p.numel() for p in model.parameters())
    rows = torch.randn(5, math.prod(in_shape))  # rows arrive flat, whatever their layout
    assert model(rows).shape == (5, out)


def model_spec(raw: dict) -> ModelSpec:
    return TypeAdapter(ModelSpec).validate_python(raw)


def test_cnn_1d_reads_steps_then_channels():
    torch.manual_seed(0)
    model = build_model(model_spec({"type": "cnn", "dims": 1, "channels": [4], "pool": False, "hidden": []}), (10, 3), 2)
    x = torch.randn(6, 30)
    # A sequence row is (steps, channels); the convolution must see (channels, steps).
    expected = model.head(model.features(x.view(6, 10, 3).transpose(1, 2)).flatten(1))
    assert torch.equal(model(x), expected)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_rnn_reads_the_final_state_of_each_direction(cell):
    torch.manual_seed(0)
    spec = model_spec({"type": "rnn", "cell": cell, "hidden_size": 5, "layers": 2, "bidirectional": True})
    model = build_model(spec, (9, 2), 3).eval()
    x = torch.randn(4, 18)
    _, h = model.rnn(x.view(4, 9, 2))
    h_n = h[0] if cell == "lstm" else h
    # h_n holds (layer, direction) final states; the head reads the last layer's, forward then backward.
    assert torch.allclose(model(x), model.head(torch.cat([h_n[-2], h_n[-1]], dim=1)), atol=1e-6)


def autoencoder_spec(dataset: str = "digits", **model) -> JobSpec:
    return JobSpec.model_validate({
        "data": {"dataset": dataset}, "model": {"type": "autoencoder", "encoder": [32], "latent": 8} | model,
        "optimizer": {"type": "adam", "lr": 0.003}, "epochs": 8, "batch_size": 32, "seed": 3,
    })


SINE = {"data": {"dataset": "sine", "samples": 400}, "optimizer": {"type": "adam", "lr": 0.02}}


@pytest.mark.parametrize(
    ("raw", "threshold"),
    [
        ({"data": {"dataset": "digits"}, "model": {"type": "cnn", "channels": [8, 16], "hidden": [32]}, "epochs": 4}, 0.9),
        (SINE | {"model": {"type": "cnn", "dims": 1, "channels": [8], "hidden": [16]}}, 0.85),
        (SINE | {"model": {"type": "rnn", "cell": "gru", "hidden_size": 16}}, 0.8),
        (SINE | {"model": {"type": "rnn", "cell": "lstm", "hidden_size": 16}}, 0.8),
    ],
    ids=["cnn-2d-digits", "cnn-1d-sine", "gru-sine", "lstm-sine"],
)
def test_each_model_type_learns(raw, threshold):
    spec = JobSpec.model_validate({"optimizer": {"type": "adam", "lr": 0.01}, "epochs": 8, "batch_size": 32, "seed": 1} | raw)
    job = prepare(spec)
    result = fit(job.model, job.data, spec)
    assert result.history[-1].train_loss < 0.6 * result.history[0].train_loss
    assert result.history[-1].val_accuracy >= threshold


def test_plain_rnn_learns_an_uploaded_sequence_task():
    """A plain RNN forgets over sine's 32 steps; the sign of a short sequence's sum is its kind of problem.
    The arrays go the way of an upload: load_arrays, then prepare(dataset=...)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 12, 1))
    x, y, info = load_arrays("sum-sign", x, (x.sum(axis=(1, 2)) > 0).astype(int), Task.binary)
    spec = JobSpec.model_validate(
        {"data": {"dataset": "sum-sign"}, "model": {"type": "rnn", "cell": "rnn", "hidden_size": 8},
         "optimizer": {"type": "adam", "lr": 0.01}, "epochs": 16, "batch_size": 32, "seed": 1},
        context={"datasets": {"sum-sign": info}},
    )
    assert spec.loss == "bce"
    job = prepare(spec, dataset=(x, y, info))
    result = fit(job.model, job.data, spec)
    assert result.history[-1].val_accuracy >= 0.9


def test_autoencoder_learns_to_reconstruct_without_labels():
    spec = autoencoder_spec()
    job = prepare(spec)
    assert job.data.y_train is job.data.x_train and job.meta["task"] == "reconstruction"
    result = fit(job.model, job.data, spec)
    first, last = result.history[0], result.history[-1]
    assert last.val_loss < 0.6 * first.val_loss
    assert last.val_accuracy is None and last.val_r2 is None and last.train_accuracy is None


@pytest.mark.parametrize(
    "raw",
    [
        {"data": {"dataset": "digits"}, "model": {"type": "cnn", "channels": [4], "hidden": [8], "dropout": 0.2}},
        {"data": {"dataset": "sine", "samples": 60}, "model": {"type": "cnn", "dims": 1, "channels": [4], "hidden": []}},
        {"data": {"dataset": "sine", "samples": 60}, "model": {"type": "rnn", "cell": "lstm", "hidden_size": 4, "bidirectional": True}},
        {"data": {"dataset": "diabetes"}, "loss": "huber", "model": {"type": "mlp", "hidden": [8]}},
        {"data": {"dataset": "wine"}, "model": {"type": "autoencoder", "encoder": [8], "latent": 2}, "loss": "l1"},
    ],
    ids=["cnn-2d", "cnn-1d", "lstm", "mlp-huber", "autoencoder"],
)
def test_every_model_type_round_trips_through_its_weights_file(tmp_path, raw):
    spec = JobSpec.model_validate(raw)
    job = prepare(spec)
    path = tmp_path / "w.safetensors"
    save_weights(path, job.model, job.meta)
    loaded, meta = load_weights(path)
    assert type(loaded) is type(job.model)
    x_raw = job.split.x_val * job.split.input_std + job.split.input_mean
    expected = predict(job.model, job.meta, x_raw)
    assert np.array_equal(predict(loaded, meta, x_raw), expected)
    shaped = x_raw.reshape(len(x_raw), *meta["input_shape"])  # predict takes rows shaped, too
    assert np.array_equal(predict(loaded, meta, shaped), expected)
    if meta["task"] == "reconstruction":
        assert expected.shape == x_raw.shape and expected.dtype == np.float32


def test_reconstruction_predicts_in_input_units():
    job = prepare(autoencoder_spec())
    with torch.no_grad():
        job.model.decoder[-1].weight.zero_()
        job.model.decoder[-1].bias.zero_()
    x = load_dataset(DataSpec(dataset="digits"), 0)[0][:4]
    # A zero output in standardised units is the training mean in raw units.
    assert np.allclose(predict(job.model, job.meta, x), job.split.input_mean, atol=1e-6)


def test_the_encoder_is_a_weights_file_of_its_own(tmp_path):
    spec = autoencoder_spec(encoder=[16, 12], latent=3, dropout=0.1)
    job = prepare(spec)
    fit(job.model, job.data, spec.model_copy(update={"epochs": 1}))
    encoder, meta = encoder_weights(job.model, job.meta)
    path = tmp_path / "encoder.safetensors"
    save_weights(path, encoder, meta)

    loaded, loaded_meta = load_weights(path)
    assert loaded_meta["model"] == {"type": "mlp", "hidden": [16, 12], "activation": "relu", "dropout": 0.1}
    assert loaded_meta["task"] == "embedding" and loaded_meta["out_features"] == 3
    for (name, a), (_, b) in zip(job.model.encoder.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    x_raw = job.split.x_val * job.split.input_std + job.split.input_mean
    codes = predict(loaded, loaded_meta, x_raw)
    job.model.eval()
    with torch.no_grad():
        expected = job.model.encoder(torch.from_numpy(job.split.x_val)).numpy()
    assert codes.shape == (len(x_raw), 3) and codes.dtype == np.float32
    assert np.allclose(codes, expected, atol=1e-5)
