"""Checkpoints: a LoopState.state_dict() on disk as safetensors plus a JSON skeleton. No pickle.

The nested state (model and optimizer state dicts, RNG states, epoch) is split into its tensors,
stored by path, and a JSON description of everything else with placeholders where tensors were.
Dicts with non-string keys (an optimizer's per-parameter state) keep their keys' types.
Writes are atomic: a temp file in the same directory, fsync, rename, fsync of the directory.
"""

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from models.weights import save_tensors

FORMAT = "kiln.checkpoint/1"


class CheckpointError(ValueError):
    """The file is not a checkpoint of this job (wrong format, spec, or damaged)."""


def spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _flatten(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous().clone()
        return {"$tensor": path}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {"$dict": {k: _flatten(v, f"{path}.{k}", tensors) for k, v in value.items()}}
        return {"$items": [[k, _flatten(v, f"{path}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        return [_flatten(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot checkpoint a {type(value).__name__} at {path}")


def _unflatten(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, dict):
        if "$tensor" in node:
            return tensors[node["$tensor"]]
        if "$dict" in node:
            return {k: _unflatten(v, tensors) for k, v in node["$dict"].items()}
        return {k: _unflatten(v, tensors) for k, v in node["$items"]}
    if isinstance(node, list):
        return [_unflatten(v, tensors) for v in node]
    return node


def save_checkpoint(path: Path, state: dict[str, Any], spec_digest: str) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "s", tensors)
    metadata = {"format": FORMAT, "spec_sha256": spec_digest, "state": json.dumps(skeleton)}
    save_tensors(path, tensors, metadata)


def load_checkpoint(path: Path, spec_digest: str) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except Exception as exc:
        raise CheckpointError(f"{path.name} is not a readable checkpoint: {exc}") from exc
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path.name} is not a kiln checkpoint")
    if metadata.get("spec_sha256") != spec_digest:
        raise CheckpointError(f"{path.name} was written for a different spec")
    return _unflatten(json.loads(metadata["state"]), tensors)
