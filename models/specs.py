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


def with_position(spec: Any, index: int, depth: int) -> Any:
    """``spec`` with ``layer_index=index`` and ``num_layers=depth`` added when its layer takes those options (RWKV-7's
    depth-dependent initialisation and value residual) and the spec leaves them unset (absent or None)."""
    from attnzoo.layers.registry import attention_class, attention_options, split_spec

    name, options = split_spec(spec)
    accepted = attention_options(attention_class(name))
    position = {"layer_index": index, "num_layers": depth}
    missing = {key: value for key, value in position.items() if key in accepted and options.get(key) is None}
    return {"name": name, **options, **missing} if missing else spec


def link_layers(layers: list[Any]) -> None:
    """Let attention classes that share state across the layers of a stack wire it: for every class with a
    ``link_layers`` classmethod, call it once with its instances in stack order (RWKV-7's first-layer values)."""
    for cls in dict.fromkeys(type(layer) for layer in layers):
        if hasattr(cls, "link_layers"):
            cls.link_layers([layer for layer in layers if type(layer) is cls])
