"""From a JobSpec to what fit() takes: the dataset loaded and split, the model built and seeded, and the
metadata its weights file will carry. The runner, the tests and the reference benchmark all start here."""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from kiln.catalog import BUILTIN_DATASETS, DatasetInfo, Task
from kiln.model_size import output_size
from kiln.spec import JobSpec, training_task
from models import build_model
from models.weights import FORMAT
from worker.datasets import Split, load_dataset, split_dataset
from worker.training import TrainData


@dataclass
class Prepared:
    model: nn.Module  # freshly initialised from spec.seed, on the device
    data: TrainData
    split: Split
    meta: dict[str, Any]  # for models.weights.save_weights; the runner adds what only it knows (job_id)


def seed_torch(seed: int, device: torch.device | str) -> None:
    """torch.manual_seed for a job on `device`. On CPU only the CPU generator is seeded: torch.manual_seed also
    queues a CUDA seeding for later, capturing the caller's stack each time (~0.1-0.5 ms a job, for nothing)."""
    if torch.device(device).type == "cpu":
        torch.random.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def prepare(
    spec: JobSpec,
    device: torch.device | str = "cpu",
    dataset: tuple[np.ndarray, np.ndarray, DatasetInfo] | None = None,
) -> Prepared:
    """Load and split the data, seed torch with spec.seed, build the model. `dataset` is an upload's
    (x, y, info) as worker.datasets.load_arrays returns them; by default the built-in spec.data names."""
    if dataset is None:
        info = BUILTIN_DATASETS[spec.data.dataset]
        x, y = load_dataset(spec.data, spec.seed)
    else:
        x, y, info = dataset
    task = training_task(spec.model, info)
    split = split_dataset(x, y, task, spec.data.val_fraction, spec.seed)
    seed_torch(spec.seed, device)
    out = output_size(task, info.classes, spec.loss, info.features)
    model = build_model(spec.model, info.input_shape, out).to(device)
    meta = {
        "format": FORMAT,
        "model": spec.model.model_dump(mode="json"),
        "in_features": info.features,
        "input_shape": list(info.input_shape),
        "out_features": out,
        "task": task.value,
        "loss": spec.loss,
        "classes": None if task is Task.reconstruction else info.classes,
        "input_mean": split.input_mean.tolist(),
        "input_std": split.input_std.tolist(),
        "target_mean": split.target_mean,
        "target_std": split.target_std,
        "spec": spec.model_dump(mode="json"),
    }
    return Prepared(model, TrainData.from_split(split, task, spec.loss, device), split, meta)
