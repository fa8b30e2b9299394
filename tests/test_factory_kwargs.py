"""device= / dtype= on every registered layer and backbone, as torch modules take them (nn.Linear(..., dtype=))."""

from __future__ import annotations

import inspect

import pytest
import torch

from attnzoo.layers import attention_info, build_attention, list_attention, pattern_flags
from attnzoo.models import GPT, Encoder, ViT

DIM, HEADS = 32, 4


def _pattern(name: str) -> str:
    patterns = attention_info(name).cls.patterns
    return "causal_self" if "causal_self" in patterns else sorted(patterns)[0]


def _tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(module.named_parameters()) + list(module.named_buffers())


@pytest.mark.parametrize("name", list_attention())
def test_meta_device_allocates_no_storage(name):
    layer = build_attention(name, dim=DIM, num_heads=HEADS, device="meta", **pattern_flags(_pattern(name)))
    on_cpu = [n for n, t in _tensors(layer) if not t.is_meta]
    assert on_cpu == []
    assert sum(t.numel() for t in layer.parameters()) > 0


@pytest.mark.parametrize("name", list_attention())
def test_float64_equals_double_of_float32_build(name):
    flags = pattern_flags(_pattern(name))
    torch.manual_seed(0)
    doubled = build_attention(name, dim=DIM, num_heads=HEADS, **flags).double()
    torch.manual_seed(0)
    built = build_attention(name, dim=DIM, num_heads=HEADS, dtype=torch.float64, **flags)
    assert {p.dtype for p in built.parameters()} == {torch.float64}
    expected, got = doubled.state_dict(), built.state_dict()
    assert list(expected) == list(got)
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        assert torch.equal(got[key], expected[key]), key
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    context = torch.randn(2, 5, DIM, dtype=torch.float64) if flags["cross"] else None
    torch.manual_seed(1)
    want = doubled(x, context=context)
    torch.manual_seed(1)
    assert torch.equal(built(x, context=context), want)


@pytest.mark.parametrize("name", list_attention())
def test_bfloat16_keeps_intended_dtypes(name):
    flags = pattern_flags(_pattern(name))
    layer = build_attention(name, dim=DIM, num_heads=HEADS, dtype=torch.bfloat16, **flags)
    pinned = getattr(layer, "float32_params", frozenset())
    for param_name, p in layer.named_parameters():
        expected = torch.float32 if param_name.rsplit(".", 1)[-1] in pinned else torch.bfloat16
        assert p.dtype == expected, param_name
    for buf_name, b in layer.named_buffers():
        # integer counters and RoPE's float64 inverse frequencies keep the dtype the layer chose
        if buf_name.endswith("inv_freq"):
            assert b.dtype == torch.float64, buf_name
        elif b.is_floating_point():
            assert b.dtype == torch.bfloat16, buf_name
        else:
            assert b.dtype in (torch.int64, torch.bool), buf_name


def test_float32_params_of_mamba_stay_float32_under_bfloat16():
    layer = build_attention("mamba", dim=DIM, num_heads=HEADS, causal=True, dtype=torch.bfloat16)
    assert layer.A_log.dtype == layer.D.dtype == torch.float32
    assert layer.in_proj.weight.dtype == torch.bfloat16
    assert getattr(layer.A_log, "_no_weight_decay", False)  # the Parameter object (and its marks) is kept


@pytest.mark.parametrize("name", list_attention())
def test_options_do_not_list_device_or_dtype(name):
    options = attention_info(name).options
    assert "device" not in options and "dtype" not in options


def test_class_constructor_takes_device_and_dtype_directly():
    cls = attention_info("gla").cls
    layer = cls(DIM, HEADS, causal=True, dtype=torch.float64)
    assert {p.dtype for p in layer.parameters()} == {torch.float64}
    assert "device" in str(inspect.signature(cls.__init__))


def test_bad_dtype_names_the_fix():
    with pytest.raises(TypeError, match=r"floating-point torch\.dtype"):
        build_attention("softmax", dim=DIM, num_heads=HEADS, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"floating-point torch\.dtype"):
        build_attention("softmax", dim=DIM, num_heads=HEADS, dtype="float64")


BACKBONES = {
    "gpt": lambda **kw: GPT(50, dim=DIM, depth=2, num_heads=HEADS, attention=["gla", "mamba"], **kw),
    "encoder": lambda **kw: Encoder(50, 3, dim=DIM, depth=2, num_heads=HEADS, attention="softmax", **kw),
    "vit": lambda **kw: ViT(16, 4, 3, 5, embed_dim=DIM, depth=2, num_heads=HEADS, attention=["mamba", "gla"], **kw),
}


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_backbones_take_device_and_dtype(backbone):
    build = BACKBONES[backbone]
    meta = build(device="meta")
    assert all(t.is_meta for _, t in _tensors(meta))
    torch.manual_seed(0)
    doubled = build().double()
    torch.manual_seed(0)
    built = build(dtype=torch.float64)
    assert {p.dtype for p in built.parameters()} == {torch.float64}
    for (key, want), (key2, got) in zip(doubled.state_dict().items(), built.state_dict().items()):
        assert key == key2 and torch.equal(got, want), key
    half = build(dtype=torch.bfloat16)
    pinned = {torch.float32} if backbone != "encoder" else set()  # Mamba's A_log and D in the GPT and ViT
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16} | pinned
    assert "device" not in half._hub_mixin_config and "dtype" not in half._hub_mixin_config
