"""The training loop, pure: tensors in, metrics out. No Celery, no SQL, no HTTP.

The data lives in tensors on the device and each epoch trains on index slices of one permutation,
drawn from a generator seeded by (job seed, epoch): a run resumed at any epoch sees the same batches
as one that never stopped. The only host syncs are once per epoch, to read the losses.
"""

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from kiln.catalog import LOSSES_FOR_TASK, Task
from kiln.spec import JobSpec, OptimizerSpec
from worker.datasets import Split

EVAL_BATCH = 4096  # rows per validation forward pass: bounds memory without slowing small sets


@dataclass
class TrainData:
    """Standardised inputs and targets, already on the device the model trains on."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor | None  # None when there is no validation split
    y_val: torch.Tensor | None

    @classmethod
    def from_split(cls, split: Split, task: Task, loss: str, device: torch.device | str) -> "TrainData":
        if loss not in LOSSES_FOR_TASK[task]:
            raise ValueError(f"loss {loss!r} does not fit a {task.value} task")

        def targets(y: np.ndarray) -> torch.Tensor:
            # bce and mse compare one output column with a float target; cross-entropy takes class indices
            t = torch.as_tensor(y, device=device)
            return t.float().unsqueeze(1) if loss in ("bce", "mse") else t.long()

        has_val = len(split.x_val) > 0
        return cls(
            x_train=torch.as_tensor(split.x_train, dtype=torch.float32, device=device),
            y_train=targets(split.y_train),
            x_val=torch.as_tensor(split.x_val, dtype=torch.float32, device=device) if has_val else None,
            y_val=targets(split.y_val) if has_val else None,
        )


@dataclass
class EpochMetrics:
    epoch: int  # counts from 1
    train_loss: float  # mean over the epoch's training rows
    val_loss: float | None  # None without a validation split
    val_accuracy: float | None  # None for regression, or without a validation split
    lr: float
    duration_s: float  # the training part of the epoch, validation excluded
    samples_per_s: float


@dataclass
class LoopState:
    """Everything the loop needs to continue exactly where it stopped: what a checkpoint holds."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    epoch: int = 0  # epochs completed

    def state_dict(self) -> dict[str, Any]:
        np_kind, np_keys, np_pos, np_gauss, np_cached = np.random.get_state()
        return {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
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
    stopped: str | None  # None when all epochs ran; else the reason should_stop() gave


def output_size(task: Task, classes: int | None, loss: str) -> int:
    """Width of the model's last layer: one logit or value, or one logit per class."""
    if loss in ("bce", "mse"):
        return 1
    if task is Task.binary:
        return 2
    if classes is None:
        raise ValueError(f"cross_entropy needs a class count for a {task.value} task")
    return classes


LOSSES: dict[str, Callable[[], nn.Module]] = {
    "mse": nn.MSELoss,
    "bce": nn.BCEWithLogitsLoss,
    "cross_entropy": nn.CrossEntropyLoss,
}


def make_loss(name: str) -> nn.Module:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
    return LOSSES[name]()


def make_optimizer(spec: OptimizerSpec, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    if spec.type == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    if spec.type == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    raise ValueError(f"unknown optimizer {spec.type!r}")


def fit(
    model: nn.Module,
    data: TrainData,
    spec: JobSpec,
    *,
    callbacks: Sequence[Callback] = (),
    should_stop: Callable[[], str | None] = lambda: None,
    resume: dict[str, Any] | None = None,
) -> FitResult:
    """Train `model` (already on the data's device) up to spec.epochs.

    `resume` is a LoopState.state_dict() from a checkpoint: training continues after its epoch with the
    same weights, optimizer state and RNG states. `should_stop` is polled at every batch boundary and
    returns a reason to stop (e.g. "cancelled"), or None. Raises DivergedError when a loss is not finite.
    """
    optimizer = make_optimizer(spec.optimizer, model.parameters())
    state = LoopState(model, optimizer)
    if resume is not None:
        state.load_state_dict(resume)
    loss_fn = make_loss(spec.loss)
    n, bs = len(data.x_train), spec.batch_size
    n_batches = math.ceil(n / bs)
    device = data.x_train.device
    # Each batch's share of the epoch mean (the last batch may be short).
    weights = torch.full((n_batches,), bs / n, device=device)
    weights[-1] = (n - bs * (n_batches - 1)) / n

    history: list[EpochMetrics] = []
    model.train()
    for epoch in range(state.epoch + 1, spec.epochs + 1):
        t0 = time.perf_counter()
        gen = torch.Generator(device="cpu").manual_seed(spec.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=gen).to(device)
        batch_losses = torch.empty(n_batches, device=device)  # kept on the device: no per-batch sync
        for i in range(n_batches):
            if reason := should_stop():
                return FitResult(history, reason)
            idx = order[i * bs : (i + 1) * bs]
            loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            batch_losses[i] = loss.detach()

        # The running mean turns non-finite exactly at the first bad batch, so one sync reads the
        # epoch's loss and, only when it went wrong, a second one names the culprit.
        running = torch.cumsum(batch_losses * weights, dim=0)
        train_loss = running[-1].item()
        if not math.isfinite(train_loss):
            bad = int(torch.nonzero(~torch.isfinite(running))[0]) + 1
            raise DivergedError(epoch, bad, running[bad - 1].item())
        duration = time.perf_counter() - t0  # after .item(), so queued device work is counted

        val_loss = val_accuracy = None
        if data.x_val is not None and data.y_val is not None:
            val_loss, val_accuracy = evaluate(model, loss_fn, data.x_val, data.y_val, spec.loss)
            if not math.isfinite(val_loss):  # the epoch's last step broke the weights
                raise DivergedError(epoch, n_batches, val_loss, what="validation loss")

        metrics = EpochMetrics(
            epoch=epoch,
            train_loss=train_loss,
            val_loss=val_loss,
            val_accuracy=val_accuracy,
            lr=optimizer.param_groups[0]["lr"],
            duration_s=duration,
            samples_per_s=n / duration,
        )
        history.append(metrics)
        state.epoch = epoch
        for callback in callbacks:
            callback.on_epoch_end(metrics, state)
    # Without a validation split, a last step that broke the weights would otherwise go unseen.
    if data.x_val is None and history and not all(torch.isfinite(p).all() for p in model.parameters()):
        raise DivergedError(spec.epochs, n_batches, math.nan, what="the weights")
    return FitResult(history, None)


@torch.no_grad()
def evaluate(
    model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str
) -> tuple[float, float | None]:
    """Mean loss over the rows, and accuracy unless the loss is mse; puts the model back in train mode."""
    model.eval()
    total_loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device)
    for i in range(0, len(x), EVAL_BATCH):
        out, target = model(x[i : i + EVAL_BATCH]), y[i : i + EVAL_BATCH]
        total_loss += loss_fn(out, target) * len(target)
        if loss == "bce":
            correct += ((out > 0).float() == target).sum()
        elif loss == "cross_entropy":
            correct += (out.argmax(dim=1) == target).sum()
    model.train()
    accuracy = None if loss == "mse" else correct.item() / len(x)
    return total_loss.item() / len(x), accuracy
