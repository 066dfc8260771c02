"""Learning-rate schedules from a SchedulerSpec, and when each one steps."""

from typing import Any

import torch
from torch.optim import lr_scheduler

from kiln.spec import SchedulerSpec


class Schedule:
    """A torch LR scheduler with its stepping rule: one_cycle after every batch, plateau after every epoch on the
    validation loss, step and cosine after every epoch. Type "none" keeps the learning rate constant."""

    def __init__(self, spec: SchedulerSpec, optimizer: torch.optim.Optimizer, epochs: int, batches: int) -> None:
        self.spec = spec
        self.scheduler: Any = None
        match spec.type:
            case "step":
                self.scheduler = lr_scheduler.StepLR(optimizer, step_size=spec.step_size, gamma=spec.gamma)
            case "cosine":
                self.scheduler = lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=spec.min_lr)
            case "one_cycle":
                self.scheduler = lr_scheduler.OneCycleLR(
                    optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=epochs * batches,
                    pct_start=spec.pct_start, div_factor=spec.div_factor, final_div_factor=spec.final_div_factor,
                    cycle_momentum=False,
                )
            case "plateau":
                self.scheduler = lr_scheduler.ReduceLROnPlateau(
                    optimizer, mode="min", factor=spec.factor, patience=spec.patience, threshold=spec.threshold,
                    cooldown=spec.cooldown, min_lr=spec.min_lr,
                )

    def after_batch(self) -> None:
        if self.spec.type == "one_cycle":
            self.scheduler.step()

    def after_epoch(self, val_loss: float | None) -> None:
        if self.spec.type == "plateau":
            self.scheduler.step(val_loss)  # the spec guarantees a validation split
        elif self.spec.type in ("step", "cosine"):
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict() if self.scheduler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state)
