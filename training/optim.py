"""AdamW with the usual no-decay groups, and linear warmup + cosine decay.

Weight decay applies only to matrices of linear layers: parameters with ``ndim < 2`` (biases, norm gains), every
embedding (``nn.Embedding`` weights, including a tied LM head), norm layers' weights and any parameter flagged with
``p._no_weight_decay = True`` (mamba_ssm's convention, e.g. ``A_log`` and ``D``) are excluded, as in nanoGPT's
``configure_optimizers`` and timm's ``param_groups_weight_decay``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.RMSNorm)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: ``decay`` (linear/conv matrices) and ``no_decay`` (everything else)."""
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, *NORM_TYPES)) or "norm" in type(module).__name__.lower():
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        if p.ndim < 2 or id(p) in no_decay_ids or getattr(p, "_no_weight_decay", False):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW from ``cfg`` (``lr``, ``weight_decay``, ``betas``, ``eps``)."""
    cfg = dict(cfg)
    name = cfg.pop("name", "adamw")
    if name != "adamw":
        from attnzoo.errors import unknown

        raise ValueError(unknown("optimizer", name, ["adamw"]))
    weight_decay = cfg.pop("weight_decay", 0.1)
    if "betas" in cfg:
        cfg["betas"] = tuple(cfg["betas"])
    return torch.optim.AdamW(param_groups(model, weight_decay), **cfg)


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> float:
    """LR multiplier: linear from 1/warmup to 1 over ``warmup_steps``, then cosine down to ``min_lr_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
