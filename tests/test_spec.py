"""JobSpec validation: every section's defaults and bounds, and each combination that cannot train refused
with a message that names the field and the fix. Pure: no torch."""

import pytest
from pydantic import ValidationError

from kiln.catalog import BUILTIN_DATASETS, DatasetInfo, Layout, Task
from kiln.spec import JobSpec

UNION_TAGS = {"mlp", "cnn", "rnn", "autoencoder", "sgd", "adam", "adamw", "rmsprop", "none", "step", "cosine",
              "one_cycle", "plateau"}


def errors(raw: dict, **context) -> dict[str, str]:
    """field path as the user wrote it (without pydantic's union tags) -> message."""
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(raw, context=context or None)
    return {
        ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in UNION_TAGS)): e["msg"]
        for e in caught.value.errors()
    }


def test_catalog_layouts():
    assert BUILTIN_DATASETS["digits"].layout is Layout.image and BUILTIN_DATASETS["digits"].features == 64
    assert BUILTIN_DATASETS["sine"].layout is Layout.sequence and BUILTIN_DATASETS["sine"].input_shape == (32, 1)
    assert BUILTIN_DATASETS["iris"].layout is Layout.tabular


def test_defaults_are_filled_in():
    spec = JobSpec.model_validate({"data": {"dataset": "diabetes"}})
    assert spec.loss == "mse" and spec.loss_options is None
    assert spec.model.type == "mlp" and spec.optimizer.model_dump() == {"type": "adam", "lr": 0.001, "weight_decay": 0.0}
    assert spec.scheduler.type == "none" and spec.grad_clip is None and spec.early_stopping is None
    assert spec.task is Task.regression


@pytest.mark.parametrize(
    ("raw", "loss", "task"),
    [
        ({"data": {"dataset": "digits"}, "model": {"type": "cnn"}}, "cross_entropy", Task.classification),
        ({"data": {"dataset": "sine"}, "model": {"type": "cnn", "dims": 1, "kernel_size": 5}}, "cross_entropy", Task.classification),
        ({"data": {"dataset": "sine"}, "model": {"type": "rnn", "cell": "gru", "bidirectional": True, "layers": 2}}, "cross_entropy", Task.classification),
        ({"data": {"dataset": "digits"}, "model": {"type": "autoencoder"}}, "mse", Task.reconstruction),
        ({"data": {"dataset": "iris"}, "model": {"type": "autoencoder"}, "loss": "huber"}, "huber", Task.reconstruction),
        ({"data": {"dataset": "sine"}, "model": {"type": "mlp"}}, "cross_entropy", Task.classification),
        ({"data": {"dataset": "diabetes"}, "loss": "l1"}, "l1", Task.regression),
        ({"data": {"dataset": "breast_cancer"}, "loss": "bce"}, "bce", Task.binary),
    ],
)
def test_each_model_and_loss_validates(raw, loss, task):
    spec = JobSpec.model_validate(raw)
    assert (spec.loss, spec.task) == (loss, task)
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec, "a stored spec re-validates to itself"


def test_every_option_round_trips():
    raw = {
        "data": {"dataset": "digits", "val_fraction": 0.25},
        "model": {"type": "cnn", "dims": 2, "channels": [8, 16], "kernel_size": 5, "pool": True, "hidden": [32],
                  "activation": "gelu", "dropout": 0.1},
        "loss": "cross_entropy",
        "loss_options": {"label_smoothing": 0.1},
        "optimizer": {"type": "sgd", "lr": "auto", "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
        "scheduler": {"type": "one_cycle", "pct_start": 0.25, "div_factor": 10, "final_div_factor": 100},
        "grad_clip": 1.0,
        "early_stopping": {"patience": 3, "min_delta": 0.001, "restore_best": False},
    }
    spec = JobSpec.model_validate(raw)
    assert spec.optimizer.lr == "auto" and spec.loss_options.label_smoothing == 0.1
    dumped = spec.model_dump(mode="json")
    assert JobSpec.model_validate(dumped) == spec
    assert dumped["loss_options"] == {"delta": 1.0, "label_smoothing": 0.1}


@pytest.mark.parametrize(
    "optimizer",
    [
        {"type": "adamw", "lr": 0.01, "weight_decay": 0.05},
        {"type": "rmsprop", "lr": 0.001, "alpha": 0.9, "momentum": 0.5, "weight_decay": 0.001},
        {"type": "adam", "lr": "auto"},
    ],
)
def test_optimizers(optimizer):
    spec = JobSpec.model_validate({"data": {"dataset": "iris"}, "optimizer": optimizer})
    assert spec.optimizer.model_dump(exclude_defaults=True) | {"type": optimizer["type"]} == optimizer


@pytest.mark.parametrize(
    "scheduler",
    [
        {"type": "step", "step_size": 3, "gamma": 0.5},
        {"type": "cosine", "min_lr": 1e-5},
        {"type": "one_cycle"},
        {"type": "plateau", "factor": 0.5, "patience": 2, "threshold": 0.01, "cooldown": 1, "min_lr": 1e-6},
    ],
)
def test_schedulers(scheduler):
    spec = JobSpec.model_validate({"data": {"dataset": "iris"}, "scheduler": scheduler})
    assert spec.scheduler.type == scheduler["type"]


# (spec, field, words the message must hold: what is wrong and the fix)
INVALID = [
    ({"data": {"dataset": "iris"}, "model": {"type": "rnn"}}, "model",
     ["model.type 'rnn' needs sequence rows", "'iris' holds tabular rows of shape (4,)", "use model.type 'mlp'", "'sine'"]),
    ({"data": {"dataset": "digits"}, "model": {"type": "rnn", "cell": "lstm"}}, "model",
     ["needs sequence rows", "use model.type 'cnn' with dims 2"]),
    ({"data": {"dataset": "sine"}, "model": {"type": "cnn"}}, "model",
     ["model.dims 2 (a 2-d cnn) needs image rows", "'sine' holds sequence rows", "use model.type 'cnn' with dims 1"]),
    ({"data": {"dataset": "wine"}, "model": {"type": "cnn", "dims": 2}}, "model",
     ["needs image rows", "use model.type 'mlp'", "an image dataset such as 'digits'"]),
    ({"data": {"dataset": "digits"}, "model": {"type": "cnn", "dims": 1}}, "model",
     ["model.dims 1 (a 1-d cnn) needs sequence rows", "use model.type 'cnn' with dims 2"]),
    ({"data": {"dataset": "digits"}, "model": {"type": "cnn", "channels": [4, 4, 4, 4]}}, "model",
     ["4 pooling blocks", "8x8 -> 4x4 -> 2x2 -> 1x1", "at most 3 entries in model.channels", "model.pool false"]),
    ({"data": {"dataset": "digits"}, "model": {"type": "autoencoder"}, "loss": "cross_entropy"}, "loss",
     ["model.type 'autoencoder' reconstructs its inputs", "use 'mse' or 'l1' or 'huber'"]),
    ({"data": {"dataset": "digits"}, "loss": "mse"}, "loss",
     ["loss 'mse' does not fit dataset 'digits', a classification task; use 'cross_entropy'"]),
    ({"data": {"dataset": "diabetes"}, "loss": "bce"}, "loss", ["use 'mse' or 'l1' or 'huber'"]),
    ({"data": {"dataset": "diabetes"}, "loss_options": {"label_smoothing": 0.1}}, "loss_options",
     ["loss_options.label_smoothing applies to loss 'cross_entropy' only", "the loss is 'mse'", "remove it"]),
    ({"data": {"dataset": "iris"}, "loss_options": {"delta": 2}}, "loss_options",
     ["loss_options.delta applies to loss 'huber' only"]),
    ({"data": {"dataset": "iris", "val_fraction": 0}, "early_stopping": {}}, "early_stopping",
     ["early_stopping watches the validation loss", "set data.val_fraction above 0", "or remove early_stopping"]),
    ({"data": {"dataset": "moons", "samples": 20, "val_fraction": 0.01}, "early_stopping": {}}, "early_stopping",
     ["leaves no validation rows"]),
    ({"data": {"dataset": "iris", "val_fraction": 0}, "scheduler": {"type": "plateau"}}, "scheduler",
     ["scheduler 'plateau' watches the validation loss", "set data.val_fraction above 0"]),
    ({"data": {"dataset": "iris"}, "optimizer": {"type": "adam", "lr": 0.01}, "scheduler": {"type": "cosine", "min_lr": 0.1}},
     "scheduler", ["scheduler.min_lr 0.1 is not below optimizer.lr 0.01", "lower scheduler.min_lr"]),
    ({"data": {"dataset": "iris"}, "optimizer": {"type": "sgd", "nesterov": True}}, "optimizer.nesterov",
     ["nesterov needs momentum", "set optimizer.momentum above 0"]),
    ({"data": {"dataset": "iris"}, "optimizer": {"type": "rmsprop", "lr": "NaN"}}, "optimizer.lr", ["finite", "'auto'"]),
    ({"data": {"dataset": "iris"}, "optimizer": {"type": "adamw", "lr": 11}}, "optimizer.lr", ["(0, 10]"]),
    ({"data": {"dataset": "iris"}, "optimizer": {"type": "sgd", "lr": "fast"}}, "optimizer.lr", ["'auto'"]),
]


@pytest.mark.parametrize(("raw", "field", "words"), INVALID, ids=[f"{i}-{case[1]}" for i, case in enumerate(INVALID)])
def test_invalid_combination_names_the_field_and_the_fix(raw, field, words):
    messages = errors(raw)
    assert list(messages) == [field], messages
    for w in words:
        assert w in messages[field]


SINE = {"data": {"dataset": "sine"}}
HUBER = {"data": {"dataset": "diabetes"}, "loss": "huber"}


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"model": {"type": "cnn", "channels": [1000]}}, "model.channels.0"),
        ({"model": {"type": "cnn", "channels": []}}, "model.channels"),
        ({"model": {"type": "cnn", "kernel_size": 17}}, "model.kernel_size"),
        ({"model": {"type": "cnn", "kernel_size": 4}}, "model.kernel_size"),
        ({"model": {"type": "cnn", "dims": 3}}, "model.dims"),
        ({"model": {"type": "cnn", "hidden": [8] * 5}}, "model.hidden"),
        (SINE | {"model": {"type": "rnn", "hidden_size": 1025}}, "model.hidden_size"),
        (SINE | {"model": {"type": "rnn", "layers": 5}}, "model.layers"),
        (SINE | {"model": {"type": "rnn", "cell": "transformer"}}, "model.cell"),
        (SINE | {"model": {"type": "rnn", "dropout": 0.95}}, "model.dropout"),
        ({"model": {"type": "autoencoder", "latent": 0}}, "model.latent"),
        ({"model": {"type": "autoencoder", "encoder": [8] * 9}}, "model.encoder"),
        (HUBER | {"loss_options": {"delta": 0}}, "loss_options.delta"),
        (HUBER | {"loss_options": {"label_smoothing": 0.6}}, "loss_options.label_smoothing"),
        ({"optimizer": {"type": "rmsprop", "alpha": 1.0}}, "optimizer.alpha"),
        ({"optimizer": {"type": "adamw", "weight_decay": 2}}, "optimizer.weight_decay"),
        ({"optimizer": {"type": "adam", "nesterov": True}}, "optimizer.nesterov"),
        ({"scheduler": {"type": "step", "step_size": 0}}, "scheduler.step_size"),
        ({"scheduler": {"type": "step", "gamma": 1.5}}, "scheduler.gamma"),
        ({"scheduler": {"type": "one_cycle", "pct_start": 1.0}}, "scheduler.pct_start"),
        ({"scheduler": {"type": "one_cycle", "div_factor": 1e5}}, "scheduler.div_factor"),
        ({"scheduler": {"type": "plateau", "factor": 1.0}}, "scheduler.factor"),
        ({"scheduler": {"type": "plateau", "patience": 1001}}, "scheduler.patience"),
        ({"scheduler": {"type": "cosine", "t_max": 5}}, "scheduler.t_max"),
        ({"scheduler": {"type": "warmup"}}, "scheduler"),
        ({"early_stopping": {"patience": 0}}, "early_stopping.patience"),
        ({"early_stopping": {"min_delta": -1}}, "early_stopping.min_delta"),
        ({"grad_clip": 0}, "grad_clip"),
        ({"grad_clip": float("inf")}, "grad_clip"),
    ],
)
def test_every_number_is_bounded(raw, field):
    assert list(errors({"data": {"dataset": "digits"}} | raw)) == [field]


def test_uploaded_datasets_are_checked_through_the_context():
    table = DatasetInfo("user-table", Task.regression, (5,), None, 300)
    frames = DatasetInfo("user-frames", Task.classification, (3, 16, 16), 4, 300)
    unlabelled = DatasetInfo("user-unlabelled", Task.reconstruction, (12,), None, 300)
    datasets = {d.name: d for d in (table, frames, unlabelled)}

    assert "unknown dataset 'user-table'" in errors({"data": {"dataset": "user-table"}})["data.dataset"]
    spec = JobSpec.model_validate({"data": {"dataset": "user-frames"}, "model": {"type": "cnn", "channels": [8] * 4}},
                                  context={"datasets": datasets})
    assert spec.loss == "cross_entropy"
    assert "8x8 -> 4x4 -> 2x2 -> 1x1" in errors(
        {"data": {"dataset": "user-frames"}, "model": {"type": "cnn", "channels": [8] * 5}}, datasets=datasets
    )["model"]
    assert "applies to generated datasets only" in errors(
        {"data": {"dataset": "user-table", "samples": 50}}, datasets=datasets)["data.samples"]
    assert "'user-unlabelled' has no labels: use model.type 'autoencoder'" in errors(
        {"data": {"dataset": "user-unlabelled"}}, datasets=datasets)["model"]
    auto = JobSpec.model_validate({"data": {"dataset": "user-unlabelled"}, "model": {"type": "autoencoder"}},
                                  context={"datasets": datasets})
    assert auto.loss == "mse"


def test_a_bad_section_does_not_cascade():
    """An invalid data section is reported once; the checks that read it stand back."""
    messages = errors({"data": {"dataset": "nope"}, "model": {"type": "rnn"}, "loss": "mse", "early_stopping": {}})
    assert list(messages) == ["data.dataset"]
