"""The registry's error messages: unknown name (did you mean + list), unknown option, dim % heads, patterns."""

from __future__ import annotations

import pytest

from attnzoo.layers import (
    PATTERNS,
    attention_class,
    attention_info,
    build_attention,
    list_attention,
    pattern_flags,
)


def test_unknown_name_suggests_and_lists():
    with pytest.raises(ValueError) as info:
        build_attention("sofmax", dim=32, num_heads=4)
    message = str(info.value)
    assert "unknown attention 'sofmax'" in message and "Did you mean 'softmax'?" in message
    assert all(name in message for name in list_attention())


def test_unknown_name_without_close_match_still_lists():
    with pytest.raises(ValueError, match=r"unknown attention 'zzzz'\. Valid: ") as info:
        build_attention("zzzz", dim=32, num_heads=4)
    assert "Did you mean" not in str(info.value)


def test_unknown_option_names_the_close_match_and_the_valid_ones():
    with pytest.raises(TypeError) as info:
        build_attention("softmax", dim=32, num_heads=4, rop=True)
    message = str(info.value)
    assert message.startswith("softmax: unknown option 'rop'") and "Did you mean 'rope'?" in message
    assert all(opt in message for opt in attention_info("softmax").options)


def test_dim_not_divisible_by_heads():
    with pytest.raises(ValueError, match=r"dim=30 is not divisible by num_heads=4.*divisors of dim"):
        build_attention("softmax", dim=30, num_heads=4)


UNSUPPORTED = [(n, p) for n in list_attention() for p in PATTERNS if p not in attention_class(n).patterns]


@pytest.mark.parametrize("name,pattern", UNSUPPORTED, ids=[f"{n}-{p}" for n, p in UNSUPPORTED])
def test_unsupported_pattern_names_layer_pattern_and_alternatives(name, pattern):
    cls = attention_class(name)
    with pytest.raises(ValueError) as info:
        build_attention(name, dim=32, num_heads=4, **pattern_flags(pattern))
    message = str(info.value)
    assert f"{name} " in message and f"has no pattern {pattern!r}" in message
    assert all(p in message for p in cls.patterns)


def test_spec_mapping_and_list_filter():
    layer = build_attention({"name": "softmax", "rope": True}, dim=32, num_heads=4, causal=True)
    assert layer.rope is not None and layer.causal
    with pytest.raises(ValueError, match="needs a 'name' key"):
        build_attention({"rope": True}, dim=32, num_heads=4)
    assert "softmax" in list_attention("causal_cross")
    with pytest.raises(ValueError, match="unknown attention pattern 'causal'"):
        list_attention("causal")
