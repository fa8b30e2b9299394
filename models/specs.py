"""Per-layer attention specs: how a backbone turns its ``attention=`` argument into one spec per block."""

from __future__ import annotations

from typing import Any


def per_layer(attention: Any, depth: int) -> list[Any]:
    """One attention spec per block.

    ``attention`` is a registered name, a mapping ``{"name": ..., **options}``, or a list/tuple (or OmegaConf
    ListConfig) of those with exactly ``depth`` entries, e.g. ``["gla", "gla", "gla", "softmax"]``.
    """
    if isinstance(attention, str) or hasattr(attention, "items"):
        return [attention] * depth
    if isinstance(attention, (list, tuple)) or type(attention).__name__ == "ListConfig":
        specs = list(attention)
        if len(specs) != depth:
            raise ValueError(
                f"per-layer attention has {len(specs)} entries but the model has depth={depth}; "
                f"give one entry per layer or a single spec for all layers."
            )
        return specs
    raise TypeError(
        f"attention must be a name, a mapping with a 'name' key, or a list of those; got {type(attention).__name__}."
    )
