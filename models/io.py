"""attnzoo's one reader and writer of weight and checkpoint files: atomic writes, reads that never execute code.

* :func:`atomic_write` is the one way a file is written: into a temporary file next to the target, fsynced, then
  ``os.replace``d over it, so a crash or ``kill -9`` mid-write leaves the previous file intact, never a partial one.
  :func:`save_weights` (safetensors) and :func:`atomic_torch_save` (Lightning checkpoints, through
  ``attnzoo.training.faults.AtomicCheckpointIO``) both use it.
* :func:`load_checkpoint` is the one way a checkpoint is read: ``torch.load(weights_only=True)`` (a pickle could run
  arbitrary code), and a file that is missing, truncated, not weights-only or not a training checkpoint raises
  :class:`CheckpointError` naming the file, the problem and the fix.
* :func:`save_weights` / :func:`load_weights` export and load plain weights as safetensors (tensors only, no code);
  tied weights (GPT's head and embedding) are stored once.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: the message names the file, what is wrong and what to do."""


def _fsync_dir(directory: Path) -> None:
    # the rename itself is only durable once the directory entry is on disk (POSIX); not possible on Windows
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write ``path`` with ``write(temporary_path)`` so that no reader ever sees a partial file.

    Args:
        path: the target file; its directory is created if missing.
        write: writes the complete file at the path it is given (e.g. ``lambda p: torch.save(obj, p)``).

    The temporary file lives in the target's directory so ``os.replace`` is a rename within one file system (atomic
    on POSIX and Windows); it is fsynced first so the rename never exposes unwritten data after a power loss. On any
    failure it is removed and the previous ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` through :func:`atomic_write` (never a partial ``path``)."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            torch.save(obj, f)

    return atomic_write(path, write)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a Lightning training checkpoint with ``weights_only=True``; bad files raise :class:`CheckpointError`.

    Args:
        path: the ``.ckpt`` file (``checkpoints/last.ckpt`` or ``best-*.ckpt`` of a run).
        map_location: passed to ``torch.load`` (default: CPU).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; runs write checkpoints/last.ckpt and best-*.ckpt.")
    size = path.stat().st_size
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, random bytes, or a pickle that needs arbitrary code to load
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            what = (
                "it is not a weights-only checkpoint: it contains Python objects that are not plain "
                "tensors/containers, so loading it would run code"
            )
            fix = "re-save it from trusted code as a state dict, or load only trusted files with torch.load yourself"
        else:
            what = f"the file ({size} bytes) is truncated or corrupted"
            fix = (
                "resume from another checkpoint (checkpoints/best-*.ckpt, or an older copy); attnzoo writes "
                "checkpoints atomically, so a partial file comes from a copy or a disk that failed"
            )
        raise CheckpointError(
            f"cannot read checkpoint {path}: {what} ({type(err).__name__}: {first}). Fix: {fix}."
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        got = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(
            f"{path} is not a Lightning training checkpoint (no 'state_dict'; got {got}). A weights file "
            f"(model.safetensors) loads with attnzoo.models.load_weights, not with ckpt_path=."
        )
    return checkpoint


def save_weights(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model``'s parameters and persistent buffers to a ``.safetensors`` file, atomically."""
    from safetensors.torch import save_model

    # save_model drops the duplicate names of tied tensors (stored once, restored by load_model)
    return atomic_write(path, lambda tmp: save_model(model, str(tmp)))


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
