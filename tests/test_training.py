"""Unit tests for the built-in datasets and the pure training loop (CPU, no services)."""

import copy
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from sklearn.metrics import r2_score

from kiln.catalog import BUILTIN_DATASETS, Task
from kiln.spec import DataSpec, JobSpec, LossOptions, OptimizerSpec
from worker import preparation
from worker.checkpoint import load_checkpoint, save_checkpoint
from worker.datasets import load_arrays, load_dataset, make_sine, split_dataset
from worker.training import (
    LR_SWEEP,
    DivergedError,
    EpochMetrics,
    FitResult,
    LoopState,
    TrainData,
    fit,
    grad_norms,
    lr_range_test,
    make_loss,
    make_optimizer,
    output_size,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

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
    job = preparation.prepare(spec)
    return job.model, job.data


def curve(result: FitResult) -> list[tuple]:
    return [(m.epoch, m.train_loss, m.val_loss, m.val_accuracy, m.lr, m.grad_norm, m.grad_norm_per_layer,
             m.train_accuracy) for m in result.history]


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


def test_bf16_autocast_trains_float32_weights_to_the_same_place():
    # The accelerator path runs on CPU too: the forward pass in bf16 (so not the float32 curve bit for bit), the
    # weights and optimizer state in float32, and the model as good at the end.
    spec = make_spec(epochs=20)
    exact = fit(*prepare(spec), spec)
    model, data = prepare(spec)
    mixed = fit(model, data, spec, bf16=True)
    assert curve(mixed) != curve(exact)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert mixed.history[-1].val_accuracy > 0.9
    assert mixed.history[-1].train_loss == pytest.approx(exact.history[-1].train_loss, rel=0.25, abs=0.02)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_forward_gives_the_eager_curve():
    spec = make_spec(epochs=3)
    eager = fit(*prepare(spec), spec)
    torch._dynamo.reset()  # nothing compiled before may serve this: the graph is traced here
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = fit(*prepare(spec), spec, compile_mode="default")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs, "torch.compile traced the forward pass"
    for a, b in zip(compiled.history, eager.history, strict=True):
        assert (a.train_loss, a.val_loss, a.grad_norm) == pytest.approx((b.train_loss, b.val_loss, b.grad_norm),
                                                                         rel=1e-4)
        assert a.val_accuracy == b.val_accuracy


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


RESUMABLE = {
    "sgd-momentum": {"optimizer": SGD},
    "adam": {"optimizer": ADAM},
    "sgd-nesterov-clip": {"optimizer": SGD | {"nesterov": True}, "grad_clip": 0.5},
    "adamw-step": {"optimizer": {"type": "adamw", "lr": 0.01}, "scheduler": {"type": "step", "step_size": 2, "gamma": 0.5}},
    "rmsprop-cosine": {"optimizer": {"type": "rmsprop", "lr": 0.003, "momentum": 0.5}, "scheduler": {"type": "cosine"}},
    "one_cycle": {"optimizer": ADAM, "scheduler": {"type": "one_cycle", "pct_start": 0.4}},
    "plateau": {"optimizer": {"type": "adam", "lr": 0.05}, "scheduler": {"type": "plateau", "patience": 0, "factor": 0.5, "threshold": 0.2}},
    "early-stopping": {"optimizer": {"type": "adam", "lr": 0.05}, "epochs": 30,
                       "early_stopping": {"patience": 2, "min_delta": 0.01}},
    "lr-auto": {"optimizer": {"type": "sgd", "lr": "auto", "momentum": 0.9}},
}


@pytest.mark.parametrize("fields", RESUMABLE.values(), ids=RESUMABLE.keys())
def test_resumed_run_reproduces_the_uninterrupted_one(fields, tmp_path):
    # Dropout draws from the global RNG, so the checkpoint's RNG states matter here.
    spec = make_spec(**{"epochs": 6, "model": {"type": "mlp", "hidden": [16], "dropout": 0.2}} | fields)
    whole_model, data = prepare(spec)
    whole = fit(whole_model, data, spec)

    states = []

    class Keep:
        """Each epoch's state through a real checkpoint file, as the runner keeps it."""

        def on_epoch_end(self, metrics, state):
            path = tmp_path / f"epoch-{metrics.epoch}.safetensors"
            save_checkpoint(path, state.state_dict(), "spec")
            states.append(load_checkpoint(path, "spec"))

    head = fit(*prepare(spec), spec, callbacks=[Keep()])
    assert curve(head) == curve(whole)

    # As a new process would resume from a checkpoint: a fresh model, the state of epoch 3, and the
    # global RNGs in some other state (restored from the checkpoint, so it must not matter).
    resumed, data = prepare(spec)
    torch.manual_seed(12345)
    tail = fit(resumed, data, spec, resume=states[2])
    assert [m.epoch for m in tail.history] == list(range(4, len(whole.history) + 1))
    assert curve(head)[:3] + curve(tail) == curve(whole)
    assert tail.stopped == whole.stopped and tail.lr_search == whole.lr_search
    assert all(torch.equal(a, b) for a, b in zip(whole_model.state_dict().values(), resumed.state_dict().values(), strict=True))
    if "scheduler" in fields:
        assert len({m.lr for m in whole.history}) > 1, "the schedule changed the learning rate"
    if "early_stopping" in fields:
        assert whole.stopped.startswith("early_stopping:") and len(whole.history) < spec.epochs


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


# --- datasets: sine and uploads -----------------------------------------------------------------------


def test_sine_is_a_seeded_frequency_band_task():
    x, y = make_sine(600, seed=4)
    assert x.shape == (600, 32) and np.array_equal(make_sine(600, seed=4)[0], x)
    assert np.bincount(y).min() > 150  # three roughly balanced bands
    # More cycles per window means more sign changes: the bands are told apart by frequency.
    crossings = (np.diff(np.sign(make_sine(600, seed=4)[0] - 0), axis=1) != 0).sum(axis=1)
    assert crossings[y == 0].mean() < crossings[y == 1].mean() < crossings[y == 2].mean()


def test_load_arrays_flattens_shaped_rows_and_describes_them():
    x = np.arange(5 * 2 * 3 * 4).reshape(5, 2, 3, 4)
    flat, y, info = load_arrays("frames", x, [0, 1, 2, 1, 0], Task.classification)
    assert flat.shape == (5, 24) and flat.dtype == np.float32 and np.array_equal(flat[1], x[1].ravel())
    assert y.dtype == np.int64
    assert (info.input_shape, info.classes, info.rows, info.layout.value) == ((2, 3, 4), 3, 5, "image")
    _, values, info = load_arrays("series", np.zeros((4, 6, 2)), [0.5, 1, 2, 3], Task.regression)
    assert values.dtype == np.float32 and info.layout.value == "sequence" and info.classes is None
    _, _, unlabelled = load_arrays("rows", np.ones((3, 2)), None, Task.reconstruction)
    assert unlabelled.task is Task.reconstruction


@pytest.mark.parametrize(
    ("x", "y", "task", "words"),
    [
        (np.ones(5), [0] * 5, Task.regression, "shape"),
        (np.ones((3, 2)), [0, 1], Task.regression, "one value per row"),
        (np.array([[1.0, np.nan], [0, 0]]), [0, 1], Task.binary, "finite"),
        (np.ones((3, 2)), [0, 1, 2], Task.binary, "0..1"),
        (np.ones((3, 2)), [0, 1.5, 1], Task.classification, "integers"),
        (np.ones((3, 2)), None, Task.classification, "needs labels"),
    ],
)
def test_load_arrays_refuses_what_cannot_train(x, y, task, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        load_arrays("bad", x, y, task)


def test_reconstruction_targets_are_the_inputs():
    x, y = indexed_data()
    data = TrainData.from_split(split_dataset(x, y, Task.reconstruction, 0.2, 0), Task.reconstruction, "l1", "cpu")
    assert data.y_train is data.x_train and data.y_val is data.x_val
    assert output_size(Task.reconstruction, None, "mse", features=3) == 3


# --- losses, optimizers, schedules --------------------------------------------------------------------


def test_each_loss_is_built_with_its_options():
    assert type(make_loss("l1")) is torch.nn.L1Loss and type(make_loss("mse")) is torch.nn.MSELoss
    assert make_loss("huber", LossOptions(delta=2.5)).delta == 2.5
    assert make_loss("cross_entropy", LossOptions(label_smoothing=0.2)).label_smoothing == 0.2
    assert type(make_loss("bce")) is torch.nn.BCEWithLogitsLoss
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("hinge")


@pytest.mark.parametrize(
    ("raw", "cls", "group"),
    [
        ({"type": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}, torch.optim.SGD,
         {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
        ({"type": "adam", "lr": 0.002, "weight_decay": 0.1}, torch.optim.Adam, {"lr": 0.002, "weight_decay": 0.1}),
        ({"type": "adamw", "lr": 0.003}, torch.optim.AdamW, {"lr": 0.003, "weight_decay": 0.01}),
        ({"type": "rmsprop", "lr": 0.004, "alpha": 0.9, "momentum": 0.5, "weight_decay": 0.001}, torch.optim.RMSprop,
         {"lr": 0.004, "alpha": 0.9, "momentum": 0.5, "weight_decay": 0.001}),
    ],
)
def test_each_optimizer_is_built_with_its_options(raw, cls, group):
    spec = make_spec(optimizer=raw).optimizer
    optimizer = make_optimizer(spec, torch.nn.Linear(2, 1).parameters())
    assert type(optimizer) is cls
    assert {k: optimizer.param_groups[0][k] for k in group} == group


def test_lr_auto_needs_the_chosen_rate():
    spec: OptimizerSpec = make_spec(optimizer={"type": "adam", "lr": "auto"}).optimizer
    with pytest.raises(ValueError, match="lr_range_test"):
        make_optimizer(spec, torch.nn.Linear(2, 1).parameters())
    assert make_optimizer(spec, torch.nn.Linear(2, 1).parameters(), lr=0.02).param_groups[0]["lr"] == 0.02


def lrs(**fields) -> list[float]:
    spec = make_spec(**{"epochs": 6, "optimizer": {"type": "sgd", "lr": 0.1}} | fields)
    return [m.lr for m in fit(*prepare(spec), spec).history]


def test_step_and_cosine_schedules_step_every_epoch():
    assert lrs(scheduler={"type": "step", "step_size": 2, "gamma": 0.5}) == pytest.approx(
        [0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    expected = [0.01 + (0.1 - 0.01) * (1 + math.cos(math.pi * e / 6)) / 2 for e in range(6)]
    assert lrs(scheduler={"type": "cosine", "min_lr": 0.01}) == pytest.approx(expected)


def test_one_cycle_steps_every_batch():
    # 400 rows, 20% held out, batches of 32: 10 batches an epoch. An epoch reports the rate of its first batch.
    spec = make_spec(epochs=4, optimizer={"type": "sgd", "lr": 0.1}, scheduler={"type": "one_cycle", "pct_start": 0.25})
    reference = torch.optim.lr_scheduler.OneCycleLR(
        torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1), max_lr=0.1, total_steps=40, pct_start=0.25,
        cycle_momentum=False,
    )
    expected = []
    for step in range(40):
        if step % 10 == 0:
            expected.append(reference.get_last_lr()[0])
        reference.optimizer.step()
        reference.step()
    assert [m.lr for m in fit(*prepare(spec), spec).history] == pytest.approx(expected)
    assert expected[0] == pytest.approx(0.1 / 25)


def test_plateau_halves_the_rate_when_validation_stalls():
    rates = lrs(optimizer={"type": "sgd", "lr": 0.5}, epochs=10,
                scheduler={"type": "plateau", "factor": 0.5, "patience": 0, "threshold": 0.5})
    # A relative threshold of 50%: hardly any epoch counts as an improvement, so the rate keeps halving.
    assert rates[0] == 0.5 and rates[-1] < 0.5 and all(b in (a, a / 2) for a, b in zip(rates, rates[1:], strict=False))


def test_fit_refuses_a_validation_watcher_without_validation_rows():
    spec = make_spec(early_stopping={})
    model, data = prepare(spec)
    with pytest.raises(ValueError, match="validation split"):
        fit(model, data.__class__(data.x_train, data.y_train, None, None, data.task), spec)


# --- early stopping -----------------------------------------------------------------------------------


def test_early_stopping_stops_and_restores_the_best_weights():
    spec = make_spec(epochs=40, optimizer={"type": "adam", "lr": 0.05},
                     early_stopping={"patience": 3, "min_delta": 0.001})
    model, data = prepare(spec)
    weights = {}

    class Keep:
        def on_epoch_end(self, metrics, state):
            weights[metrics.epoch] = copy.deepcopy(state.model.state_dict())

    result = fit(model, data, spec, callbacks=[Keep()])
    losses = [m.val_loss for m in result.history]
    best = 1 + min(range(len(losses)), key=losses.__getitem__)
    assert len(result.history) == best + 3 < 40
    assert result.stopped == (f"early_stopping: val_loss did not improve by more than 0.001 for 3 epochs; "
                              f"restored the weights of epoch {best}")
    assert all(torch.equal(a, b) for a, b in zip(weights[best].values(), model.state_dict().values(), strict=True))

    kept = make_spec(epochs=40, optimizer={"type": "adam", "lr": 0.05},
                     early_stopping={"patience": 3, "min_delta": 0.001, "restore_best": False})
    model, data = prepare(kept)
    last = fit(model, data, kept)
    assert last.stopped.endswith(f"kept the weights of epoch {best + 3} (the best was epoch {best})")


def test_a_checkpoint_taken_as_early_stopping_fired_resumes_to_the_same_end():
    spec = make_spec(epochs=40, optimizer={"type": "adam", "lr": 0.05}, early_stopping={"patience": 2})
    states = []

    class Keep:
        def on_epoch_end(self, metrics, state):
            states.append(copy.deepcopy(state.state_dict()))

    model, data = prepare(spec)
    whole = fit(model, data, spec, callbacks=[Keep()])
    resumed, data = prepare(spec)
    again = fit(resumed, data, spec, resume=states[-1])  # the process died before saving the weights
    assert again.history == [] and again.stopped == whole.stopped
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values(), strict=True))


# --- metrics: gradient norms, accuracy, R² -------------------------------------------------------------


def test_grad_norms_match_a_hand_computation():
    spec = make_spec(epochs=1, batch_size=100, optimizer={"type": "sgd", "lr": 0.1},
                     model={"type": "mlp", "hidden": [8, 4]})  # 320 training rows: batches of 100, 100, 100, 20
    model, data = prepare(spec)
    hand = copy.deepcopy(model)
    metrics = fit(model, data, spec).history[0]

    optimizer = torch.optim.SGD(hand.parameters(), lr=0.1)
    order = torch.randperm(320, generator=torch.Generator().manual_seed(spec.seed * 1_000_003 + 1))
    totals, per_layer = [], []
    for i in range(4):
        idx = order[i * 100 : (i + 1) * 100]
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(hand(data.x_train[idx]), data.y_train[idx]).backward()
        per_layer.append({name: p.grad.norm().item() for name, p in hand.named_parameters()})
        totals.append(math.sqrt(sum(p.grad.pow(2).sum().item() for p in hand.parameters())))
        optimizer.step()
    assert metrics.grad_norm == pytest.approx(sum(totals) / 4, rel=1e-5)
    assert metrics.grad_norm_per_layer.keys() == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}
    for name, norm in metrics.grad_norm_per_layer.items():
        assert norm == pytest.approx(sum(b[name] for b in per_layer) / 4, rel=1e-5), name


def test_grad_clip_bounds_the_step():
    spec = make_spec(epochs=1, batch_size=1000, optimizer={"type": "sgd", "lr": 1.0}, grad_clip=0.001)
    model, data = prepare(spec)
    before = [p.detach().clone() for p in model.parameters()]
    metrics = fit(model, data, spec).history[0]
    step = math.sqrt(sum((p.detach() - b).pow(2).sum().item() for p, b in zip(model.parameters(), before, strict=True)))
    assert metrics.grad_norm > 0.01  # reported before clipping
    assert step == pytest.approx(0.001, rel=1e-4)  # one full batch, lr 1: the step is the clipped gradient


def test_grad_norms_are_zero_for_parameters_without_gradients():
    used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    (used * 2).sum().backward()
    assert grad_norms([used, unused]).tolist() == pytest.approx([2 * math.sqrt(3), 0.0])


def test_r2_matches_sklearn_and_accuracy_is_for_classifiers():
    spec = make_spec(data={"dataset": "diabetes"}, epochs=5, model={"type": "mlp", "hidden": [16]})
    model, data = prepare(spec)
    last = fit(model, data, spec).history[-1]
    model.eval()
    with torch.no_grad():
        predicted = model(data.x_val).numpy()
    assert last.val_r2 == pytest.approx(r2_score(data.y_val.numpy(), predicted), abs=1e-5)
    assert 0.2 < last.val_r2 < 1 and last.val_accuracy is None and last.train_accuracy is None

    spec = make_spec(epochs=2)
    first = fit(*prepare(spec), spec).history[0]
    assert 0.5 < first.train_accuracy <= 1 and first.val_r2 is None


# --- the learning-rate range test ---------------------------------------------------------------------


def test_lr_range_test_is_deterministic_and_leaves_no_trace():
    spec = make_spec(optimizer={"type": "adam", "lr": "auto"}, model={"type": "mlp", "hidden": [16], "dropout": 0.2})
    model, data = prepare(spec)
    weights = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    chosen, sweep = lr_range_test(model, data, spec)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(weights.values(), model.state_dict().values(), strict=True))
    assert (chosen, sweep) == lr_range_test(*prepare(spec), spec)

    rates = [rate for rate, _ in sweep]
    assert rates[0] == pytest.approx(LR_SWEEP[0]) and rates == sorted(rates) and len(sweep) > 20
    assert all(math.isfinite(loss) for _, loss in sweep)
    lowest = min(sweep, key=lambda point: point[1])[0]
    assert chosen == pytest.approx(lowest / 10)
    assert 1e-4 < chosen < 1


def test_fit_with_lr_auto_records_the_sweep_and_trains_with_the_choice():
    spec = make_spec(optimizer={"type": "sgd", "lr": "auto", "momentum": 0.9}, epochs=8)
    result = fit(*prepare(spec), spec)
    assert result.lr_search["lr"] == result.history[0].lr
    assert json.loads(json.dumps(result.lr_search)) == result.lr_search  # recordable as it is
    assert result.history[-1].val_accuracy > 0.85
