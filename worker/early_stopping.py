"""Early stopping on the validation loss: the best epoch, the epochs since, and the best weights."""

import math
from typing import Any

import torch
from torch import nn

from kiln.spec import EarlyStoppingSpec


class EarlyStopping:
    def __init__(self, spec: EarlyStoppingSpec) -> None:
        self.spec = spec
        self.best_loss = math.inf
        self.best_epoch = 0
        self.bad_epochs = 0  # epochs since the last improvement
        self.last_epoch = 0
        self.best_weights: dict[str, torch.Tensor] | None = None  # kept on the model's device: no sync

    def update(self, epoch: int, val_loss: float, model: nn.Module) -> None:
        self.last_epoch = epoch
        if val_loss < self.best_loss - self.spec.min_delta:
            self.best_loss, self.best_epoch, self.bad_epochs = val_loss, epoch, 0
            if self.spec.restore_best:
                self.best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.bad_epochs += 1

    @property
    def triggered(self) -> bool:
        return self.bad_epochs >= self.spec.patience

    def finish(self, model: nn.Module) -> str:
        """Restore the best weights if the spec asks for them; the sentence that says why training stopped."""
        by = f" by more than {self.spec.min_delta:g}" if self.spec.min_delta else ""
        reason = f"early_stopping: val_loss did not improve{by} for {self.spec.patience} epochs"
        if self.best_weights is not None:
            model.load_state_dict(self.best_weights)
            return f"{reason}; restored the weights of epoch {self.best_epoch}"
        return f"{reason}; kept the weights of epoch {self.last_epoch} (the best was epoch {self.best_epoch})"

    def state_dict(self) -> dict[str, Any]:
        return {"best_loss": self.best_loss, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "last_epoch": self.last_epoch, "best_weights": self.best_weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_loss, self.best_epoch = state["best_loss"], state["best_epoch"]
        self.bad_epochs, self.last_epoch = state["bad_epochs"], state["last_epoch"]
        self.best_weights = state["best_weights"]
