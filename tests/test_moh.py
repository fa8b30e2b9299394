"""MoH properties (Jin et al. 2024): zero routers with k = E is multi-head attention, exactly k routed heads
per token, gate sums, load-balance loss, causality, the query_norm router and the constructor's errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnzoo.layers import build_attention

DIM, HEADS = 32, 8
F64 = dict(atol=1e-12, rtol=1e-12)


def make(seed: int = 0, **options):
    torch.manual_seed(seed)
    return build_attention("moh", dim=DIM, num_heads=HEADS, **options).double().eval()


def inputs(B: int = 2, T: int = 9, seed: int = 1):
    return torch.randn(B, T, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def zero_routers(layer) -> None:
    for router in (layer.wg, layer.wg_0, layer.wg_1):
        if router is not None:
            nn.init.zeros_(router.weight)


@pytest.mark.parametrize(
    "pattern", [dict(), dict(causal=True), dict(cross=True), dict(causal=True, cross=True)], ids=str
)
@pytest.mark.parametrize("shared", [0, 1, 3, HEADS], ids=lambda s: f"shared{s}")
def test_zero_routers_all_heads_equal_softmax_attention(pattern, shared):
    """Zero routers and k = E: every gate is 1, so MoH is the softmax layer with the same q/k/v/proj weights."""
    layer = make(shared_heads=shared, routed_heads=HEADS - shared, qkv_bias=True, **pattern)
    zero_routers(layer)
    mha = build_attention("softmax", dim=DIM, num_heads=HEADS, qkv_bias=True, **pattern).double().eval()
    missing, unexpected = layer.load_state_dict(mha.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("wg") for k in missing)
    x = inputs()
    context = inputs(seed=2) if pattern.get("cross") else None
    torch.testing.assert_close(layer.route(x).gates, torch.ones(2, 9, HEADS, dtype=torch.float64), **F64)
    torch.testing.assert_close(layer(x, context=context), mha(x, context=context), **F64)


@pytest.mark.parametrize("shared,k", [(2, 3), (1, 2), (0, 4), (5, 1)])
def test_gate_counts_and_sums(shared, k):
    layer = make(shared_heads=shared, routed_heads=k)
    routing = layer.route(inputs(T=13))
    gates = routing.gates
    routed = gates[..., shared:]
    assert ((routed != 0).sum(-1) == k).all(), "exactly k routed gates are non-zero per token"
    assert (gates[..., :shared] > 0).all(), "shared heads are always on"
    chosen = torch.zeros_like(routed, dtype=torch.bool).scatter_(-1, routing.indices, True)
    assert torch.equal(routed != 0, chosen)
    # the selected heads are the k most probable ones
    kth = routing.probs.topk(k, dim=-1).values[..., -1:]
    assert (routing.probs[chosen] >= kth.expand_as(routing.probs)[chosen]).all()
    alpha_shared = gates[..., :shared].sum(-1) / max(shared, 1)  # a1 (mean shared gate = a1 * mean(s) = a1)
    alpha_routed = routed.sum(-1) / k  # a2
    if shared == 0:
        torch.testing.assert_close(alpha_routed, torch.ones_like(alpha_routed), **F64)
    else:
        torch.testing.assert_close(alpha_shared + alpha_routed, torch.full_like(alpha_routed, 2.0), **F64)
        assert (alpha_shared > 0).all() and (alpha_routed > 0).all()


def test_single_shared_head_uses_the_vit_rule():
    """h_s = 1 (the DiT crash): the shared weight is 1 before mixing, so the shared gate is a1 = 2 - a2."""
    layer = make(shared_heads=1, routed_heads=2)
    assert layer.wg_1 is None
    gates = layer.route(inputs()).gates
    torch.testing.assert_close(gates[..., 0] + gates[..., 1:].sum(-1) / 2, torch.full_like(gates[..., 0], 2.0), **F64)


def test_weighted_mha_without_routed_heads():
    """k = 0 with every head shared and W_s = 0 is multi-head attention."""
    layer = make(shared_heads=HEADS, routed_heads=0)
    assert layer.wg is None and layer.wg_0 is None
    nn.init.zeros_(layer.wg_1.weight)
    mha = build_attention("softmax", dim=DIM, num_heads=HEADS).double().eval()
    layer.load_state_dict(mha.state_dict(), strict=False)
    x = inputs()
    torch.testing.assert_close(layer(x), mha(x), **F64)
    layer.train()
    layer(x)
    assert layer.aux_loss is None  # no router, no load-balance loss


def test_load_balance_loss_at_perfect_balance_and_nonnegative():
    k = HEADS - 2
    layer = make(shared_heads=2, routed_heads=k, lb_coeff=1.0).train()
    zero_routers(layer)  # P_i = 1/E and f_i = 1 (k = E): L_b = E * E * (1/E) = k
    layer(inputs())
    torch.testing.assert_close(layer.aux_loss, torch.tensor(float(k), dtype=torch.float64), **F64)
    for seed in range(3):
        layer = make(seed=seed, shared_heads=2, routed_heads=2, lb_coeff=1.0).train()
        layer(inputs(seed=seed))
        assert layer.aux_loss >= 0
        assert layer.aux_loss.requires_grad  # it trains the router through P_i
    layer.eval()
    layer(inputs())
    assert layer.aux_loss is None


def test_load_balance_statistics_skip_padded_tokens():
    layer = make(shared_heads=2, routed_heads=2).train()
    x = inputs(T=10)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 6:] = False
    mask[1, :3] = False
    layer(x, padding_mask=mask)
    got = layer.aux_loss
    # gating is per token: the real tokens alone, as one sequence, give the same statistics
    layer(x[mask][None])
    torch.testing.assert_close(got, layer.aux_loss, **F64)
    torch.testing.assert_close(layer.head_usage, torch.tensor(4 / HEADS, dtype=torch.float64), **F64)


def test_head_usage_is_the_active_fraction():
    layer = make(shared_heads=3, routed_heads=2)
    layer(inputs())
    assert float(layer.head_usage) == pytest.approx((3 + 2) / HEADS)
    assert not layer.head_usage.requires_grad


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_causal_moh_is_causal(cross):
    layer = make(causal=True, cross=cross, shared_heads=2, routed_heads=3)
    x = inputs(T=12)
    context = inputs(T=12, seed=5) if cross else None
    full = layer(x, context=context)
    x2 = x.clone()
    x2[:, 7:] += 5 * torch.randn_like(x2[:, 7:])
    context2 = None
    if cross:
        context2 = context.clone()
        context2[:, 7:] -= 3.0
    torch.testing.assert_close(layer(x2, context=context2)[:, :7], full[:, :7], **F64)


def test_query_norm_router():
    """MoH-LLaMA3's parameter-free router: binary gates on the shared heads and the k largest routed query norms."""
    layer = make(shared_heads=4, routed_heads=2, router="query_norm").train()
    assert layer.wg is None and layer.wg_0 is None and layer.wg_1 is None
    x = inputs()
    q = layer.qkv(x)[..., :DIM].view(2, 9, HEADS, DIM // HEADS)
    routing = layer.route(x)
    assert set(routing.gates.unique().tolist()) <= {0.0, 1.0}
    assert (routing.gates[..., :4] == 1).all() and (routing.gates[..., 4:].sum(-1) == 2).all()
    top = q[:, :, 4:].norm(dim=-1).topk(2, dim=-1).indices.sort(-1).values
    assert torch.equal(routing.indices.sort(-1).values, top)
    # gating a head by 0 or 1 is running multi-head attention and dropping the unselected heads' outputs
    out = layer(x)
    assert layer.aux_loss is None  # the released router has no balance loss
    mha = build_attention("softmax", dim=DIM, num_heads=HEADS).double().eval()
    mha.load_state_dict(layer.state_dict())
    heads = {}
    mha.proj.register_forward_pre_hook(lambda m, a: heads.update(o=a[0]))
    mha(x)
    ref = layer.proj(heads["o"].view(2, 9, HEADS, -1).mul(routing.gates[..., None]).flatten(2))
    torch.testing.assert_close(out, ref, **F64)


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(router="learnt"), r"unknown router 'learnt'\. Did you mean 'learned'"),
        (dict(shared_heads=9), r"shared_heads must be an integer in \[0, num_heads=8\]"),
        (dict(shared_heads=4, routed_heads=5), r"routed_heads \(top-k\) must be an integer in \[0, .* = 4\]"),
        (dict(shared_heads=4, routed_heads=0), "routed_heads=0 would never use the 4 routed heads"),
        (dict(shared_heads=7, routed_heads=1, router="query_norm"), "needs routed_heads >= 1 and num_heads"),
        (dict(lb_coeff=-1.0), "lb_coeff must be >= 0"),
    ],
)
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        build_attention("moh", dim=DIM, num_heads=HEADS, **options)
