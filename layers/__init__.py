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

# importing a layer module registers it
from attnzoo.layers import softmax  # noqa: E402, I001  isort: skip
from attnzoo.layers import agent  # noqa: E402, I001  isort: skip
from attnzoo.layers import gated_softmax  # noqa: E402, I001  isort: skip
from attnzoo.layers import moh  # noqa: E402, I001  isort: skip
from attnzoo.layers import linear  # noqa: E402, I001  isort: skip
from attnzoo.layers import based  # noqa: E402, I001  isort: skip
from attnzoo.layers import sliding_window  # noqa: E402, I001  isort: skip
from attnzoo.layers import performer  # noqa: E402, I001  isort: skip
from attnzoo.layers import cosformer  # noqa: E402, I001  isort: skip
from attnzoo.layers import gla  # noqa: E402, I001  isort: skip
from attnzoo.layers import mamba  # noqa: E402, I001  isort: skip
from attnzoo.layers import retnet  # noqa: E402, I001  isort: skip
from attnzoo.layers import mamba2  # noqa: E402, I001  isort: skip

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
