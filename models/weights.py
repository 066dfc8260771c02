"""Model weights as safetensors files that describe themselves: the file alone rebuilds the model.

Tensors are the model's state_dict. The safetensors header metadata holds one key, "kiln", whose value
is a JSON object with at least:

    format         "kiln.weights/1"
    model          the model spec (kiln.spec.ModelSpec as a dict), e.g. {"type": "mlp", "hidden": [64], ...}
    in_features    int, columns of the raw input (rows are flat)
    input_shape    list[int], one row's shape, e.g. [1, 8, 8] (optional: [in_features] when absent)
    out_features   int, width of the model's output
    task           "classification" | "binary" | "regression" | "reconstruction" | "embedding"
    loss           "cross_entropy" | "bce" | "mse" | "l1" | "huber" (None for "embedding")
    classes        int, or None for regression, reconstruction and embedding
    input_mean     list[float], per-feature mean of the training rows
    input_std      list[float], per-feature std of the training rows (zeros replaced by 1)
    target_mean    float, regression only (None or absent otherwise)
    target_std     float, regression only (None or absent otherwise)
    spec           the full JobSpec as a dict

"embedding" is an autoencoder's encoder saved on its own (see encoder_weights): an MLP whose outputs are the
latent codes.

Loading never unpickles anything (no torch.load): a safetensors file is a JSON header and raw bytes.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from pydantic import TypeAdapter
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from kiln.catalog import Task
from kiln.spec import AutoencoderSpec, ModelSpec
from models import build_model
from models.autoencoder import Autoencoder, encoder_spec

FORMAT = "kiln.weights/1"
EMBEDDING = "embedding"  # the task of an encoder saved alone: it maps rows to latent codes
REQUIRED_META = frozenset(
    {"format", "model", "in_features", "out_features", "task", "loss", "classes", "input_mean",
     "input_std", "spec"}
)
_model_spec = TypeAdapter(ModelSpec)


class WeightsError(ValueError):
    """The file is not a kiln weights file (or not one this version understands)."""


def save_weights(path: str | os.PathLike, model: nn.Module, meta: dict) -> str:
    """Write the model's weights and `meta` to `path` (see save_tensors); returns the file's sha256 hex digest."""
    missing = REQUIRED_META - meta.keys()
    if missing:
        raise ValueError(f"weights metadata lacks {', '.join(sorted(missing))}")
    if meta["format"] != FORMAT:
        raise ValueError(f"weights metadata format must be {FORMAT!r}, not {meta['format']!r}")
    header = {"kiln": json.dumps(meta)}  # before touching the disk: unserialisable meta fails here
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return save_tensors(path, tensors, header)


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write a safetensors file to a private scratch path; returns its sha256 hex digest. Neither atomic nor
    fsynced, on purpose: nothing reads a scratch file but the store's put_*, which makes it whole and durable
    where readers look (kiln.storage.atomic_path, or one S3 PUT). Doing both here too cost a tiny job four more
    fsyncs (BENCHMARKS.md, section 4). A failed write leaves nothing behind."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        save_file(tensors, path, metadata=metadata)
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def load_weights(source: str | os.PathLike | bytes) -> tuple[nn.Module, dict]:
    """Rebuild the model from the file alone (a path, or the file's bytes); returns it in eval mode, with its
    metadata."""
    name = "weights" if isinstance(source, bytes) else str(source)
    try:
        if isinstance(source, bytes):
            metadata, state = _safetensors_metadata(source), load_safetensors(source)
        else:
            with safe_open(name, framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not iterable)
    except SafetensorError as exc:
        raise WeightsError(f"{name}: not a safetensors file ({exc})") from exc
    raw = metadata.get("kiln")
    if raw is None:
        raise WeightsError(f"{name}: a safetensors file without kiln metadata")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{name}: format {meta.get('format')!r}, expected {FORMAT!r}")

    in_shape = tuple(meta.get("input_shape") or [meta["in_features"]])
    model = build_model(_model_spec.validate_python(meta["model"]), in_shape, meta["out_features"])
    model.load_state_dict(state, strict=True)
    return model.eval(), meta


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The header's __metadata__: the file starts with the header's length (8 bytes, little-endian), then JSON."""
    size = int.from_bytes(data[:8], "little")
    if len(data) < 8 or size > len(data) - 8:
        raise WeightsError("weights: not a safetensors file (its header runs past its end)")
    try:
        return json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    except (ValueError, AttributeError) as exc:
        raise WeightsError(f"weights: not a safetensors file ({exc})") from exc


def encoder_weights(model: Autoencoder, meta: dict) -> tuple[nn.Module, dict]:
    """An autoencoder's encoder and the metadata that makes it a weights file of its own (save it with
    save_weights): it loads as an MLP, and predict() on it returns the latent codes of raw rows."""
    spec = AutoencoderSpec.model_validate(meta["model"])
    encoder_meta = meta | {
        "model": encoder_spec(spec).model_dump(mode="json"),
        "out_features": spec.latent,
        "task": EMBEDDING,
        "loss": None,
        "classes": None,
        "target_mean": None,
        "target_std": None,
    }
    return model.encoder, encoder_meta


def predict(model: nn.Module, meta: dict, x_raw: np.ndarray) -> np.ndarray:
    """Predictions for raw (unstandardised) rows, flat (n, in_features) or shaped (n, *input_shape):
    class indices (int64) for classification and binary tasks; values (float32, in target units) for
    regression; reconstructed rows (float32, flat, in input units) for reconstruction; latent codes
    (float32, (n, latent)) for an embedding."""
    return predict_with_probabilities(model, meta, x_raw)[0]


def predict_with_probabilities(model: nn.Module, meta: dict, x_raw: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """predict(), and for classification and binary tasks each row's class probabilities (n, classes)."""
    x_raw = np.asarray(x_raw, dtype=np.float32)
    features = meta["in_features"]
    shapes = {(features,), tuple(meta.get("input_shape") or [features])}
    if x_raw.ndim < 2 or x_raw.shape[1:] not in shapes:
        expected = " or ".join(str(("n", *s)).replace("'", "") for s in sorted(shapes))
        raise ValueError(f"expected inputs of shape {expected}, got {x_raw.shape}")
    mean = np.asarray(meta["input_mean"], dtype=np.float32)
    std = np.asarray(meta["input_std"], dtype=np.float32)
    x = torch.from_numpy((x_raw.reshape(len(x_raw), features) - mean) / std).to(next(model.parameters()).device)

    was_training = model.training
    model.eval()  # dropout off; the caller's mode is restored below
    try:
        with torch.no_grad():
            logits = model(x).cpu()
    finally:
        model.train(was_training)
    out = logits.numpy()

    if meta["task"] == EMBEDDING:
        return out.astype(np.float32), None
    if meta["task"] == Task.reconstruction:
        return (out * std + mean).astype(np.float32), None
    if meta["task"] == Task.regression:
        y = out[:, 0]
        if meta.get("target_mean") is not None:
            y = y * meta["target_std"] + meta["target_mean"]
        return y.astype(np.float32), None
    if meta["loss"] == "bce":  # one logit: positive means class 1
        p1 = torch.sigmoid(logits[:, 0]).numpy()
        return (out[:, 0] > 0).astype(np.int64), np.stack([1 - p1, p1], axis=1)
    return out.argmax(axis=1).astype(np.int64), torch.softmax(logits, dim=1).numpy()
