"""Checkpoints round-trip a LoopState exactly, atomically, and without pickle."""

import pickle

import pytest
import torch

from kiln.spec import JobSpec
from models import build_model
from worker.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, spec_hash
from worker.training import LoopState, make_optimizer


def _state() -> LoopState:
    spec = JobSpec.model_validate({"data": {"dataset": "moons"}, "optimizer": {"type": "adam", "lr": 0.01}})
    torch.manual_seed(0)
    model = build_model(spec.model, 2, 1)
    optimizer = make_optimizer(spec.optimizer, model.parameters())
    model(torch.randn(4, 2)).sum().backward()
    optimizer.step()  # so the optimizer has per-parameter state (int keys, step tensors)
    return LoopState(model, optimizer, epoch=3)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_round_trip_is_exact(tmp_path):
    state = _state().state_dict()
    path = tmp_path / "epoch-000003.safetensors"
    save_checkpoint(path, state, "abc")
    loaded = load_checkpoint(path, "abc")
    assert _equal(state, loaded)
    assert list(tmp_path.iterdir()) == [path], "no temp file left behind"

    restored = _state()
    restored.load_state_dict(loaded)  # optimizer state must match by parameter index, not silently drop
    assert restored.epoch == 3
    assert restored.optimizer.state_dict()["state"].keys() == {0, 1, 2, 3}


def test_refuses_other_specs_and_pickles(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, _state().state_dict(), spec_hash({"a": 1}))
    with pytest.raises(CheckpointError, match="different spec"):
        load_checkpoint(path, spec_hash({"a": 2}))

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError):
        load_checkpoint(evil, "abc")
    assert not marker.exists()
