"""A zoo attention inside a Hugging Face transformers decoder: ``replace_attention(model, "gla", **options)``.

:class:`HFAttention` takes the call of an HF decoder layer's ``self_attn`` (``hidden_states``, ``attention_mask``,
``position_ids``, ``position_embeddings``, ``cache`` / ``past_key_values``, ``use_cache``, ``**kwargs``) and returns
``(output, None)`` as ``LlamaAttention`` does. The zoo layer brings its own positions (RoPE option, recurrence), so
HF's ``position_embeddings`` are not used.

* Mask: HF hands the layer a 4-D mask (B, 1, T, S) (bool True = attend, or additive float with large negative values)
  or None. The zoo contract takes a key padding mask for the T new positions; it is read from the last query row.
* Cache: the zoo layer's decoding state lives in the HF ``Cache`` object that ``generate`` passes, one entry per
  ``layer_idx`` (a dict attribute on the cache). The layer also appends a (B, 1, T, 1) zero key/value to the HF cache
  so ``cache.get_seq_length()``, from which HF derives the positions and masks, counts the tokens seen.
* Training: a forward in training mode with gradients ignores the cache (HF creates one whenever
  ``config.use_cache``); the layer runs its parallel (chunked) form over the whole sequence.

Needs ``pip install 'attnzoo[hf]'`` (transformers).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnzoo.layers import build_attention

_STATES = "_attnzoo_states"


class HFAttention(nn.Module):
    """An HF decoder layer's ``self_attn`` backed by a causal zoo attention layer (``self.layer``)."""

    def __init__(self, spec: Any, *, hidden_size: int, num_heads: int, layer_idx: int, **options: Any) -> None:
        super().__init__()
        self.layer = build_attention(spec, dim=hidden_size, num_heads=num_heads, causal=True, **options)
        self.layer_idx = layer_idx

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Any = None,
        use_cache: bool | None = False,
        position_embeddings: Any = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        cache = cache if cache is not None else past_key_values
        B, T, _ = hidden_states.shape
        padding_mask = _key_padding_mask(attention_mask, T)
        zoo_cache = None
        # HF builds a cache in every forward with config.use_cache, also a training one; a training forward is one
        # whole sequence, so the zoo layer runs its parallel form there (decoding states are not trained through)
        if cache is not None and not (self.training and torch.is_grad_enabled()):
            states = getattr(cache, _STATES, None)
            if states is None:
                states = {}
                setattr(cache, _STATES, states)
            if self.layer_idx not in states:
                states[self.layer_idx] = self.layer.new_cache(B)
            zoo_cache = states[self.layer_idx]
            marker = hidden_states.new_zeros(B, 1, T, 1)
            cache.update(marker, marker, self.layer_idx)
        out = self.layer(hidden_states, padding_mask=padding_mask, cache=zoo_cache)
        return out, None


def _key_padding_mask(attention_mask: Tensor | None, T: int) -> Tensor | None:
    """(B, T) bool key mask of the T new positions from HF's 4-D or 2-D mask; None when nothing is padded."""
    if attention_mask is None:
        return None
    mask = attention_mask
    if mask.dim() == 4:
        mask = mask[:, 0, -1, -T:]  # the last query attends to every real key up to it
    elif mask.dim() == 2:
        mask = mask[:, -T:]
    else:
        raise ValueError(
            f"attnzoo.hf: attention_mask must be HF's (B, 1, T, S) or (B, S) mask; got shape {tuple(mask.shape)}."
        )
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2 if mask.is_floating_point() else mask.bool()
    return None if bool(mask.all()) else mask


def replace_attention(model: nn.Module, spec: Any, **options: Any) -> nn.Module:
    """Replace the ``self_attn`` of every decoder layer of an HF causal LM by the zoo attention ``spec`` (in place).

    Args:
        model: e.g. a ``LlamaForCausalLM``; every module with a ``self_attn`` child and a ``layer_idx`` on it is
            converted, with ``config.hidden_size`` and ``config.num_attention_heads``.
        spec: a registered attention name or ``{"name": ..., **options}``; it must have ``causal_self``.
        **options: the layer's options.

    Returns:
        ``model``, with new (randomly initialised) attention layers in its dtype and on its device.
    """
    config = model.config
    param = next(model.parameters())
    count = 0
    for module in model.modules():
        attn = getattr(module, "self_attn", None)
        if attn is None or isinstance(attn, HFAttention):
            continue
        module.self_attn = HFAttention(
            spec,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            layer_idx=attn.layer_idx,
            device=param.device,
            dtype=param.dtype,
            **options,
        )
        count += 1
    if count == 0:
        raise ValueError(f"replace_attention: {type(model).__name__} has no module with a self_attn to replace.")
    return model
