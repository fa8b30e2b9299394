"""The attention contract and its registry.

Every token mixer in attnzoo subclasses :class:`Attention`, declares the attention ``patterns`` it supports (the four of
the CAB benchmark) and registers itself under a name with :func:`register_attention`. Backbones, configs and tests only
ever go through :func:`build_attention`, so a newly registered layer is usable and tested everywhere at once.

The contract, in full:

* ``forward(x, *, context=None, padding_mask=None, cache=None)``: ``x`` (B, T, dim) -> (B, T, dim). ``context``
  (B, S, dim) for cross patterns. ``padding_mask`` is a bool mask over the keys/values, True = real token: (B, S) for
  cross, (B, T) for self. Padded keys have no influence on any output. With a ``cache`` the mask covers only the new
  positions (T for self, S for cross); the cache remembers the earlier ones.
* ``causal_cross`` aligns the two streams bottom-right (FlashAttention's convention for causal with seqlen_q !=
  seqlen_k): query i (0-based, of T) sees context positions j <= i + S - T. The last query sees the whole context;
  with S == T it is the plain causal mask of two aligned streams, with S < T the first T - S queries see nothing and
  output zeros. With a cache each call passes the next T query and the next S >= 1 context positions, aligned on the
  totals seen so far; a call may not hide cached context from its first query (T <= S + 1 once the cache holds
  context). Prefill-then-step equals one full forward when every call adds as many query as context positions.
  The shared helpers are in :mod:`attnzoo.layers.cross`.
* ``new_cache(batch_size)`` returns the per-layer decoding state; given it, ``forward`` treats ``x`` as the next T >= 1
  positions and updates the cache in place. Prefill-then-step equals one full forward.
* ``state_size(seq_len)`` is the number of values kept per sequence for decoding (Zoology's recall-vs-state axis);
  for ``causal_cross``, ``seq_len`` counts the context positions consumed (what a KV cache holds).
* ``aux_loss`` is None or a scalar training loss set by the last forward (MoH's load balance); models sum them.
* Every layer takes keyword-only ``device=`` and ``dtype=`` like a torch module, without declaring them: the base
  class adds them to each subclass's constructor (:mod:`attnzoo.layers.factory`). Parameters a layer keeps in float32
  at least under half precision are listed in its ``float32_params``.
* Optional, for layers whose construction or state depends on their place in a stack: ``layer_index`` and
  ``num_layers`` options, which a backbone fills in when the spec leaves them unset (GPT through
  :func:`attnzoo.models.specs.with_position`, the ViT passes ``layer_index``; swin alternates its shift with it,
  RWKV-7 scales its initialisation), and a
  ``link_layers(layers)`` classmethod that the GPT backbone calls once with the class's instances in stack order
  (:func:`attnzoo.models.specs.link_layers`; RWKV-7's value residual reads the first layer's values).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from attnzoo.errors import unknown
from attnzoo.layers.factory import FACTORY_ARGS, accepts_device_dtype

PATTERNS: tuple[str, ...] = ("noncausal_self", "causal_self", "noncausal_cross", "causal_cross")
ALL_PATTERNS: frozenset[str] = frozenset(PATTERNS)

# constructor arguments that the backbone sets; everything else a layer takes is an "option"
CONTRACT_ARGS = ("dim", "num_heads", "causal", "cross")


def pattern_of(causal: bool, cross: bool) -> str:
    """The CAB pattern name for a (causal, cross) pair, e.g. ``pattern_of(True, False) == "causal_self"``."""
    return f"{'causal' if causal else 'noncausal'}_{'cross' if cross else 'self'}"


def pattern_flags(pattern: str) -> dict[str, bool]:
    """Inverse of :func:`pattern_of`: ``{"causal": ..., "cross": ...}``."""
    if pattern not in ALL_PATTERNS:
        raise ValueError(unknown("attention pattern", pattern, PATTERNS))
    return {"causal": pattern.startswith("causal"), "cross": pattern.endswith("cross")}


class Attention(nn.Module):
    """Base class of every registered token mixer (see the module docstring for the contract)."""

    name: ClassVar[str] = ""
    patterns: ClassVar[frozenset[str]] = frozenset()
    # appended to the "has no pattern" error, e.g. why agent attention cannot be causal
    pattern_note: ClassVar[str] = ""
    # parameter names (of this module, not its children) that dtype= makes promote_types(dtype, float32), not dtype
    float32_params: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # every layer gets device= / dtype= without writing them: its own __init__ is wrapped once, here
        if "__init__" in cls.__dict__:
            cls.__init__ = accepts_device_dtype(cls.__dict__["__init__"])

    @accepts_device_dtype
    def __init__(self, dim: int, num_heads: int, *, causal: bool = False, cross: bool = False) -> None:
        super().__init__()
        label = self.name or type(self).__name__
        pattern = pattern_of(causal, cross)
        if pattern not in self.patterns:
            note = f" {self.pattern_note}" if self.pattern_note else ""
            raise ValueError(
                f"{label} (causal={causal}, cross={cross}) has no pattern {pattern!r}; "
                f"it has: {', '.join(sorted(self.patterns))}.{note}"
            )
        if not isinstance(dim, int) or not isinstance(num_heads, int) or dim <= 0 or num_heads <= 0:
            raise ValueError(
                f"{label}: dim and num_heads must be positive integers; got dim={dim!r}, num_heads={num_heads!r}."
            )
        if dim % num_heads != 0:
            raise ValueError(
                f"{label}: dim={dim} is not divisible by num_heads={num_heads}; "
                f"choose num_heads among the divisors of dim (e.g. {_divisors(dim)})."
            )
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.causal = causal
        self.cross = cross
        self.aux_loss: Tensor | None = None

    @property
    def pattern(self) -> str:
        return pattern_of(self.causal, self.cross)

    def check_inputs(
        self,
        x: Tensor,
        context: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: Any = None,
    ) -> None:
        """Validate the forward arguments once, with messages that name the layer, the argument and the fix."""
        label = self.name or type(self).__name__
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"{label}: x must have shape (B, T, dim={self.dim}); got {tuple(x.shape)}.")
        if x.shape[1] == 0:
            raise ValueError(f"{label}: x has no positions (T=0); pass at least one token.")
        if self.cross:
            if context is None:
                raise ValueError(f"{label} was built with cross=True; pass context= of shape (B, S, {self.dim}).")
            if context.dim() != 3 or context.shape[0] != x.shape[0] or context.shape[-1] != self.dim:
                raise ValueError(
                    f"{label}: context must have shape (B={x.shape[0]}, S, dim={self.dim}); got {tuple(context.shape)}."
                )
            if context.shape[1] == 0:
                raise ValueError(f"{label}: context has no positions (S=0); pass at least one context token.")
        elif context is not None:
            raise ValueError(
                f"{label} is a self-attention layer (cross=False); build it with cross=True to pass context=."
            )
        if padding_mask is not None:
            kv_len = context.shape[1] if self.cross else x.shape[1]
            expected = (x.shape[0], kv_len)
            if padding_mask.dtype != torch.bool or tuple(padding_mask.shape) != expected:
                raise ValueError(
                    f"{label}: padding_mask must be a bool tensor of shape (B, S_kv) = {expected} (True = real token); "
                    f"got {padding_mask.dtype} {tuple(padding_mask.shape)}."
                )
        if cache is not None and not self.causal:
            raise ValueError(
                f"{label} is not causal (pattern {self.pattern}); a cache is for incremental decoding of causal layers."
            )
        cache_batch = getattr(cache, "batch_size", None)
        if cache_batch is not None and cache_batch != x.shape[0]:
            raise ValueError(
                f"{label}: the cache was made for batch_size={cache_batch}, but x has B={x.shape[0]}; "
                f"call new_cache({x.shape[0]})."
            )

    def new_cache(self, batch_size: int) -> Any:
        """A fresh decoding state for ``batch_size`` sequences (causal layers only)."""
        label = self.name or type(self).__name__
        if not self.causal:
            raise ValueError(
                f"{label} is not causal (pattern {self.pattern}); only causal layers decode incrementally."
            )
        raise NotImplementedError(f"{label} does not implement new_cache().")

    def state_size(self, seq_len: int) -> int:
        """Numbers kept per sequence (all layers and heads of this module) to decode after ``seq_len`` tokens."""
        raise NotImplementedError(f"{self.name or type(self).__name__} does not implement state_size().")

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, pattern={self.pattern}"


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0 and d <= 64)


# ----------------------------------------------------------------------------------------------------------------
# registry

_ATTENTION: dict[str, type[Attention]] = {}


def register_attention(name: str):
    """Class decorator: register an :class:`Attention` subclass under ``name``."""

    def decorate(cls: type[Attention]) -> type[Attention]:
        if not (isinstance(cls, type) and issubclass(cls, Attention)):
            raise TypeError(f"register_attention({name!r}) expects an Attention subclass; got {cls!r}.")
        bad = set(cls.patterns) - ALL_PATTERNS
        if bad or not cls.patterns:
            raise ValueError(
                f"{cls.__name__}.patterns must be a non-empty subset of {PATTERNS}; got {sorted(cls.patterns)}."
            )
        if name in _ATTENTION and _ATTENTION[name] is not cls:
            warnings.warn(
                f"attention {name!r} re-registered: {_ATTENTION[name].__name__} -> {cls.__name__}",
                stacklevel=2,
            )
        cls.name = name
        _ATTENTION[name] = cls
        return cls

    return decorate


def attention_class(name: str) -> type[Attention]:
    """The registered class for ``name``; an unknown name raises with the closest match and the full list."""
    try:
        return _ATTENTION[name]
    except (KeyError, TypeError):
        raise ValueError(unknown("attention", name, _ATTENTION)) from None


def list_attention(pattern: str | None = None) -> list[str]:
    """Registered attention names, sorted; only those supporting ``pattern`` if given.

    ``python -m attnzoo.layers`` prints them with their patterns and a one-line summary.
    """
    if pattern is not None:
        pattern_flags(pattern)  # validates the spelling
    return sorted(n for n, cls in _ATTENTION.items() if pattern is None or pattern in cls.patterns)


@dataclass(frozen=True)
class AttentionInfo:
    name: str
    cls: type[Attention]
    patterns: frozenset[str]
    summary: str
    options: dict[str, Any]  # option -> default


def attention_options(cls: type[Attention]) -> dict[str, Any]:
    """The layer's own options (constructor keywords beyond the contract and ``device``/``dtype``) with defaults."""
    params = inspect.signature(cls.__init__).parameters
    return {
        p.name: p.default
        for p in params.values()
        if p.name != "self"
        and p.name not in CONTRACT_ARGS
        and p.name not in FACTORY_ARGS
        and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def attention_info(name: str) -> AttentionInfo:
    """Patterns, one-line summary and options (with defaults) of a registered attention."""
    cls = attention_class(name)
    doc = inspect.getdoc(cls) or ""
    summary = doc.strip().splitlines()[0] if doc.strip() else ""
    return AttentionInfo(name, cls, cls.patterns, summary, attention_options(cls))


def split_spec(spec: Any) -> tuple[str, dict[str, Any]]:
    """Normalise an attention spec to ``(name, options)``.

    A spec is a registered name (``"gla"``) or a mapping with a ``name`` key and options (``{"name": "performer",
    "nb_features": 128}``, also an OmegaConf DictConfig).
    """
    if isinstance(spec, str):
        return spec, {}
    if hasattr(spec, "items"):
        options = {str(k): v for k, v in spec.items()}
        if "name" not in options:
            raise ValueError(
                f"an attention spec given as a mapping needs a 'name' key (one of {list_attention()}); got {options}."
            )
        name = options.pop("name")
        if hasattr(name, "__fspath__") or not isinstance(name, str):
            raise ValueError(f"attention spec 'name' must be a string; got {name!r}.")
        return name, _plain(options)
    raise TypeError(f"an attention spec is a name or a mapping with a 'name' key; got {type(spec).__name__}: {spec!r}.")


def _plain(options: dict[str, Any]) -> dict[str, Any]:
    """Turn OmegaConf containers inside options into plain Python objects."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # the layers need only torch; without OmegaConf there is nothing to convert
        return options
    return {k: OmegaConf.to_container(v) if isinstance(v, (DictConfig, ListConfig)) else v for k, v in options.items()}


def build_attention(
    spec: Any,
    *,
    dim: int,
    num_heads: int,
    causal: bool = False,
    cross: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **options: Any,
) -> Attention:
    """Build a registered attention layer.

    Args:
        spec: a registered name, or a mapping ``{"name": ..., **options}``.
        dim: model width; input and output are (B, T, dim).
        num_heads: number of heads; ``dim`` must be divisible by it.
        causal: query i sees keys j <= i only.
        cross: keys and values come from ``context`` instead of ``x``.
        device: where the parameters are created (``"meta"``: shapes only, no storage), as for torch modules.
        dtype: floating-point dtype of the parameters; the layer is initialised in float32 and converted, so the
            result equals building it with the same seed and converting its float32 tensors (``float32_params`` stay
            float32 at least; RoPE's float64 tables and integer buffers keep their dtype).
        **options: the layer's own options (``attention_info(name).options``); they override the spec's.

    Raises:
        ValueError: unknown name, or a pattern the layer does not have.
        TypeError: an option the layer does not take (the message names the closest valid one).
    """
    name, spec_options = split_spec(spec)
    cls = attention_class(name)
    merged = {**spec_options, **options}
    valid = attention_options(cls)
    for key in merged:
        if key not in valid:
            raise TypeError(f"{name}: " + unknown("option", key, valid))
    return cls(dim, num_heads, causal=causal, cross=cross, device=device, dtype=dtype, **merged)
