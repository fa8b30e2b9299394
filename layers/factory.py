"""``device=`` and ``dtype=`` for every layer and backbone, the way torch modules take them (``nn.Linear(..., device=,
dtype=)``), implemented once instead of in every constructor.

A module is built under ``torch.device(device)``, so every tensor its constructor makes without an explicit device is
created there directly: ``device="meta"`` allocates no storage at all (shapes only, e.g. to count parameters or to
materialise later with ``to_empty``), and ``device="cuda"`` never makes a CPU copy first.

``dtype`` is applied after the constructor ran, by converting the floating-point parameters and buffers it created in
the default dtype (float32). That order is deliberate: random initialisation draws different numbers in float64 than
in float32, so ``build(dtype=torch.float64)`` equals ``build().double()`` for the same seed only if the draws happen in
float32 first. Two kinds of tensor keep their intended dtype:

* tensors a constructor makes in another dtype on purpose: RoPE's float64 ``inv_freq``, integer counters and tables;
* parameters an attention layer lists in ``float32_params`` (Mamba's ``A_log`` and ``D``, as mamba_ssm's "Keep in
  fp32"): they become ``promote_types(dtype, float32)``, i.e. float32 under bf16/fp16 and float64 under float64.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

FACTORY_ARGS = ("device", "dtype")

Init = TypeVar("Init", bound=Callable[..., None])


def check_dtype(dtype: Any, label: str) -> torch.dtype | None:
    """``dtype`` if it is None or a floating-point ``torch.dtype``; anything else raises naming the fix."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    raise TypeError(
        f"{label}: dtype must be a floating-point torch.dtype (torch.float32, torch.float64, torch.bfloat16, "
        f"torch.float16) or None; got {dtype!r}. Integer and complex parameters are not supported."
    )


def cast_floating_(module: nn.Module, dtype: torch.dtype, built_dtype: torch.dtype | None = None) -> nn.Module:
    """Convert, in place, the parameters and buffers of ``module`` that are in ``built_dtype`` (default: the default
    dtype) to ``dtype``; names in an attention layer's ``float32_params`` become at least float32.

    Parameters stay the same ``nn.Parameter`` objects (their attributes, e.g. ``_no_weight_decay``, survive), as with
    ``module.to(dtype)``.
    """
    built_dtype = built_dtype or torch.get_default_dtype()
    at_least_float32 = torch.promote_types(dtype, torch.float32)
    with torch.no_grad():
        for sub in module.modules():
            pinned = getattr(sub, "float32_params", ())
            for name, param in sub.named_parameters(recurse=False):
                if param.dtype == built_dtype:
                    param.data = param.data.to(at_least_float32 if name in pinned else dtype)
            for name, buf in sub.named_buffers(recurse=False):
                if buf.dtype == built_dtype:
                    sub._buffers[name] = buf.to(dtype)
    return module


def accepts_device_dtype(init: Init) -> Init:
    """Decorate an ``nn.Module.__init__`` so that it takes keyword-only ``device=`` and ``dtype=`` (see the module
    docstring for what they do); the decorated signature shows both, ``help()`` and ``inspect`` included."""
    if getattr(init, "_accepts_device_dtype", False):
        return init
    signature = inspect.signature(init)
    clash = [name for name in FACTORY_ARGS if name in signature.parameters]
    if clash:
        raise TypeError(f"{init.__qualname__} already takes {clash}; it needs no accepts_device_dtype.")

    @functools.wraps(init)
    def __init__(self: nn.Module, *args: Any, device: Any = None, dtype: torch.dtype | None = None, **kwargs: Any):
        if device is None and dtype is None:
            init(self, *args, **kwargs)
            return
        check_dtype(dtype, type(self).__name__)
        built_dtype = torch.get_default_dtype()
        with torch.device(device) if device is not None else contextlib.nullcontext():
            init(self, *args, **kwargs)
        if dtype is not None:
            cast_floating_(self, dtype, built_dtype)

    params = list(signature.parameters.values())
    factory = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in FACTORY_ARGS]
    # keyword-only parameters go before a **kwargs catch-all, if the constructor has one
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    __init__.__signature__ = signature.replace(parameters=[*params[:at], *factory, *params[at:]])
    __init__._accepts_device_dtype = True
    return __init__  # type: ignore[return-value]
