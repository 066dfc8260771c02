"""JobSpec: the wire contract for a training job, shared by the API, the workers and the SDK.

Pure data: no code, no import paths, no pickles. Unknown fields are refused and every number is
bounded, so a spec that validates is safe to queue. Combinations that cannot train (an rnn on a table,
a loss that does not fit the task, early stopping without validation rows) are refused here too, each
with a message that names the field and the fix.

Built-in datasets are checked from kiln.catalog. Any other dataset (an upload) is checked the same way when
the caller passes its DatasetInfo in the validation context:
    JobSpec.model_validate(body, context={"datasets": {name: DatasetInfo(...)}})
Validated with no "datasets" context at all, a spec naming an upload's id (a UUID) is accepted provisionally:
the checks that need the dataset stand back and loss stays None. Such a spec must be validated again with the
context before it is used (the API does at submit, the worker at claim).
"""

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    field_validator,
)

from kiln.catalog import BUILTIN_DATASETS, LOSSES_FOR_TASK, DatasetInfo, Layout, Task, channels_and_extent
from kiln.storage import parse_id

LossName = Literal["mse", "l1", "huber", "bce", "cross_entropy"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Activation = Literal["relu", "tanh", "gelu", "sigmoid"]
Width = Annotated[int, Field(ge=1, le=4096)]


# --- models -------------------------------------------------------------------------------------------


class MLPSpec(StrictModel):
    """A multi-layer perceptron: Linear -> activation -> dropout, per hidden layer."""

    type: Literal["mlp"]
    hidden: list[Width] = Field(default=[64], max_length=16)
    activation: Activation = "relu"
    dropout: FiniteFloat = Field(default=0.0, ge=0.0, le=0.9)


class CNNSpec(StrictModel):
    """Convolution blocks over a sequence (dims 1) or an image (dims 2), then a dense head like an MLP's.

    A block is a "same"-padded convolution (the extent is kept) and the activation, then with `pool` a 2-wide
    max-pool that halves the extent, rounding down. The head flattens what is left and applies the `hidden`
    layers, each with the activation and dropout, then a linear output layer.
    """

    type: Literal["cnn"]
    dims: Literal[1, 2] = 2
    channels: list[Annotated[int, Field(ge=1, le=512)]] = Field(default=[16, 32], min_length=1, max_length=8)
    kernel_size: int = Field(default=3, ge=1, le=15)
    pool: bool = True
    hidden: list[Width] = Field(default=[64], max_length=4)
    activation: Activation = "relu"
    dropout: FiniteFloat = Field(default=0.0, ge=0.0, le=0.9)

    @field_validator("kernel_size")
    @classmethod
    def _odd_kernel(cls, size: int) -> int:
        if size % 2 == 0:  # an even kernel cannot be centred: "same" padding would be lopsided
            raise ValueError(f"model.kernel_size must be odd; use {size - 1} or {size + 1}")
        return size

    def extent_after_blocks(self, extent: tuple[int, ...]) -> tuple[int, ...]:
        """The spatial extent the head sees; ValueError when pooling would shrink it to nothing."""
        sizes = [extent]
        for _ in self.channels if self.pool else ():
            if min(sizes[-1]) < 2:
                trail = " -> ".join("x".join(map(str, s)) for s in sizes)
                raise ValueError(
                    f"model.channels has {len(self.channels)} pooling blocks, but the input shrinks to nothing "
                    f"after {len(sizes) - 1} ({trail}); use at most {len(sizes) - 1} entries in model.channels, "
                    "or model.pool false"
                )
            sizes.append(tuple(s // 2 for s in sizes[-1]))
        return sizes[-1]


class RNNSpec(StrictModel):
    """A recurrent network over a sequence; its final hidden state (both directions' when bidirectional) goes
    through dropout to a linear head: sequence to value, or to class."""

    type: Literal["rnn"]
    cell: Literal["rnn", "lstm", "gru"] = "lstm"
    hidden_size: int = Field(default=64, ge=1, le=1024)
    layers: int = Field(default=1, ge=1, le=4)
    bidirectional: bool = False
    dropout: FiniteFloat = Field(default=0.0, ge=0.0, le=0.9)  # between stacked layers, and before the head


class AutoencoderSpec(StrictModel):
    """An MLP encoder from the input down to `latent` units and a mirrored decoder back up; it learns to
    reconstruct its inputs (unsupervised: labels are ignored). The encoder alone makes embeddings."""

    type: Literal["autoencoder"]
    encoder: list[Width] = Field(default=[64], max_length=8)  # the decoder's widths are these, reversed
    latent: int = Field(default=8, ge=1, le=1024)
    activation: Activation = "relu"
    dropout: FiniteFloat = Field(default=0.0, ge=0.0, le=0.9)


ModelSpec = Annotated[MLPSpec | CNNSpec | RNNSpec | AutoencoderSpec, Field(discriminator="type")]


# --- data ---------------------------------------------------------------------------------------------


def _dataset_info(name: str, info: ValidationInfo) -> DatasetInfo | None:
    """A built-in dataset, or one the caller described in the validation context; None if unknown."""
    return BUILTIN_DATASETS.get(name) or ((info.context or {}).get("datasets") or {}).get(name)


def _pending_upload(name: str, info: ValidationInfo) -> bool:
    """An upload's id validated without a datasets context: accepted until it is validated with one."""
    if "datasets" in (info.context or {}):
        return False
    try:
        return parse_id(name) == name
    except ValueError:
        return False


class DataSpec(StrictModel):
    dataset: str = Field(
        min_length=1,
        max_length=64,
        description="A built-in dataset name (" + ", ".join(BUILTIN_DATASETS) + "), or an uploaded dataset's id.",
    )
    val_fraction: FiniteFloat = Field(default=0.2, ge=0.0, le=0.5)
    samples: int | None = Field(
        default=None, ge=20, le=200_000, description="Rows to generate (generated datasets only)."
    )

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, name: str, info: ValidationInfo) -> str:
        if _dataset_info(name, info) is None and not _pending_upload(name, info):
            raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(BUILTIN_DATASETS)}, "
                             "or the id of a dataset you uploaded")
        return name

    @field_validator("samples")
    @classmethod
    def _samples_only_for_generated(cls, samples: int | None, info: ValidationInfo) -> int | None:
        name = info.data.get("dataset")
        dataset = _dataset_info(name, info) if name else None
        if samples is not None and dataset is not None and not dataset.generated:
            raise ValueError(f"dataset {name!r} has a fixed size; samples applies to generated datasets only")
        return samples

    def validation_rows(self, dataset: DatasetInfo) -> int:
        """Rows split_dataset holds out for validation."""
        return int((self.samples or dataset.rows) * self.val_fraction)


# --- loss, optimizer, schedule, stopping -----------------------------------------------------------


class LossOptions(StrictModel):
    """Settings of the losses that have any; each applies to its own loss only."""

    delta: FiniteFloat = Field(default=1.0, gt=0.0, le=100.0)  # huber: quadratic within delta, linear beyond
    label_smoothing: FiniteFloat = Field(default=0.0, ge=0.0, le=0.5)  # cross_entropy


# Which loss reads each option. A value other than the default with another loss is refused: it would silently
# do nothing. (Comparing with the default, not "was it set", keeps a stored, normalised spec re-validatable.)
LOSS_OPTION_OWNERS = {"delta": "huber", "label_smoothing": "cross_entropy"}


def _learning_rate(value: Any, handler: Any) -> float | str:
    # One sentence at optimizer.lr instead of one error per member of the union.
    try:
        return handler(value)
    except ValidationError:
        raise ValueError("lr must be a finite number in (0, 10], or 'auto' to pick one with a range test") from None


LearningRate = Annotated[
    Annotated[float, Field(gt=0.0, le=10.0, allow_inf_nan=False)] | Literal["auto"],
    WrapValidator(_learning_rate),
]
Momentum = Annotated[float, Field(ge=0.0, lt=1.0, allow_inf_nan=False)]
WeightDecay = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class SGDSpec(StrictModel):
    type: Literal["sgd"]
    lr: LearningRate = 0.01
    momentum: Momentum = 0.0
    nesterov: bool = False
    weight_decay: WeightDecay = 0.0

    @field_validator("nesterov")
    @classmethod
    def _nesterov_needs_momentum(cls, nesterov: bool, info: ValidationInfo) -> bool:
        if nesterov and info.data.get("momentum") == 0:
            raise ValueError("nesterov needs momentum: set optimizer.momentum above 0 (e.g. 0.9) or nesterov false")
        return nesterov


class AdamSpec(StrictModel):
    type: Literal["adam"]
    lr: LearningRate = 0.001
    weight_decay: WeightDecay = 0.0  # added to the gradient (L2), as torch.optim.Adam does


class AdamWSpec(StrictModel):
    type: Literal["adamw"]
    lr: LearningRate = 0.001
    weight_decay: WeightDecay = 0.01  # decoupled from the gradient


class RMSpropSpec(StrictModel):
    type: Literal["rmsprop"]
    lr: LearningRate = 0.01
    alpha: FiniteFloat = Field(default=0.99, ge=0.0, lt=1.0)  # smoothing of the squared-gradient average
    momentum: Momentum = 0.0
    weight_decay: WeightDecay = 0.0


OptimizerSpec = Annotated[SGDSpec | AdamSpec | AdamWSpec | RMSpropSpec, Field(discriminator="type")]


class ConstantSchedule(StrictModel):
    type: Literal["none"]


class StepSchedule(StrictModel):
    """Multiply the learning rate by gamma every step_size epochs."""

    type: Literal["step"]
    step_size: int = Field(default=10, ge=1, le=10_000)
    gamma: FiniteFloat = Field(default=0.1, gt=0.0, le=1.0)


class CosineSchedule(StrictModel):
    """Anneal the learning rate from optimizer.lr down to min_lr along a half cosine over all the epochs."""

    type: Literal["cosine"]
    min_lr: FiniteFloat = Field(default=0.0, ge=0.0, le=10.0)


class OneCycleSchedule(StrictModel):
    """Smith's one-cycle, stepped every batch: up from lr/div_factor to optimizer.lr over the first pct_start of
    the steps, then down to lr/(div_factor*final_div_factor). The momentum is left as the optimizer has it."""

    type: Literal["one_cycle"]
    pct_start: FiniteFloat = Field(default=0.3, ge=0.01, le=0.99)
    div_factor: FiniteFloat = Field(default=25.0, ge=1.0, le=1e4)
    final_div_factor: FiniteFloat = Field(default=1e4, ge=1.0, le=1e6)


class PlateauSchedule(StrictModel):
    """Multiply the learning rate by factor when the validation loss has not improved (by the relative threshold)
    for patience epochs; then wait cooldown epochs before watching again. Needs validation rows."""

    type: Literal["plateau"]
    factor: FiniteFloat = Field(default=0.1, gt=0.0, lt=1.0)
    patience: int = Field(default=5, ge=0, le=1000)
    threshold: FiniteFloat = Field(default=1e-4, ge=0.0, le=1.0)
    cooldown: int = Field(default=0, ge=0, le=1000)
    min_lr: FiniteFloat = Field(default=0.0, ge=0.0, le=10.0)


SchedulerSpec = Annotated[
    ConstantSchedule | StepSchedule | CosineSchedule | OneCycleSchedule | PlateauSchedule,
    Field(discriminator="type"),
]


class EarlyStoppingSpec(StrictModel):
    """Stop when the validation loss has not fallen below its best minus min_delta for patience epochs."""

    patience: int = Field(default=5, ge=1, le=1000)
    min_delta: FiniteFloat = Field(default=0.0, ge=0.0, le=1e3)
    restore_best: bool = True  # end with the weights of the best epoch, not the last


# --- where it runs ---------------------------------------------------------------------------------------

# Queue names a spec may not take: kiln's own queues go by these suffixes (see kiln.dispatch.train_queue).
RESERVED_QUEUES = frozenset({"gpu", "auto", "predict"})


def check_queue_name(queue: str) -> str:
    """A named pool's queue (resources.queue, `kiln worker --queue`), or ValueError with the fix."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,39}", queue):
        raise ValueError(f"queue {queue!r} is not a queue name: use up to 40 lower-case letters, digits, '-' and "
                         "'_', starting with a letter or digit (as in `kiln worker --queue a100`)")
    if queue in RESERVED_QUEUES:
        raise ValueError(f"queue {queue!r} is kiln's own; pick another name, or leave queue out and let "
                         "resources.device choose")
    return queue


class ResourcesSpec(StrictModel):
    """What the job needs from a worker; kiln.dispatch.train_queue maps it to a Celery queue.

    device "cpu" runs on CPU workers; "cuda" on a worker process that owns a GPU (never on a CPU-only one);
    "auto" on whichever worker is free first, on its GPU if it has one. `queue` sends the job to workers
    started with `kiln worker --queue NAME` instead (a pool of particular machines).
    """

    device: Literal["cpu", "cuda", "auto"] = "cpu"
    # GPUs the job needs: 1 for device "cuda" (filled in), 0 for "cpu". More than one is refused until
    # data-parallel jobs exist (DEPLOY.md has the design), rather than silently training on one GPU.
    gpus: int | None = Field(default=None, ge=0, le=64, validate_default=True)
    queue: str | None = None
    # bf16 autocast for the forward pass and loss; weights, gradients and optimizer state stay float32.
    precision: Literal["fp32", "bf16"] = "fp32"

    @field_validator("gpus")
    @classmethod
    def _gpus_fit_device(cls, gpus: int | None, info: ValidationInfo) -> int:
        device = info.data.get("device", "cpu")
        if gpus is None:
            return 1 if device == "cuda" else 0
        if gpus > 1:
            raise ValueError(f"resources.gpus {gpus}: jobs that train on several GPUs at once are not supported "
                             "yet (DEPLOY.md has the design); ask for 1 GPU")
        if gpus == 1 and device != "cuda":
            raise ValueError(f"resources.gpus 1 needs device 'cuda' (device {device!r} asks for no GPU of its own); "
                             "set device 'cuda', or gpus 0")
        if gpus == 0 and device == "cuda":
            raise ValueError("device 'cuda' trains on one GPU: set resources.gpus to 1, or use device 'cpu'")
        return gpus

    @field_validator("queue")
    @classmethod
    def _queue_name(cls, queue: str | None) -> str | None:
        return None if queue is None else check_queue_name(queue)


# --- the job ------------------------------------------------------------------------------------------


def training_task(model: ModelSpec, dataset: DatasetInfo) -> Task:
    """What the job learns: the dataset's task, or reconstruction for an autoencoder, which ignores labels."""
    return Task.reconstruction if model.type == "autoencoder" else dataset.task


def _examples(layout: Layout) -> str:
    return " or ".join(repr(d.name) for d in BUILTIN_DATASETS.values() if d.layout is layout)


def _check_model_fits(model: ModelSpec, dataset: DatasetInfo) -> None:
    if dataset.task is Task.reconstruction and model.type != "autoencoder":
        raise ValueError(f"dataset {dataset.name!r} has no labels: use model.type 'autoencoder'")
    if model.type == "rnn":
        needs, what = Layout.sequence, "model.type 'rnn'"
    elif model.type == "cnn":
        needs, what = (Layout.sequence, "model.dims 1 (a 1-d cnn)") if model.dims == 1 else (
            Layout.image, "model.dims 2 (a 2-d cnn)")
    else:
        return  # mlp and autoencoder read rows flat, whatever their layout
    if dataset.layout is not needs:
        shapes = {Layout.sequence: "(steps, channels)", Layout.image: "(channels, height, width)"}
        fix = {Layout.tabular: "model.type 'mlp'", Layout.sequence: "model.type 'cnn' with dims 1",
               Layout.image: "model.type 'cnn' with dims 2"}[dataset.layout]
        article = "an" if needs is Layout.image else "a"
        raise ValueError(
            f"{what} needs {needs.value} rows, of shape {shapes[needs]}, but dataset {dataset.name!r} holds "
            f"{dataset.layout.value} rows of shape {dataset.input_shape}; use {fix} for it, "
            f"or {article} {needs.value} dataset such as {_examples(needs)}"
        )
    if model.type == "cnn":
        model.extent_after_blocks(channels_and_extent(dataset.input_shape)[1])


def _needs_validation(what: str, data: DataSpec | None, info: ValidationInfo) -> None:
    dataset = _dataset_info(data.dataset, info) if data is not None else None
    if dataset is not None and data.validation_rows(dataset) == 0:
        raise ValueError(
            f"{what} watches the validation loss, but data.val_fraction {data.val_fraction} leaves no validation "
            f"rows; set data.val_fraction above 0 (e.g. 0.2), or remove {what}"
        )


class JobSpec(StrictModel):
    """Everything a worker needs to train one model. Defaults are filled in on validation."""

    name: str | None = Field(default=None, min_length=1, max_length=200, pattern=r"^[\w.\- ]+$")
    # Before model and loss: their checks read it.
    data: DataSpec
    model: ModelSpec = Field(default_factory=lambda: MLPSpec(type="mlp"), validate_default=True)
    # None means "the natural loss for the job's task"; validation replaces it.
    loss: LossName | None = Field(default=None, validate_default=True)
    loss_options: LossOptions | None = None
    optimizer: OptimizerSpec = Field(default_factory=lambda: AdamSpec(type="adam"))
    scheduler: SchedulerSpec = Field(default_factory=lambda: ConstantSchedule(type="none"))
    grad_clip: FiniteFloat | None = Field(
        default=None, gt=0.0, le=1e4, description="Largest L2 norm of all the gradients together; None: no clipping."
    )
    early_stopping: EarlyStoppingSpec | None = None
    epochs: int = Field(default=10, ge=1, le=10_000)
    batch_size: int = Field(default=64, ge=1, le=65_536)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    # Wall-clock budget for the training; None takes the server's default (KILN_DEFAULT_TIME_LIMIT_S),
    # and the server refuses more than its KILN_MAX_TIME_LIMIT_S.
    time_limit_s: int | None = Field(default=None, ge=1, le=30 * 24 * 3600)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)

    @field_validator("model")
    @classmethod
    def _model_fits_data(cls, model: ModelSpec, info: ValidationInfo) -> ModelSpec:
        data = info.data.get("data")
        # No data: that section itself was invalid, and its error is reported already. No dataset: a pending upload.
        if data is not None and (dataset := _dataset_info(data.dataset, info)) is not None:
            _check_model_fits(model, dataset)
        return model

    @field_validator("loss")
    @classmethod
    def _loss_fits_task(cls, loss: str | None, info: ValidationInfo) -> str | None:
        data, model = info.data.get("data"), info.data.get("model")
        dataset = _dataset_info(data.dataset, info) if data is not None else None
        if dataset is None or model is None:
            return loss
        task = training_task(model, dataset)
        fitting = LOSSES_FOR_TASK[task]
        if loss is None:
            return fitting[0]
        if loss not in fitting:
            use = " or ".join(repr(x) for x in fitting)
            if task is Task.reconstruction:
                raise ValueError(f"model.type 'autoencoder' reconstructs its inputs, which loss {loss!r} cannot "
                                 f"measure; use {use}")
            raise ValueError(f"loss {loss!r} does not fit dataset {data.dataset!r}, a {task.value} task; use {use}")
        return loss

    @field_validator("loss_options")
    @classmethod
    def _options_fit_loss(cls, options: LossOptions | None, info: ValidationInfo) -> LossOptions | None:
        loss = info.data.get("loss")
        for field, owner in LOSS_OPTION_OWNERS.items():
            unused = loss is not None and loss != owner
            if options is not None and unused and getattr(options, field) != LossOptions.model_fields[field].default:
                raise ValueError(f"loss_options.{field} applies to loss {owner!r} only, and the loss is {loss!r}; "
                                 f"remove it, or set loss {owner!r}")
        return options

    @field_validator("scheduler")
    @classmethod
    def _scheduler_fits(cls, scheduler: SchedulerSpec, info: ValidationInfo) -> SchedulerSpec:
        if scheduler.type == "plateau":
            _needs_validation("scheduler 'plateau'", info.data.get("data"), info)
        lr = getattr(info.data.get("optimizer"), "lr", None)
        min_lr = getattr(scheduler, "min_lr", 0.0)
        if isinstance(lr, float) and min_lr >= lr:
            raise ValueError(f"scheduler.min_lr {min_lr} is not below optimizer.lr {lr}; lower scheduler.min_lr")
        return scheduler

    @field_validator("early_stopping")
    @classmethod
    def _early_stopping_has_validation(
        cls, early: EarlyStoppingSpec | None, info: ValidationInfo
    ) -> EarlyStoppingSpec | None:
        if early is not None:
            _needs_validation("early_stopping", info.data.get("data"), info)
        return early

    @property
    def task(self) -> Task:
        """The task of a job on a built-in dataset (for an upload: training_task(spec.model, its DatasetInfo))."""
        return training_task(self.model, BUILTIN_DATASETS[self.data.dataset])
