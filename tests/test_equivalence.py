"""kiln's loop is plain SGD and nothing else: for an MLP on CPU its per-epoch training losses equal those of a
hand-written PyTorch loop with the same seed, initialisation and batch order."""

import math

import numpy as np
import torch
from torch import nn

from kiln.spec import JobSpec
from worker.preparation import prepare
from worker.training import fit

SPEC = {
    "data": {"dataset": "wine", "val_fraction": 0.2},
    "model": {"type": "mlp", "hidden": [32, 16], "activation": "tanh"},
    "optimizer": {"type": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
    "epochs": 8,
    "batch_size": 20,  # 143 training rows: the last batch of each epoch is short
    "seed": 11,
}


def hand_written_losses(x: np.ndarray, y: np.ndarray, seed: int, epochs: int, batch_size: int) -> list[float]:
    torch.manual_seed(seed)  # the same initialisation: the same layers, created in the same order
    model = nn.Sequential(nn.Linear(13, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    losses = []
    for epoch in range(1, epochs + 1):
        # kiln's documented batch order: a permutation per epoch from seed * 1_000_003 + epoch
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        total = 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        losses.append(total / len(x))
    return losses


def test_sgd_losses_equal_a_hand_written_loop():
    spec = JobSpec.model_validate(SPEC)
    job = prepare(spec)
    kiln = [m.train_loss for m in fit(job.model, job.data, spec).history]
    hand = hand_written_losses(job.split.x_train, job.split.y_train, spec.seed, spec.epochs, spec.batch_size)
    assert len(kiln) == len(hand) == 8
    assert all(math.isclose(a, b, rel_tol=0, abs_tol=1e-6) for a, b in zip(kiln, hand, strict=True)), (kiln, hand)
    assert hand[-1] < 0.5 * hand[0]  # and it is a real training run, not two loops that both did nothing
