"""Properties of the ``deltanet`` and ``gated_deltanet`` layers beyond the registry-wide contract tests.

The oracle is an independent float64 implementation of each whole layer written from the papers' equations: the
projections as matmuls with the layer's weights, the short convolutions as zero-padded ``F.conv1d``, SiLU, the L2
norm, the (gated) delta rule one token at a time, the per-head RMSNorm (and SiLU gate), ``o_proj``. It shares no code
with the layer or with ``attnzoo.kernels.delta_rule``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnzoo.layers import attention_info, build_attention
from attnzoo.layers.deltanet import DeltaNetCache

DIM, HEADS = 32, 4
F64 = torch.float64
LAYERS = ("deltanet", "gated_deltanet")


def make(name: str, causal: bool = True, seed: int = 0, std: float = 0.3, **options):
    """A float64 layer whose projections and convolutions are large enough that every term matters (FLA's N(0, 0.02)
    init makes the outputs tiny); A_log, dt_bias and the norm keep their initialisation."""
    torch.manual_seed(seed)
    layer = build_attention(name, dim=DIM, num_heads=HEADS, causal=causal, **options).to(F64).eval()
    with torch.no_grad():
        for pname, p in layer.named_parameters():
            if pname.endswith("proj.weight") or "conv1d" in pname:
                p.normal_(0.0, std)
            elif pname == "o_norm.weight":
                p.uniform_(0.5, 1.5)
    return layer


def randn(*shape, seed: int = 1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ----------------------------------------------------------------------------------------------------------------
# the oracle


def causal_conv(x, weight, reverse: bool = False):
    """y_t = sum_w weight[c, 0, w] x_{t-W+1+w}, zeros before the start; reverse = the mirrored (anti-causal) form."""
    if reverse:
        return causal_conv(x.flip(1), weight).flip(1)
    W = weight.shape[-1]
    return F.conv1d(F.pad(x.transpose(1, 2), (W - 1, 0)), weight, groups=x.shape[-1]).transpose(1, 2)


def oracle_features(layer, x, reverse: bool = False):
    """q, k (B, T, H, K), v (B, T, H, V) as the papers define them, from the layer's weights."""
    B, T, _ = x.shape
    q, k, v = x @ layer.q_proj.weight.T, x @ layer.k_proj.weight.T, x @ layer.v_proj.weight.T
    act = getattr(layer, "qk_activation", "silu")
    if layer.use_short_conv:
        q = causal_conv(q, layer.q_conv1d.weight, reverse)
        k = causal_conv(k, layer.k_conv1d.weight, reverse)
        v = causal_conv(v, layer.v_conv1d.weight, reverse)
    feature_map = {"silu": F.silu, "relu": torch.relu, "elu": lambda t: F.elu(t) + 1, "identity": lambda t: t}[act]
    q, k, v = feature_map(q), feature_map(k), F.silu(v)
    q, k = q.view(B, T, HEADS, -1), k.view(B, T, HEADS, -1)
    q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    return q, k, v.view(B, T, HEADS, -1)


def oracle_gates(layer, x):
    """beta (B, T, H) and the log decay g (B, T, H) or None."""
    beta = torch.sigmoid(x @ layer.b_proj.weight.T) if layer.b_proj is not None else x.new_ones(*x.shape[:2], HEADS)
    if layer.allow_neg_eigval:
        beta = 2 * beta
    g = None
    if hasattr(layer, "A_log"):
        g = -torch.exp(layer.A_log) * F.softplus(x @ layer.a_proj.weight.T + layer.dt_bias)
    return beta, g


def delta_recurrence(q, k, v, beta, g, state=None):
    """S_t = exp(g_t) S_{t-1};  S_t += beta_t k_t^T (v_t - k_t S_t);  o_t = K^-1/2 q_t S_t, one token at a time."""
    B, T, H, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1]) if state is None else state.clone()
    out = []
    for t in range(T):
        if g is not None:
            S = S * torch.exp(g[:, t])[:, :, None, None]
        error = v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], S)  # what the memory gets wrong about v_t
        S = S + beta[:, t, :, None, None] * k[:, t, :, :, None] * error[:, :, None, :]
        out.append(K**-0.5 * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(out, dim=1), S  # (B, T, H, V), (B, H, K, V)


def oracle_output(layer, o, x):
    """Per-head RMSNorm (times SiLU(g_proj x) with the gate) and o_proj."""
    B, T, _ = x.shape
    out = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + layer.o_norm.eps) * layer.o_norm.weight
    if layer.g_proj is not None:
        out = out * F.silu(x @ layer.g_proj.weight.T).view(B, T, HEADS, -1)
    return out.reshape(B, T, -1) @ layer.o_proj.weight.T


def oracle_layer(layer, x):
    q, k, v = oracle_features(layer, x)
    beta, g = oracle_gates(layer, x)
    o, _ = delta_recurrence(q, k, v, beta, g)
    if not layer.causal:  # plus the delta rule over the reversed sequence, anti-causal convolutions
        qb, kb, vb = oracle_features(layer, x, reverse=True)
        flip = lambda t: None if t is None else t.flip(1)
        ob, _ = delta_recurrence(qb.flip(1), kb.flip(1), vb.flip(1), beta.flip(1), flip(g))
        o = o + ob.flip(1)
    return oracle_output(layer, o, x)


# ----------------------------------------------------------------------------------------------------------------
# layer == oracle

OPTION_CASES = [
    pytest.param("deltanet", {}, id="deltanet"),
    pytest.param("deltanet", {"use_gate": True, "allow_neg_eigval": True}, id="deltanet-gate-negeig"),
    pytest.param("deltanet", {"use_short_conv": False, "use_beta": False}, id="deltanet-noconv-nobeta"),
    pytest.param("deltanet", {"qk_activation": "elu", "expand_v": 2.0}, id="deltanet-elu-expandv"),
    pytest.param("deltanet", {"qk_activation": "relu"}, id="deltanet-relu"),
    pytest.param("deltanet", {"qk_activation": "identity", "use_short_conv": False}, id="deltanet-identity-noconv"),
    pytest.param("gated_deltanet", {}, id="gated_deltanet"),
    pytest.param("gated_deltanet", {"use_gate": False, "allow_neg_eigval": True}, id="gated_deltanet-nogate-negeig"),
    pytest.param("gated_deltanet", {"use_short_conv": False, "head_dim": 8, "expand_v": 1.5}, id="gated_deltanet-hd8"),
]


@pytest.mark.parametrize("name,options", OPTION_CASES)
def test_causal_layer_equals_token_by_token_oracle(name, options):
    layer = make(name, **options)
    x = randn(2, 70, DIM)  # 70 = one full chunk of 64 and a partial one
    torch.testing.assert_close(layer(x), oracle_layer(layer, x), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", LAYERS)
def test_bidirectional_layer_equals_forward_plus_reversed_delta_rule(name):
    layer = make(name, causal=False)
    x = randn(2, 40, DIM)
    torch.testing.assert_close(layer(x), oracle_layer(layer, x), atol=1e-10, rtol=1e-10)
    # the backward half matters: position 0 sees the last token
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert (layer(x2)[:, 0] - layer(x)[:, 0]).abs().max() > 1e-6


@pytest.mark.parametrize("name", LAYERS)
def test_gradients_match_the_oracle(name):
    layer = make(name)
    x = randn(2, 20, DIM)
    weights = randn(2, 20, DIM, seed=3)
    params = [p for p in layer.parameters()]
    grads = torch.autograd.grad((layer(x) * weights).sum(), params)
    ref = torch.autograd.grad((oracle_layer(layer, x) * weights).sum(), params)
    for (pname, _), got, want in zip(layer.named_parameters(), grads, ref, strict=True):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9, msg=lambda m, n=pname: f"d{n}: {m}")


# ----------------------------------------------------------------------------------------------------------------
# decoding, chunking, padding


@pytest.mark.parametrize("name,options", OPTION_CASES)
def test_prefill_then_steps_equal_full_forward(name, options):
    layer = make(name, **options)
    x = randn(2, 23, DIM)
    cache = layer.new_cache(2)
    parts = [layer(x[:, :9], cache=cache), layer(x[:, 9:16], cache=cache)]
    parts += [layer(x[:, t : t + 1], cache=cache) for t in range(16, 23)]
    torch.testing.assert_close(torch.cat(parts, dim=1), layer(x), atol=1e-10, rtol=1e-10)
    assert cache.length == 23
    # the cached state is the oracle's state after the last token
    q, k, v = oracle_features(layer, x)
    _, state = delta_recurrence(q, k, v, *oracle_gates(layer, x))
    torch.testing.assert_close(cache.state, state, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", LAYERS)
def test_chunk_sizes_agree(name):
    x = randn(2, 150, DIM)
    ref = make(name, chunk_size=64)(x)
    for chunk_size in (16, 32, 128):
        torch.testing.assert_close(make(name, chunk_size=chunk_size)(x), ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(make(name, backend="reference")(x), ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", LAYERS)
def test_padded_positions_are_removed(name):
    """Without the short convolutions (whose window would see the zeroed input), a padded position changes nothing:
    the real positions' outputs equal those of the sequence with the padding cut out."""
    layer = make(name, use_short_conv=False)
    x = randn(1, 30, DIM)
    mask = torch.ones(1, 30, dtype=torch.bool)
    mask[0, [3, 4, 11, 20, 21, 22]] = False
    out = layer(x, padding_mask=mask)
    torch.testing.assert_close(out[mask], layer(x[:, mask[0]])[0], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", LAYERS)
def test_padded_tail_leaves_the_state_unchanged(name):
    """A padded position neither writes (k = 0, beta = 0) nor decays (g = 0) the memory."""
    layer = make(name)
    x = randn(2, 20, DIM)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[:, 14:] = False
    padded, real = layer.new_cache(2), layer.new_cache(2)
    layer(x, padding_mask=mask, cache=padded)
    layer(x[:, :14], cache=real)
    torch.testing.assert_close(padded.state, real.state, atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# FLA's names, defaults and gates

FLA_DELTANET = {  # fla/layers/delta_net.py DeltaNet(hidden_size=32, num_heads=4), its defaults
    "q_proj.weight": (32, 32),
    "k_proj.weight": (32, 32),
    "v_proj.weight": (32, 32),
    "b_proj.weight": (4, 32),
    "q_conv1d.weight": (32, 1, 4),
    "k_conv1d.weight": (32, 1, 4),
    "v_conv1d.weight": (32, 1, 4),
    "o_norm.weight": (8,),
    "o_proj.weight": (32, 32),
}
FLA_GATED_DELTANET = {  # fla/layers/gated_deltanet.py GatedDeltaNet(hidden_size=32, num_heads=4, head_dim=6)
    "q_proj.weight": (24, 32),
    "k_proj.weight": (24, 32),
    "v_proj.weight": (48, 32),
    "a_proj.weight": (4, 32),
    "b_proj.weight": (4, 32),
    "A_log": (4,),
    "dt_bias": (4,),
    "q_conv1d.weight": (24, 1, 4),
    "k_conv1d.weight": (24, 1, 4),
    "v_conv1d.weight": (48, 1, 4),
    "g_proj.weight": (48, 32),
    "o_norm.weight": (12,),
    "o_proj.weight": (32, 48),
}


@pytest.mark.parametrize("name,expected", [("deltanet", FLA_DELTANET), ("gated_deltanet", FLA_GATED_DELTANET)])
def test_parameter_names_and_shapes_are_flas(name, expected):
    layer = build_attention(name, dim=DIM, num_heads=HEADS, causal=True)
    assert {n: tuple(p.shape) for n, p in layer.named_parameters()} == expected
    gated = build_attention("deltanet", dim=DIM, num_heads=HEADS, causal=True, use_gate=True)
    assert tuple(gated.g_proj.weight.shape) == (32, 32)


def test_defaults_are_flas():
    assert attention_info("deltanet").options == {
        "expand_k": 1.0,
        "expand_v": 1.0,
        "use_beta": True,
        "use_gate": False,
        "use_short_conv": True,
        "conv_size": 4,
        "conv_bias": False,
        "allow_neg_eigval": False,
        "qk_activation": "silu",
        "norm_eps": 1e-5,
        "chunk_size": None,  # the kernel backend's own chunk (FLA's 64 on triton)
        "backend": "auto",
    }
    options = attention_info("gated_deltanet").options
    assert (options["expand_v"], options["use_gate"], options["use_short_conv"], options["conv_size"]) == (
        2,
        True,
        True,
        4,
    )
    # head_dim None keeps FLA's num_heads * head_dim = 0.75 * hidden_size
    layer = build_attention("gated_deltanet", dim=64, num_heads=2, causal=True)
    assert (layer.head_k_dim, layer.head_v_dim) == (24, 48)


def test_gated_deltanet_init_and_decay():
    """Mamba-2's parametrisation: A = exp(A_log) in (0, 16), dt = softplus(dt_bias) in [1e-3, 0.1] at init, and
    g = -A * softplus(a_proj x + dt_bias) <= 0 in float32."""
    torch.manual_seed(0)
    layer = build_attention("gated_deltanet", dim=64, num_heads=16, causal=True)
    A, dt = layer.A_log.exp(), F.softplus(layer.dt_bias)
    assert layer.A_log.dtype == torch.float32 and ((A > 0) & (A < 16)).all()
    assert ((dt > 1e-3 * (1 - 1e-5)) & (dt < 0.1 * (1 + 1e-5))).all()
    assert layer.A_log._no_weight_decay and layer.dt_bias._no_weight_decay
    x = torch.randn(2, 9, 64) * 3
    g = layer.log_decay(x)
    want = -A * F.softplus(x @ layer.a_proj.weight.T + layer.dt_bias)
    torch.testing.assert_close(g, want.clamp_min(-60.0))
    assert g.dtype == torch.float32 and (g <= 0).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.log_decay(x).dtype == torch.float32


@pytest.mark.parametrize("name", LAYERS)
def test_beta_range(name):
    x = randn(2, 9, DIM) * 3
    beta = make(name).write_strength(x)
    assert ((beta > 0) & (beta < 1)).all()
    beta_neg = make(name, allow_neg_eigval=True).write_strength(x)
    assert ((beta_neg > 0) & (beta_neg < 2)).all() and (beta_neg > 1).any()


@pytest.mark.parametrize("name", LAYERS)
def test_large_inputs_stay_finite_and_exact(name):
    """Inputs scaled by 100 saturate the SiLUs, sigmoids and decays; the unit keys keep every transition
    I - beta k^T k of norm <= 1, so the chunked kernel stays finite and equal to the token-by-token oracle."""
    layer = make(name, std=1.0)
    x = randn(2, 130, DIM) * 100
    cache = layer.new_cache(2)
    out = layer(x, cache=cache)
    assert torch.isfinite(out).all() and torch.isfinite(cache.state).all()
    q, k, v = oracle_features(layer, x)
    _, state = delta_recurrence(q, k, v, *oracle_gates(layer, x))
    torch.testing.assert_close(cache.state, state, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(out, oracle_layer(layer, x), atol=1e-8, rtol=1e-8)


def test_cache_type_and_options_are_checked():
    layer = make("deltanet")
    assert isinstance(layer.new_cache(2), DeltaNetCache)
    with pytest.raises(TypeError, match="new_cache"):
        layer(randn(2, 3, DIM), cache=object())
    with pytest.raises(ValueError, match="qk_activation"):
        build_attention("deltanet", dim=DIM, num_heads=HEADS, qk_activation="gelu")
    with pytest.raises(ValueError, match="expand_k"):
        build_attention("deltanet", dim=DIM, num_heads=HEADS, expand_k=0.3)
    with pytest.raises(ValueError, match="expand_v"):
        build_attention("gated_deltanet", dim=DIM, num_heads=HEADS, head_dim=5, expand_v=1.5)
    with pytest.raises(ValueError, match="head_dim"):
        build_attention("gated_deltanet", dim=DIM, num_heads=HEADS, head_dim=0)


@pytest.mark.parametrize("name", LAYERS)
def test_state_size_counts_memory_and_conv_inputs(name):
    layer = build_attention(name, dim=DIM, num_heads=HEADS, causal=True)
    cache = layer.new_cache(1)
    layer(torch.randn(1, 5, DIM), cache=cache)
    kept = cache.state.numel() + sum(s.numel() for s in cache.conv_states)
    assert layer.state_size(5) == layer.state_size(5000) == kept
