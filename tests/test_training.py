"""Unit tests for the built-in datasets and the pure training loop (CPU, no services)."""

import copy
import math
import re

import numpy as np
import pytest
import torch

from kiln.catalog import BUILTIN_DATASETS, Task
from kiln.spec import DataSpec, JobSpec
from models import build_model
from worker.datasets import load_dataset, split_dataset
from worker.training import (
    DivergedError,
    EpochMetrics,
    FitResult,
    LoopState,
    TrainData,
    fit,
    output_size,
)

SGD = {"type": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}
ADAM = {"type": "adam", "lr": 0.01}


def make_spec(**fields) -> JobSpec:
    spec = {
        "data": {"dataset": "moons", "samples": 400},
        "model": {"type": "mlp", "hidden": [32]},
        "optimizer": ADAM,
        "epochs": 5,
        "batch_size": 32,
        "seed": 7,
    }
    return JobSpec.model_validate(spec | fields)


def prepare(spec: JobSpec) -> tuple[torch.nn.Module, TrainData]:
    """What the runner does before fit(): load, split, seed, build."""
    info = BUILTIN_DATASETS[spec.data.dataset]
    x, y = load_dataset(spec.data, spec.seed)
    split = split_dataset(x, y, info.task, spec.data.val_fraction, spec.seed)
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, x.shape[1], output_size(info.task, info.classes, spec.loss))
    return model, TrainData.from_split(split, info.task, spec.loss, "cpu")


def curve(result: FitResult) -> list[tuple]:
    return [(m.epoch, m.train_loss, m.val_loss, m.val_accuracy) for m in result.history]


class Recorder:
    def __init__(self) -> None:
        self.epochs: list[EpochMetrics] = []

    def on_epoch_end(self, metrics: EpochMetrics, state: LoopState) -> None:
        assert state.epoch == metrics.epoch
        self.epochs.append(metrics)


# --- datasets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILTIN_DATASETS))
def test_builtin_dataset_matches_catalog(name):
    info = BUILTIN_DATASETS[name]
    x, y = load_dataset(DataSpec(dataset=name), seed=0)
    assert x.shape == (info.rows, info.features)
    assert y.shape == (info.rows,)
    assert x.dtype == np.float32
    assert np.isfinite(x).all()
    if info.task is Task.regression:
        assert y.dtype == np.float32
    else:
        assert y.dtype == np.int64
        assert set(np.unique(y)) == set(range(info.classes))


def test_generated_dataset_takes_samples_and_seed():
    spec = DataSpec(dataset="blobs", samples=50)
    x1, y1 = load_dataset(spec, seed=1)
    x2, y2 = load_dataset(spec, seed=1)
    x3, _ = load_dataset(spec, seed=2)
    assert x1.shape == (50, 2)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(x1, x3)


def indexed_data(n: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Column 0 is the row number, so a split's rows can be traced back to their origin."""
    rng = np.random.default_rng(0)
    x = np.column_stack([np.arange(n), rng.normal(5.0, 3.0, n), np.full(n, 4.0)]).astype(np.float32)
    return x, (np.arange(n) % 3).astype(np.int64)


def rows_of(split_x: np.ndarray, split) -> np.ndarray:
    return np.rint(split_x[:, 0] * split.input_std[0] + split.input_mean[0]).astype(int)


def test_split_is_deterministic_and_partitions_the_rows():
    x, y = indexed_data()
    a = split_dataset(x, y, Task.classification, 0.2, seed=3)
    b = split_dataset(x, y, Task.classification, 0.2, seed=3)
    c = split_dataset(x, y, Task.classification, 0.2, seed=4)
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_val, b.y_val)
    assert not np.array_equal(a.x_train, c.x_train)
    train, val = rows_of(a.x_train, a), rows_of(a.x_val, a)
    assert len(val) == 20 and len(train) == 80
    assert sorted(np.concatenate([train, val])) == list(range(100))
    assert np.array_equal(a.y_train, y[train]) and np.array_equal(a.y_val, y[val])


def test_standardisation_uses_train_rows_only():
    x, y = indexed_data()
    split = split_dataset(x, y, Task.classification, 0.3, seed=0)
    train = rows_of(split.x_train, split)
    np.testing.assert_allclose(split.input_mean, x[train].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(split.input_std[:2], x[train].std(axis=0)[:2], rtol=1e-5)
    assert split.input_std[2] == 1.0  # a constant column is left as is, not divided by zero
    assert split.input_mean.dtype == split.input_std.dtype == np.float32
    assert split.target_mean is None and split.target_std is None

    # Wild validation rows change nothing about the statistics or the train rows.
    x_wild = x.copy()
    x_wild[rows_of(split.x_val, split), 1] = 1e6
    wild = split_dataset(x_wild, y, Task.classification, 0.3, seed=0)
    assert np.array_equal(wild.input_mean, split.input_mean)
    assert np.array_equal(wild.input_std, split.input_std)
    assert np.array_equal(wild.x_train, split.x_train)


def test_regression_targets_are_standardised_with_train_rows():
    x, y = load_dataset(DataSpec(dataset="diabetes"), seed=0)
    split = split_dataset(x, y, Task.regression, 0.2, seed=0)
    assert split.y_train.dtype == np.float32
    assert abs(split.y_train.mean()) < 1e-4 and abs(split.y_train.std() - 1) < 1e-4
    raw_train = split.y_train * split.target_std + split.target_mean
    assert abs(raw_train.mean() - split.target_mean) < 1e-3
    assert 100 < split.target_mean < 200  # diabetes progression scores, in their own units


def test_no_validation_split():
    x, y = indexed_data()
    split = split_dataset(x, y, Task.classification, 0.0, seed=0)
    assert split.x_val.shape == (0, 3) and len(split.x_train) == 100
    data = TrainData.from_split(split, Task.classification, "cross_entropy", "cpu")
    assert data.x_val is None and data.y_val is None


@pytest.mark.parametrize(
    ("task", "loss", "dtype", "shape"),
    [
        (Task.binary, "bce", torch.float32, (80, 1)),
        (Task.binary, "cross_entropy", torch.int64, (80,)),
        (Task.classification, "cross_entropy", torch.int64, (80,)),
        (Task.regression, "mse", torch.float32, (80, 1)),
    ],
)
def test_train_data_targets(task, loss, dtype, shape):
    x, y = indexed_data()
    split = split_dataset(x, y.astype(np.float32) if task is Task.regression else y, task, 0.2, seed=0)
    data = TrainData.from_split(split, task, loss, "cpu")
    assert data.y_train.dtype == dtype and tuple(data.y_train.shape) == shape
    assert data.x_train.dtype == torch.float32 and tuple(data.x_val.shape) == (20, 3)


def test_train_data_refuses_a_loss_that_does_not_fit():
    x, y = indexed_data()
    with pytest.raises(ValueError, match="does not fit"):
        TrainData.from_split(split_dataset(x, y, Task.classification, 0.2, 0), Task.classification, "mse", "cpu")


@pytest.mark.parametrize(
    ("task", "classes", "loss", "size"),
    [
        (Task.binary, 2, "bce", 1),
        (Task.binary, 2, "cross_entropy", 2),
        (Task.classification, 10, "cross_entropy", 10),
        (Task.regression, None, "mse", 1),
    ],
)
def test_output_size(task, classes, loss, size):
    assert output_size(task, classes, loss) == size


# --- the training loop ------------------------------------------------------------------------------


def test_fit_learns_moons():
    spec = make_spec(epochs=20)
    model, data = prepare(spec)
    recorder = Recorder()
    result = fit(model, data, spec, callbacks=[recorder])
    assert result.stopped is None
    assert recorder.epochs == result.history
    assert [m.epoch for m in result.history] == list(range(1, 21))
    first, last = result.history[0], result.history[-1]
    assert last.train_loss < 0.5 * first.train_loss
    assert last.val_accuracy > 0.9
    assert all(m.lr == 0.01 and m.duration_s > 0 and m.samples_per_s > 0 for m in result.history)


def test_fit_learns_linear_regression():
    spec = make_spec(data={"dataset": "regression", "samples": 400}, optimizer=SGD, epochs=10)
    model, data = prepare(spec)
    result = fit(model, data, spec)
    assert result.history[-1].train_loss < 0.2 * result.history[0].train_loss
    assert result.history[-1].val_loss < 0.2
    assert all(m.val_accuracy is None for m in result.history)


def test_fit_without_validation_reports_none():
    spec = make_spec(data={"dataset": "moons", "samples": 100, "val_fraction": 0.0}, epochs=2)
    result = fit(*prepare(spec), spec)
    assert [(m.val_loss, m.val_accuracy) for m in result.history] == [(None, None)] * 2


@pytest.mark.parametrize(
    "fields",
    [
        {"optimizer": SGD},
        {"optimizer": ADAM, "model": {"type": "mlp", "hidden": [32, 16], "dropout": 0.2}},
        {"optimizer": ADAM, "data": {"dataset": "iris"}, "batch_size": 16},
    ],
    ids=["sgd-momentum", "adam-dropout", "adam-iris"],
)
def test_same_seed_gives_identical_curves(fields):
    spec = make_spec(**fields)
    first = fit(*prepare(spec), spec)
    second = fit(*prepare(spec), spec)
    assert curve(first) == curve(second)


@pytest.mark.parametrize("optimizer", [SGD, ADAM], ids=["sgd-momentum", "adam"])
def test_resumed_run_reproduces_the_uninterrupted_one(optimizer):
    # Dropout draws from the global RNG, so the checkpoint's RNG states matter here.
    spec = make_spec(optimizer=optimizer, epochs=6, model={"type": "mlp", "hidden": [16], "dropout": 0.2})
    whole = fit(*prepare(spec), spec)

    states = []

    class Keep:
        def on_epoch_end(self, metrics, state):
            states.append(copy.deepcopy(state.state_dict()))

    head = fit(*prepare(spec), spec, callbacks=[Keep()])

    # As a new process would resume from a checkpoint: a fresh model, the state of epoch 3, and the
    # global RNGs in some other state (restored from the checkpoint, so it must not matter).
    resumed, data = prepare(spec)
    torch.manual_seed(12345)
    tail = fit(resumed, data, spec, resume=states[2])
    assert [m.epoch for m in tail.history] == [4, 5, 6]
    assert curve(head)[:3] + curve(tail) == curve(whole)
    assert all(torch.equal(a, b) for a, b in zip(states[-1]["model"].values(), resumed.state_dict().values(), strict=True))


def test_model_trains_in_train_mode_and_validates_in_eval_mode():
    spec = make_spec(epochs=2, model={"type": "mlp", "hidden": [8], "dropout": 0.1})
    model, data = prepare(spec)
    model.eval()  # fit must switch it on itself
    modes = []
    model.register_forward_pre_hook(lambda module, _: modes.append((module.training, torch.is_grad_enabled())))
    fit(model, data, spec)
    assert set(modes) == {(True, True), (False, False)}
    assert model.training


def test_should_stop_cancels_at_a_batch_boundary():
    spec = make_spec(data={"dataset": "moons", "samples": 125}, batch_size=10, epochs=5)  # 10 batches
    model, data = prepare(spec)
    calls = 0

    def should_stop() -> str | None:
        nonlocal calls
        calls += 1
        return "cancelled" if calls > 12 else None  # before the 3rd batch of epoch 2

    recorder = Recorder()
    result = fit(model, data, spec, callbacks=[recorder], should_stop=should_stop)
    assert result.stopped == "cancelled"
    assert calls == 13  # it returned at once
    assert [m.epoch for m in result.history] == [1]
    assert recorder.epochs == result.history  # no callback for the partial epoch


def test_nan_in_the_data_names_the_first_bad_batch():
    spec = make_spec(data={"dataset": "moons", "samples": 200}, batch_size=16)
    model, data = prepare(spec)
    data.x_train[37, 0] = math.nan
    # The batch that holds row 37 in epoch 1, by the loop's documented permutation.
    order = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(spec.seed * 1_000_003 + 1))
    batch = int((order == 37).nonzero()) // spec.batch_size + 1
    recorder = Recorder()
    with pytest.raises(DivergedError) as caught:
        fit(model, data, spec, callbacks=[recorder])
    assert str(caught.value) == f"loss became NaN at epoch 1, batch {batch}; lower the learning rate"
    assert (caught.value.epoch, caught.value.batch) == (1, batch)
    assert recorder.epochs == []


def test_absurd_learning_rate_diverges():
    spec = make_spec(data={"dataset": "regression", "samples": 200}, optimizer={"type": "sgd", "lr": 10})
    model, data = prepare(spec)
    recorder = Recorder()
    with pytest.raises(DivergedError) as caught:
        fit(model, data, spec, callbacks=[recorder])
    error = caught.value
    assert re.fullmatch(r"loss became (NaN|infinite) at epoch \d+, batch \d+; lower the learning rate", str(error))
    assert f"at epoch {error.epoch}, batch {error.batch};" in str(error)
    assert len(recorder.epochs) == error.epoch - 1  # the epochs before it completed normally
    assert not all(torch.isfinite(p).all() for p in model.parameters())  # it really blew up
