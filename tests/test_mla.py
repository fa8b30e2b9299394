"""Multi-head latent attention against its equations (DeepSeek-V2 §2.1), re-derived here in float64 with an explicit
softmax and RoPE written out, plus the latent-only cache, Hugging Face's parameter names and shapes (and its forward,
when transformers is installed) and the errors. The registry-wide contract (patterns, cache, padding, dtypes) covers
the rest."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnzoo.layers import build_attention

DIM, HEADS, B, T = 32, 4, 2, 11


def rms(x, norm):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def rotate(x, positions, base):
    """RoPE on the last dim in halves: [x1 cos - x2 sin, x2 cos + x1 sin], angle p * base^(-2i / d)."""
    d = x.shape[-1]
    freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = positions.to(torch.float64)[:, None] * freq  # (T, d/2)
    angle = angle.view(angle.shape[0], *([1] * (x.dim() - 3)), d // 2)  # broadcast over heads if any
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], dim=-1)


def naive_forward(layer, x, *, causal, context=None, key_mask=None):
    """The equations step by step: c_q, q = [q_nope, q_pe]; [c_kv, k_pe]; kv_b_proj c_kv = [k_nope, v]; scores as the
    sum of the no-position and the shared-rope-key parts, scaled by (d_nope + d_rope)^-1/2; explicit masked softmax."""
    H, dn, dr, dv, r = (
        layer.num_heads,
        layer.qk_nope_head_dim,
        layer.qk_rope_head_dim,
        layer.v_head_dim,
        layer.kv_lora_rank,
    )
    source = x if context is None else context
    Bx, Tq, _ = x.shape
    S = source.shape[1]
    if layer.q_lora_rank is None:
        q = F.linear(x, layer.q_proj.weight)
    else:
        c_q = rms(F.linear(x, layer.q_a_proj.weight, layer.q_a_proj.bias), layer.q_a_layernorm)
        q = F.linear(c_q, layer.q_b_proj.weight)
    q_nope, q_pe = q.view(Bx, Tq, H, dn + dr).split([dn, dr], dim=-1)
    latent = F.linear(source, layer.kv_a_proj_with_mqa.weight, layer.kv_a_proj_with_mqa.bias)
    c_kv, k_pe = latent[..., :r], latent[..., r:]  # (B, S, r), (B, S, dr): one rope key for all heads
    c_kv = rms(c_kv, layer.kv_a_layernorm)
    kv = F.linear(c_kv, layer.kv_b_proj.weight).view(Bx, S, H, dn + dv)
    k_nope, v = kv[..., :dn], kv[..., dn:]
    q_pos = torch.arange(Tq) + (S - Tq if causal and context is not None else 0)  # bottom-right in causal_cross
    k_pos = torch.arange(S)
    q_pe, k_pe = rotate(q_pe, q_pos, layer.rope.base), rotate(k_pe, k_pos, layer.rope.base)
    scores = torch.einsum("bthd,bshd->bhts", q_nope, k_nope) + torch.einsum("bthd,bsd->bhts", q_pe, k_pe)
    scores = scores * (dn + dr) ** -0.5
    visible = torch.ones(Bx, 1, Tq, S, dtype=torch.bool)
    if causal:
        visible = visible & (k_pos[None, :] <= q_pos[:, None])
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :]
    scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    weights = torch.where(visible.any(-1, keepdim=True), weights, 0.0)  # a query with no visible key: zeros
    o = torch.einsum("bhts,bshd->bthd", weights, v).reshape(Bx, Tq, H * dv)
    return F.linear(o, layer.o_proj.weight, layer.o_proj.bias)


def make(**kw):
    torch.manual_seed(0)
    layer = build_attention("mla", dim=DIM, num_heads=HEADS, **kw).double()
    with torch.no_grad():  # non-trivial norm scales and biases, so the test sees where each one sits
        for name, p in layer.named_parameters():
            if name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_()
    return layer


WIDTHS = {
    "default": {},
    "v-wider": dict(qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=14, kv_lora_rank=12),
    "v-narrower": dict(qk_nope_head_dim=10, qk_rope_head_dim=6, v_head_dim=4, kv_lora_rank=5),
}


@pytest.mark.parametrize("widths", list(WIDTHS), ids=list(WIDTHS))
@pytest.mark.parametrize("q_lora_rank", [None, 12], ids=["q-full", "q-lora"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_equals_the_naive_equations(causal, q_lora_rank, widths):
    layer = make(causal=causal, q_lora_rank=q_lora_rank, attention_bias=q_lora_rank is not None, **WIDTHS[widths])
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3] = mask[1, 7:] = False
    torch.testing.assert_close(layer(x), naive_forward(layer, x, causal=causal), rtol=1e-10, atol=1e-10)
    got = layer(x, padding_mask=mask)
    torch.testing.assert_close(got, naive_forward(layer, x, causal=causal, key_mask=mask), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("S", [7, 11, 15])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_cross_and_padding_equal_the_naive_equations(causal, S):
    """q from x, the latent and the rope key from the context; causal_cross bottom-right (S < T: the first queries
    see nothing and give zeros, before the output projection)."""
    layer = make(causal=causal, cross=True, q_lora_rank=8, **WIDTHS["v-wider"])
    x, context = torch.randn(B, T, DIM, dtype=torch.float64), torch.randn(B, S, DIM, dtype=torch.float64)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[0, 4:] = mask[1, 1] = False
    got = layer(x, context=context, padding_mask=mask)
    want = naive_forward(layer, x, causal=causal, context=context, key_mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_cache_holds_only_the_latents(cross):
    """After prefill + steps the cache keeps c_kv (kv_lora_rank) and the rotated shared k_pe (d_rope) per position,
    equal to the layer's own latents; state_size = S (kv_lora_rank + d_rope); stepping equals the full forward."""
    layer = make(causal=True, cross=cross, q_lora_rank=12, **WIDTHS["v-wider"])
    r, dr = layer.kv_lora_rank, layer.qk_rope_head_dim
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    context = torch.randn(B, T, DIM, dtype=torch.float64) if cross else None
    source = context if cross else x
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 2] = False
    cache = layer.new_cache(B)
    parts = []
    for a, b in [(0, 5), (5, 6), (6, 9), (9, 10), (10, T)]:
        ctx = context[:, a:b] if cross else None
        parts.append(layer(x[:, a:b], context=ctx, padding_mask=mask[:, a:b], cache=cache))
    full = layer(x, context=context, padding_mask=mask)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-10, atol=1e-10)
    assert cache.length == T
    assert cache.keys.shape[2:] == (r,) and cache.values.shape[2:] == (1, dr)
    assert cache.latents.shape == (B, T, r) and cache.rope_keys.shape == (B, T, 1, dr)
    c_kv, k_pe = layer.latents(source)
    torch.testing.assert_close(cache.latents, c_kv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cache.rope_keys, layer.rope(k_pe, 0), rtol=1e-12, atol=1e-12)
    held = sum(t[:, : cache.length].numel() for t in (cache.keys, cache.values)) / B
    assert held == layer.state_size(T) == T * (r + dr)


def test_state_size_at_the_lite_fractions():
    """With the defaults (kv_lora_rank = dim / 4, d_rope = head_dim / 2) a position costs dim / 4 + head_dim / 2
    values, against 2 dim for softmax's keys and values: V2-Lite's 512 + 64 of 2 * 2048 = 14%."""
    layer = build_attention("mla", dim=2048, num_heads=16, causal=True, device="meta")
    assert layer.state_size(1) == 512 + 64
    assert build_attention("softmax", dim=2048, num_heads=16, causal=True, device="meta").state_size(1) == 4096


def hf_shapes(dim, heads, *, kv_lora_rank, q_lora_rank, nope, rope, v, bias):
    """DeepseekV3Attention's parameters for a config (transformers models/deepseek_v3), written out."""
    shapes = {}
    if q_lora_rank is None:
        shapes["q_proj.weight"] = (heads * (nope + rope), dim)
    else:
        shapes["q_a_proj.weight"] = (q_lora_rank, dim)
        shapes["q_a_layernorm.weight"] = (q_lora_rank,)
        shapes["q_b_proj.weight"] = (heads * (nope + rope), q_lora_rank)
        if bias:
            shapes["q_a_proj.bias"] = (q_lora_rank,)
    shapes["kv_a_proj_with_mqa.weight"] = (kv_lora_rank + rope, dim)
    shapes["kv_a_layernorm.weight"] = (kv_lora_rank,)
    shapes["kv_b_proj.weight"] = (heads * (nope + v), kv_lora_rank)
    shapes["o_proj.weight"] = (dim, heads * v)
    if bias:
        shapes["kv_a_proj_with_mqa.bias"] = (kv_lora_rank + rope,)
        shapes["o_proj.bias"] = (dim,)
    return shapes


CONFIGS = [
    pytest.param(dict(q_lora_rank=None, bias=False), id="q-full"),
    pytest.param(dict(q_lora_rank=12, bias=True), id="q-lora-bias"),
]


def hf_sized_layer(cfg):
    """The small causal MLA that the Hugging Face comparisons use (widths of WIDTHS["v-wider"])."""
    return build_attention(
        "mla",
        dim=DIM,
        num_heads=HEADS,
        causal=True,
        **WIDTHS["v-wider"],
        q_lora_rank=cfg["q_lora_rank"],
        attention_bias=cfg["bias"],
    )


@pytest.mark.parametrize("cfg", CONFIGS)
def test_parameter_names_and_shapes_are_hugging_faces(cfg):
    widths = dict(kv_lora_rank=12, nope=6, rope=4, v=14)
    layer = hf_sized_layer(cfg)
    got = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert got == hf_shapes(DIM, HEADS, **widths, **cfg)


def _hf_attention(q_lora_rank, bias):
    modeling = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(
        hidden_size=DIM,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        kv_lora_rank=12,
        q_lora_rank=q_lora_rank,
        qk_nope_head_dim=6,
        qk_rope_head_dim=4,
        v_head_dim=14,
        attention_bias=bias,
        rope_interleave=False,  # the half-split RoPE used here
        attn_implementation="eager",
    )
    return modeling, config, modeling.DeepseekV3Attention(config, layer_idx=0)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_forward_equals_hugging_faces(cfg):
    """Hugging Face's DeepseekV3Attention (eager, rope_interleave=False) loads the layer's state dict as it is and
    gives the same causal output (float32: its RMSNorm computes in float32)."""
    modeling, config, hf = _hf_attention(cfg["q_lora_rank"], cfg["bias"])
    torch.manual_seed(0)
    layer = hf_sized_layer(cfg).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if name.endswith("layernorm.weight") else p + 0.1 * torch.randn_like(p))
    assert {n: tuple(p.shape) for n, p in hf.named_parameters()} == {
        n: tuple(p.shape) for n, p in layer.named_parameters()
    }
    hf.load_state_dict(layer.state_dict(), strict=True)
    hf.eval()
    x = torch.randn(B, T, DIM)
    positions = torch.arange(T)[None]
    cos_sin = modeling.DeepseekV3RotaryEmbedding(config)(x, positions)
    causal = torch.zeros(T, T).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    with torch.no_grad():
        want, _ = hf(x, position_embeddings=cos_sin, attention_mask=causal[None, None].expand(B, 1, T, T))
        got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(qk_rope_head_dim=3), "even qk_rope_head_dim; got 3; set qk_rope_head_dim"),
        (dict(dim=24, num_heads=4), r"even qk_rope_head_dim; got 3 \(head_dim 6 // 2\); change num_heads"),
        (dict(kv_lora_rank=0), "kv_lora_rank must be a positive integer or None; got 0"),
        (dict(q_lora_rank=-4), "q_lora_rank must be a positive integer or None; got -4"),
        (dict(v_head_dim=2.5), "v_head_dim must be a positive integer or None; got 2.5"),
        (dict(qk_nope_head_dim=True), "qk_nope_head_dim must be a positive integer or None; got True"),
        (dict(dim=8, num_heads=8), r"qk_rope_head_dim must be a positive integer or None; got None \(= 0"),
    ],
)
def test_bad_options_raise(kw, match):
    kw = {"dim": DIM, "num_heads": HEADS, **kw}
    with pytest.raises(ValueError, match=match):
        build_attention("mla", **kw)


def test_unknown_option_names_the_close_match():
    with pytest.raises(TypeError, match="Did you mean 'kv_lora_rank'"):
        build_attention("mla", dim=DIM, num_heads=HEADS, kv_lora_rnk=8)
