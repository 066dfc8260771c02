"""The training loop, pure: tensors in, metrics out. No Celery, no SQL, no HTTP.

The data lives in tensors on the device and each epoch trains on index slices of one permutation,
drawn from a generator seeded by (job seed, epoch): a run resumed at any epoch sees the same batches
as one that never stopped. Everything an epoch reports (loss, gradient norms, accuracy) is accumulated
on the device and read with one host sync per epoch, and one more for the validation pass.
"""

import contextlib
import copy
import functools
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from kiln.catalog import LOSSES_FOR_TASK, Task
from kiln.model_size import output_size as output_size  # re-exported: the runner imports it from here
from kiln.spec import JobSpec, LossOptions, OptimizerSpec
from worker.datasets import Split
from worker.early_stopping import EarlyStopping
from worker.schedule import Schedule

EVAL_BATCH = 4096  # rows per validation forward pass: bounds memory without slowing small sets

# The learning-rate range test: an exponential sweep over the whole range a spec may ask for.
LR_SWEEP = (1e-6, 10.0)
LR_SWEEP_STEPS = 100
LR_SWEEP_SMOOTHING = 0.9  # exponential moving average of the batch losses, bias-corrected
LR_SWEEP_BLOWUP = 4.0  # the sweep's curve ends where the smoothed loss exceeds this times its minimum


@dataclass
class TrainData:
    """Standardised inputs and targets, already on the device the model trains on."""

    x_train: torch.Tensor
    y_train: torch.Tensor  # for reconstruction the very tensor x_train is
    x_val: torch.Tensor | None  # None when there is no validation split
    y_val: torch.Tensor | None
    task: Task

    @classmethod
    def from_split(cls, split: Split, task: Task, loss: str, device: torch.device | str) -> "TrainData":
        if loss not in LOSSES_FOR_TASK[task]:
            raise ValueError(f"loss {loss!r} does not fit a {task.value} task")

        def targets(y: np.ndarray) -> torch.Tensor:
            # cross-entropy takes class indices; every other loss compares one float column with the output
            t = torch.as_tensor(y, device=device)
            return t.long() if loss == "cross_entropy" else t.float().unsqueeze(1)

        x_train = torch.as_tensor(split.x_train, dtype=torch.float32, device=device)
        x_val = torch.as_tensor(split.x_val, dtype=torch.float32, device=device) if len(split.x_val) else None
        if task is Task.reconstruction:  # an autoencoder learns x -> x; the labels are not used
            return cls(x_train, x_train, x_val, x_val, task)
        return cls(x_train, targets(split.y_train), x_val, targets(split.y_val) if x_val is not None else None, task)


@dataclass
class EpochMetrics:
    epoch: int  # counts from 1
    train_loss: float  # mean over the epoch's training rows
    val_loss: float | None  # None without a validation split
    val_accuracy: float | None  # None for regression and reconstruction, or without a validation split
    lr: float  # at the epoch's first batch: the whole epoch's, unless one_cycle changes it every batch
    duration_s: float  # the training part of the epoch, validation excluded
    samples_per_s: float
    # The L2 norm of all the gradients together, averaged over the epoch's batches; before clipping.
    grad_norm: float | None = None
    # Each parameter's gradient L2 norm ({"0.weight": 0.12, ...}), averaged over the batches; before clipping.
    grad_norm_per_layer: dict[str, float] = field(default_factory=dict)
    # Over the epoch's training batches, in train mode (dropout on), as the weights moved; None unless classifying.
    train_accuracy: float | None = None
    val_r2: float | None = None  # coefficient of determination on the validation rows; regression only


@dataclass
class LoopState:
    """Everything the loop needs to continue exactly where it stopped: what a checkpoint holds."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    epoch: int = 0  # epochs completed
    schedule: Schedule | None = None
    early_stopping: EarlyStopping | None = None
    lr_search: dict[str, Any] | None = None  # the range test's result when optimizer.lr is "auto"

    def state_dict(self) -> dict[str, Any]:
        np_kind, np_keys, np_pos, np_gauss, np_cached = np.random.get_state()
        return {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict() if self.schedule is not None else {},
            "early_stopping": self.early_stopping.state_dict() if self.early_stopping is not None else None,
            "lr_search": self.lr_search,
            # The batch order does not depend on these, but dropout draws from torch's global RNG,
            # and a resumed run must draw exactly what an uninterrupted one would have.
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python": random.getstate(),
                "numpy": [np_kind, torch.from_numpy(np_keys.copy()), np_pos, np_gauss, np_cached],
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        # .get: checkpoints written before schedules, early stopping and lr "auto" existed have none of them.
        if self.schedule is not None:
            self.schedule.load_state_dict(state.get("scheduler") or {})
        if self.early_stopping is not None and state.get("early_stopping") is not None:
            self.early_stopping.load_state_dict(state["early_stopping"])
        self.lr_search = state.get("lr_search")
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))


class Callback(Protocol):
    def on_epoch_end(self, metrics: EpochMetrics, state: LoopState) -> None: ...


class DivergedError(Exception):
    """The loss stopped being a number: training cannot recover, so the job fails with advice."""

    def __init__(self, epoch: int, batch: int, value: float, what: str = "loss") -> None:
        self.epoch = epoch
        self.batch = batch  # 1-based, within the epoch
        kind = "NaN" if math.isnan(value) else "infinite"
        super().__init__(f"{what} became {kind} at epoch {epoch}, batch {batch}; lower the learning rate")


@dataclass
class FitResult:
    history: list[EpochMetrics]  # the epochs this call ran
    # None when all epochs ran; else the reason should_stop() gave, or the early-stopping sentence
    # ("early_stopping: val_loss did not improve ...; restored the weights of epoch 12").
    stopped: str | None
    # With optimizer.lr "auto": {"lr": the chosen rate, "sweep": [[lr, smoothed loss], ...]} (JSON as it is).
    lr_search: dict[str, Any] | None = None


LOSSES: dict[str, Callable[[LossOptions], nn.Module]] = {
    "mse": lambda _: nn.MSELoss(),
    "l1": lambda _: nn.L1Loss(),
    "huber": lambda o: nn.HuberLoss(delta=o.delta),
    "bce": lambda _: nn.BCEWithLogitsLoss(),
    "cross_entropy": lambda o: nn.CrossEntropyLoss(label_smoothing=o.label_smoothing),
}


def make_loss(name: str, options: LossOptions | None = None) -> nn.Module:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
    return LOSSES[name](options or LossOptions())


def make_optimizer(
    spec: OptimizerSpec, params: Iterable[nn.Parameter], lr: float | None = None
) -> torch.optim.Optimizer:
    """The optimizer the spec describes; `lr` overrides spec.lr (which must be given when spec.lr is "auto")."""
    lr = spec.lr if lr is None else lr
    if lr == "auto":
        raise ValueError("optimizer.lr is 'auto': pass the rate lr_range_test chose")
    # SGD, Adam and AdamW take the fused kernels: one call updates every parameter, where the default
    # implementation on CPU loops over the parameters in Python (Adam: ~3x faster per step on CPU).
    # The same algorithm; results differ from the unfused one only in the last bits of rounding.
    match spec.type:
        case "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=spec.momentum, nesterov=spec.nesterov,
                                   weight_decay=spec.weight_decay, fused=True)
        case "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=spec.weight_decay, fused=True)
        case "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=spec.weight_decay, fused=True)
        case "rmsprop":  # no fused kernel in torch
            return torch.optim.RMSprop(params, lr=lr, alpha=spec.alpha, momentum=spec.momentum,
                                       weight_decay=spec.weight_decay)
    raise ValueError(f"unknown optimizer {spec.type!r}")


def _correct(out: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """How many rows the outputs classify right, as a tensor on the device."""
    return (_predicted(out, loss) == target).sum()


def _predicted(out: torch.Tensor, loss: str) -> torch.Tensor:
    """The class each output row predicts, shaped and typed as the targets of that loss are."""
    if loss == "bce":  # one logit: positive means class 1
        return (out > 0).float()
    return out.argmax(dim=1)


def grad_norms(params: Sequence[nn.Parameter]) -> torch.Tensor:
    """Each parameter's gradient L2 norm (0 for one without a gradient), stacked on the device: no sync."""
    return torch.stack(_grad_norm_list(params))


def _grad_norm_list(params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
    """grad_norms, unstacked: the loop stacks a whole epoch's at once."""
    grads = [p.grad if p.grad is not None else p.new_zeros(()) for p in params]
    if grads[0].device.type == "cpu":  # measured: on CPU one norm per tensor is faster than the multi-tensor op
        return [torch.linalg.vector_norm(g) for g in grads]
    # On an accelerator: one multi-tensor kernel launch for all the parameters (torch's clip_grad uses it too).
    return torch._foreach_norm(grads)


def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + epoch))


def fit(
    model: nn.Module,
    data: TrainData,
    spec: JobSpec,
    *,
    callbacks: Sequence[Callback] = (),
    should_stop: Callable[[], str | None] = lambda: None,
    resume: dict[str, Any] | None = None,
    bf16: bool = False,
    compile_mode: str | None = None,
) -> FitResult:
    """Train `model` (already on the data's device) up to spec.epochs.

    `resume` is a LoopState.state_dict() from a checkpoint: training continues after its epoch with the
    same weights, optimizer, schedule and early-stopping state and RNG states. `should_stop` is polled at
    every batch boundary and returns a reason to stop (e.g. "cancelled"), or None. With optimizer.lr "auto"
    a fresh run starts with lr_range_test. Raises DivergedError when a loss is not finite.

    For accelerators (both off by default, and on CPU): `bf16` runs the forward pass and the loss under bf16
    autocast (weights, gradients and optimizer state stay float32); `compile_mode` compiles the forward pass
    and the loss with torch.compile in that mode ("default", "max-autotune", "reduce-overhead" for CUDA graphs).
    """
    if data.x_val is None and (spec.early_stopping is not None or spec.scheduler.type == "plateau"):
        raise ValueError("early_stopping and the plateau scheduler watch the validation loss: give a validation split")
    lr_search = None
    if spec.optimizer.lr == "auto":
        if resume is not None:
            lr_search = resume["lr_search"]
        else:
            chosen, sweep = lr_range_test(model, data, spec)
            lr_search = {"lr": chosen, "sweep": [list(point) for point in sweep]}
    optimizer = make_optimizer(spec.optimizer, model.parameters(), lr=lr_search["lr"] if lr_search else None)
    n, bs = len(data.x_train), spec.batch_size
    n_batches = math.ceil(n / bs)
    schedule = Schedule(spec.scheduler, optimizer, spec.epochs, n_batches)
    early = EarlyStopping(spec.early_stopping) if spec.early_stopping is not None else None
    state = LoopState(model, optimizer, schedule=schedule, early_stopping=early, lr_search=lr_search)
    if resume is not None:
        state.load_state_dict(resume)
        if early is not None and early.triggered:  # it stopped at this checkpoint, before its weights were saved
            return FitResult([], early.finish(model), lr_search)
    loss_fn = make_loss(spec.loss, spec.loss_options)
    device = data.x_train.device
    # Each batch's share of the epoch mean (the last batch may be short).
    weights = torch.full((n_batches,), bs / n, device=device)
    weights[-1] = (n - bs * (n_batches - 1)) / n
    names, params = zip(*[(name, p) for name, p in model.named_parameters() if p.requires_grad], strict=True)
    classifying = spec.loss in ("bce", "cross_entropy")
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext

    def forward(inputs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(inputs)
        return out, loss_fn(out, target)

    if compile_mode is not None:
        forward = torch.compile(forward, mode=compile_mode)

    history: list[EpochMetrics] = []
    model.train()
    for epoch in range(state.epoch + 1, spec.epochs + 1):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        order = _permutation(n, spec.seed, epoch).to(device)
        # Each batch's loss, gradient norms and predictions stay on the device, stacked once the epoch is over:
        # no batch waits for the host.
        losses: list[torch.Tensor] = []
        norms: list[list[torch.Tensor]] = []
        predictions: list[torch.Tensor] = []
        for idx in order.split(bs):
            if reason := should_stop():
                return FitResult(history, reason, lr_search)
            # index_select: the same rows as x[idx], gathered ~4x faster on CPU.
            inputs, target = data.x_train.index_select(0, idx), data.y_train.index_select(0, idx)
            if compile_mode is not None:
                torch.compiler.cudagraph_mark_step_begin()  # a new step: CUDA graphs may reuse their output buffers
            with autocast():
                out, loss = forward(inputs, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            layer_norms = _grad_norm_list(params)
            if spec.grad_clip is not None:
                total = torch.linalg.vector_norm(torch.stack(layer_norms))
                torch.nn.utils.clip_grads_with_norm_(params, spec.grad_clip, total)
            optimizer.step()
            schedule.after_batch()
            # A CUDA graph overwrites its outputs at its next replay: keep a copy of the loss when compiled.
            losses.append(loss.detach().clone() if compile_mode is not None else loss.detach())
            norms.append(layer_norms)
            if classifying:
                predictions.append(_predicted(out.detach(), spec.loss))

        # The running mean turns non-finite exactly at the first bad batch, so one sync reads the
        # epoch's numbers and, only when it went wrong, a second one names the culprit.
        running = torch.cumsum(torch.stack(losses).float() * weights, dim=0)
        batch_norms = torch.stack([norm for layers in norms for norm in layers]).view(-1, len(params))  # batch x param
        correct = (torch.cat(predictions) == data.y_train[order]).sum() if classifying else running.new_zeros(())
        train_loss, grad_norm, train_accuracy, *per_layer = torch.cat([
            running[-1:],
            torch.linalg.vector_norm(batch_norms, dim=1).mean().view(1),  # each batch's total, then their mean
            (correct / n).view(1),
            batch_norms.mean(dim=0),
        ]).tolist()
        if not math.isfinite(train_loss):
            bad = int(torch.nonzero(~torch.isfinite(running))[0]) + 1
            raise DivergedError(epoch, bad, running[bad - 1].item())
        duration = time.perf_counter() - t0  # after the sync, so queued device work is counted

        val_loss = val_accuracy = val_r2 = None
        if data.x_val is not None and data.y_val is not None:
            with autocast():
                val_loss, val_accuracy, val_r2 = evaluate(model, loss_fn, data.x_val, data.y_val, spec.loss, data.task)
            if not math.isfinite(val_loss):  # the epoch's last step broke the weights
                raise DivergedError(epoch, n_batches, val_loss, what="validation loss")

        metrics = EpochMetrics(
            epoch=epoch,
            train_loss=train_loss,
            val_loss=val_loss,
            val_accuracy=val_accuracy,
            lr=lr,
            duration_s=duration,
            samples_per_s=n / duration,
            grad_norm=grad_norm,
            grad_norm_per_layer=dict(zip(names, per_layer, strict=True)),
            train_accuracy=train_accuracy if classifying else None,
            val_r2=val_r2,
        )
        history.append(metrics)
        schedule.after_epoch(val_loss)
        if early is not None:
            early.update(epoch, val_loss, model)
        state.epoch = epoch
        for callback in callbacks:  # the checkpoint holds the schedule and early stopping as they now are
            callback.on_epoch_end(metrics, state)
        if early is not None and early.triggered:
            return FitResult(history, early.finish(model), lr_search)
    # Without a validation split, a last step that broke the weights would otherwise go unseen.
    if data.x_val is None and history and not all(torch.isfinite(p).all() for p in model.parameters()):
        raise DivergedError(spec.epochs, n_batches, math.nan, what="the weights")
    return FitResult(history, None, lr_search)


@torch.no_grad()
def evaluate(
    model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str, task: Task
) -> tuple[float, float | None, float | None]:
    """Mean loss over the rows; accuracy when classifying; R² for regression (as sklearn's r2_score).
    Puts the model back in train mode."""
    model.eval()
    total_loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device)
    squared_error = torch.zeros((), device=x.device)
    for i in range(0, len(x), EVAL_BATCH):
        out, target = model(x[i : i + EVAL_BATCH]), y[i : i + EVAL_BATCH]
        total_loss += loss_fn(out, target) * len(target)
        if loss in ("bce", "cross_entropy"):
            correct += _correct(out, target, loss)
        elif task is Task.regression:
            squared_error += ((out - target) ** 2).sum()
    model.train()
    regression = task is Task.regression
    variance = ((y - y.mean()) ** 2).sum() if regression else torch.zeros((), device=x.device)
    total_loss_, correct_, residual, spread = torch.stack([total_loss, correct, squared_error, variance]).tolist()
    accuracy = correct_ / len(x) if loss in ("bce", "cross_entropy") else None
    r2 = None
    if regression:  # a constant target: 1 if predicted exactly, else 0, as sklearn does
        r2 = 1 - residual / spread if spread > 0 else float(residual == 0)
    return total_loss_ / len(x), accuracy, r2


def lr_range_test(model: nn.Module, data: TrainData, spec: JobSpec) -> tuple[float, list[tuple[float, float]]]:
    """Smith's learning-rate range test: train a copy of the model for LR_SWEEP_STEPS batches while the
    learning rate grows exponentially across LR_SWEEP, and choose a tenth of the rate at which the smoothed
    loss was lowest. Returns (chosen rate, [(rate, smoothed loss), ...]), the sweep ending where the loss blew up.

    The model's weights and torch's global RNG are left as they were, and the batches are drawn from the job's
    seed (as an "epoch 0" that training never uses), so the choice is deterministic.
    """
    probe = copy.deepcopy(model).train()
    rng = torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    low, high = LR_SWEEP
    rates = [low * (high / low) ** (step / (LR_SWEEP_STEPS - 1)) for step in range(LR_SWEEP_STEPS)]
    device, n = data.x_train.device, len(data.x_train)
    bs = min(spec.batch_size, n)
    try:
        optimizer = make_optimizer(spec.optimizer, probe.parameters(), lr=low)
        loss_fn = make_loss(spec.loss, spec.loss_options)
        generator = torch.Generator(device="cpu").manual_seed(spec.seed * 1_000_003)
        order = torch.empty(0, dtype=torch.long)
        losses = torch.empty(LR_SWEEP_STEPS, device=device)
        for step, rate in enumerate(rates):
            if len(order) < bs:  # small datasets: one permutation after another
                order = torch.cat([order, torch.randperm(n, generator=generator)])
            idx, order = order[:bs].to(device), order[bs:]
            for group in optimizer.param_groups:
                group["lr"] = rate
            loss = loss_fn(probe(data.x_train[idx]), data.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if spec.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(probe.parameters(), spec.grad_clip)
            optimizer.step()
            losses[step] = loss.detach()
        raw = losses.tolist()  # one sync for the whole sweep; steps after a blow-up only cost time
    finally:
        torch.set_rng_state(rng[0])
        if rng[1]:
            torch.cuda.set_rng_state_all(rng[1])

    sweep: list[tuple[float, float]] = []
    average, lowest = 0.0, math.inf
    for step, (rate, loss) in enumerate(zip(rates, raw, strict=True)):
        average = LR_SWEEP_SMOOTHING * average + (1 - LR_SWEEP_SMOOTHING) * loss
        smoothed = average / (1 - LR_SWEEP_SMOOTHING ** (step + 1))
        if not math.isfinite(smoothed) or smoothed > LR_SWEEP_BLOWUP * lowest:
            break
        lowest = min(lowest, smoothed)
        sweep.append((rate, smoothed))
    best_rate = min(sweep, key=lambda point: point[1])[0] if sweep else low
    return max(best_rate / 10, low), sweep
