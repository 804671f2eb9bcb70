"""Encoder export in timm's key layout, and whole-model checkpoints with their config."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:  # the model (and timm) load when a checkpoint is read into one
    from spark_core.model import SparK

CHECKPOINT_FORMAT = "spark_core/1"
# The whole training state's file name in a checkpoint folder (the engines' and Ray Train's).
CHECKPOINT_FILE = "last.pt"


class CheckpointMismatchError(ValueError):
    """A checkpoint's model config differs from the model it is loaded into."""


def atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, then rename: no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def encoder_state_dict(model: SparK) -> dict[str, torch.Tensor]:
    """The encoder's weights in timm's own key layout (classifier excluded).

    Layers pruned for pre-training (e.g. ConvNeXt's head norm) are included at timm's
    initial values, so ``timm.create_model(backbone, num_classes=K)`` loads the result
    with only the classifier keys missing.
    """
    state = {k: v.detach().cpu().contiguous() for k, v in model.encoder.model.state_dict().items()}
    for key, value in model.encoder.pruned_state.items():
        state.setdefault(key, value.cpu().contiguous())
    return state


def export_encoder(model: SparK, path: str | Path) -> Path:
    """Write the encoder as a timm-loadable safetensors file (metadata: backbone, config).

    Load it with::

        net = timm.create_model(backbone, num_classes=K)
        net.load_state_dict(safetensors.torch.load_file(path), strict=False)
    """
    path = Path(path)
    metadata = {
        "format": "timm",
        "backbone": model.config.backbone,
        "spark_config": json.dumps(model.config.to_dict()),
    }
    return save_weights(encoder_state_dict(model), path, metadata)


def save_weights(
    state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write a state dict as a safetensors file, atomically (contiguous CPU copies)."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def save_checkpoint(
    model: SparK,
    path: str | Path,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save the whole model (encoder, densify, decoder) with its config, atomically.

    ``extra`` holds training state (epoch, step, scheduler, RNG states, grad scaler).
    """
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": model.config.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "extra": extra or {},
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return path


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (no model needed).

    Only tensors and plain containers are unpickled (``weights_only``): a checkpoint taken
    from shared storage cannot run code on load.
    """
    try:
        payload = torch.load(Path(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path}: refused, it holds Python objects other than tensors, numbers, strings "
            "and containers, which spark_core checkpoints never do (not written by "
            f"save_checkpoint, or altered): {str(error).splitlines()[0]}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path}: not a spark_core checkpoint (expected format {CHECKPOINT_FORMAT!r}); "
            "timm-style encoder files load with timm.create_model + load_state_dict instead"
        )
    return payload


def load_checkpoint(
    model: SparK,
    path: str | Path,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Load a checkpoint into ``model`` (and ``optimizer``); return its ``extra`` dict.

    Raises:
        CheckpointMismatchError: the checkpoint was saved from a model with another config;
            the message lists each differing field.
    """
    from spark_core.model import SparKConfig

    payload = read_checkpoint(path, map_location)
    saved = SparKConfig.from_dict(payload["config"])
    if saved != model.config:
        diffs = [
            f"{k}: checkpoint={v!r}, model={getattr(model.config, k)!r}"
            for k, v in vars(saved).items()
            if getattr(model.config, k) != v
        ]
        raise CheckpointMismatchError(
            f"{path} was saved from a different SparK config ({'; '.join(diffs)}). Build the "
            "model with the checkpoint's config: build_spark_from_checkpoint(path)."
        )
    model.load_state_dict(payload["model"])
    if optimizer is not None and payload.get("optimizer") is not None:
        optimizer.load_state_dict(payload["optimizer"])
    return payload.get("extra", {})


def build_spark_from_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[SparK, dict[str, Any]]:
    """Rebuild the model a checkpoint was saved from, with its weights; returns (model, extra)."""
    from spark_core.model import SparK, SparKConfig

    payload = read_checkpoint(path, map_location)
    model = SparK(SparKConfig.from_dict(payload["config"]))
    model.load_state_dict(payload["model"])
    return model, payload.get("extra", {})


def load_encoder_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an exported encoder (safetensors) as a state dict."""
    return load_file(Path(path))
