"""Backend choice shared by every op: ``reference`` (the recurrent oracle), ``torch`` (chunked, the CPU path) and
``triton`` (CUDA, or the CPU interpreter with ``TRITON_INTERPRET=1``). ``auto`` picks triton for CUDA tensors when
triton is importable and torch otherwise; all three compute the same function (tested against each other)."""

from __future__ import annotations

import importlib.util
import os

import torch

from attnzoo.errors import unknown

BACKENDS = ("auto", "reference", "torch", "triton")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def choose_backend(op: str, backend: str, device: torch.device) -> str:
    """Resolve ``backend`` for tensors on ``device``; raise with the fix when the choice cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: " + unknown("backend", backend, BACKENDS))
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend='triton' needs the triton package (pip install triton); use 'torch'.")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"{op}: backend='triton' runs on CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 before "
                f"importing attnzoo (the interpreter, for testing), or use backend='torch'."
            )
    return backend
