"""attnzoo.layers: the attention registry, the contract, one file per attention, and the transformer blocks.

Example::

    from attnzoo.layers import build_attention, list_attention
    layer = build_attention("softmax", dim=256, num_heads=4, causal=True, rope=True)
"""

from attnzoo.layers.block import Block
from attnzoo.layers.kv_cache import KVCache
from attnzoo.layers.mlp import create_mlp
from attnzoo.layers.norm import create_norm
from attnzoo.layers.registry import (
    ALL_PATTERNS,
    PATTERNS,
    Attention,
    AttentionInfo,
    attention_class,
    attention_info,
    build_attention,
    list_attention,
    pattern_flags,
    pattern_of,
    register_attention,
    split_spec,
)
from attnzoo.layers.rope import RotaryEmbedding
from attnzoo.layers.sdpa import sdpa

# importing a layer module registers it (one module per attention, in alphabetical order)
from attnzoo.layers import (  # noqa: F401  isort: skip
    agent,
    based,
    biformer,
    cosformer,
    cottention,
    deltanet,
    differential,
    flowformer,
    gated_deltanet,
    gated_softmax,
    gla,
    hedgehog,
    hgrn2,
    landmark,
    lightning,
    linear,
    mamba,
    mamba2,
    mla,
    moh,
    nalaformer,
    neighborhood,
    performer,
    retnet,
    rwkv7,
    slab,
    sliding_window,
    softmax,
    sparse_transformer,
    swin,
)

__all__ = [
    "ALL_PATTERNS",
    "PATTERNS",
    "Attention",
    "AttentionInfo",
    "Block",
    "KVCache",
    "RotaryEmbedding",
    "attention_class",
    "attention_info",
    "build_attention",
    "create_mlp",
    "create_norm",
    "list_attention",
    "pattern_flags",
    "pattern_of",
    "register_attention",
    "sdpa",
    "split_spec",
]
