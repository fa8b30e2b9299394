"""Safe weight files: export to and load from safetensors, and read checkpoints without executing code.

``torch.load`` on a pickle can run arbitrary code; attnzoo reads every checkpoint with ``weights_only=True`` and
exports plain weights as safetensors (tensors only, no code). Tied weights (GPT's head and embedding) are stored once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn


def save_weights(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model``'s parameters and persistent buffers to a ``.safetensors`` file, atomically."""
    from safetensors.torch import save_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_model(model, str(tmp))
    os.replace(tmp, path)  # a reader never sees a half-written file
    return path


def load_weights(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Load a ``.safetensors`` file (from :func:`save_weights`) into ``model``; mismatched names raise."""
    from safetensors.torch import load_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}; save one with attnzoo.models.save_weights(model, path).")
    missing, unexpected = load_model(model, str(path), strict=False)
    if strict and (missing or unexpected):
        raise ValueError(
            f"{path} does not match {type(model).__name__}: missing {sorted(missing)[:8]}, "
            f"unexpected {sorted(unexpected)[:8]}; build the model with the config it was saved from."
        )
    return model


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (no code execution), with clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; check the path (runs write checkpoints/last.ckpt).")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated, corrupted, or a pickle that needs code to load
        raise ValueError(
            f"cannot read checkpoint {path}: {type(err).__name__}: {str(err).splitlines()[0][:200]}. "
            f"The file is corrupted, truncated, or not a weights-only checkpoint."
        ) from err
