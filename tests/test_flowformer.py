"""Flowformer's own properties (Wu et al. 2022); the contract is in test_contract.py."""

from __future__ import annotations

import pytest
import torch

from attnzoo.layers import build_attention
from attnzoo.layers.flowformer import conservation_flows, flow_attention

B, H, D = 2, 3, 8
EPS = 1e-6


def sigmoid_randn(*shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.sigmoid(2 * torch.randn(*shape, generator=gen, dtype=torch.float64))


def quadratic_flow(q, k, v, *, causal, eps=EPS):
    """The T x T form written from the paper's equations (official eps placement), float64, per (batch, head).

    Prefix sums are products with the lower-triangular ones matrix L (sum_{j<=i} x_j = (L x)_i), and the output is
    the explicit attention matrix alloc_i * (phi(q_i) I_i / n_i) . phi(k_j) * [j <= i] applied to the competed values.
    """
    q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))  # (B, H, T, D)
    T, S = q.shape[2], k.shape[2]
    if causal:
        L = torch.ones(T, T, dtype=q.dtype).tril()
        n = torch.arange(1, T + 1, dtype=q.dtype)[:, None]  # (T, 1)
        incoming = n[..., 0] / ((q + eps) * (L @ k + eps)).sum(-1)  # (B, H, T)
        outgoing = n[..., 0] / ((k + eps) * (L @ q + eps)).sum(-1)
        sink = ((q + eps) * (L @ (k * outgoing[..., None]) + eps)).sum(-1) / n[..., 0]
        source = (((k + eps) * (L @ (q * incoming[..., None]) + eps)).sum(-1) / n[..., 0]).clamp(-1, 1)
        allocation = torch.sigmoid(sink)
        competition = source.exp() / (source.exp() @ L.T) * n[..., 0]  # exp(O^_i) / sum_{j<=i} exp(O^_j) * n_i
        scores = ((q * (incoming / n[..., 0])[..., None]) @ k.transpose(-1, -2)) * L  # (B, H, T, T)
    else:
        incoming = 1 / ((q + eps) @ (k.sum(2, keepdim=True) + eps).transpose(-1, -2))[..., 0]  # (B, H, T)
        outgoing = 1 / ((k + eps) @ (q.sum(2, keepdim=True) + eps).transpose(-1, -2))[..., 0]  # (B, H, S)
        sink = ((q + eps) @ ((k * outgoing[..., None]).sum(2, keepdim=True) + eps).transpose(-1, -2))[..., 0]
        source = ((k + eps) @ ((q * incoming[..., None]).sum(2, keepdim=True) + eps).transpose(-1, -2))[..., 0]
        allocation = torch.sigmoid(sink * T / S)
        competition = torch.softmax(source.clamp(-1, 1), dim=-1) * S
        scores = (q * incoming[..., None]) @ k.transpose(-1, -2)  # (B, H, T, S)
    o = (scores @ (v * competition[..., None])) * allocation[..., None]
    return o.permute(0, 2, 1, 3)  # (B, T, H, V)


@pytest.mark.parametrize("causal,T,S", [(False, 37, 23), (False, 16, 16), (True, 70, 70), (True, 1, 1)], ids=str)
def test_linear_form_equals_quadratic_form(causal, T, S):
    q, k = sigmoid_randn(B, T, H, D, seed=0), sigmoid_randn(B, S, H, D, seed=1)
    v = torch.randn(B, S, H, D, dtype=torch.float64)
    got, _ = flow_attention(q, k, v, causal=causal, eps=EPS)
    torch.testing.assert_close(got, quadratic_flow(q, k, v, causal=causal), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_layer_is_projections_around_the_flow(causal):
    torch.manual_seed(0)
    layer = build_attention("flowformer", dim=24, num_heads=3, causal=causal).double().eval()
    x = torch.randn(2, 19, 24, dtype=torch.float64)
    q = torch.sigmoid(layer.query_projection(x)).view(2, 19, 3, 8)
    k = torch.sigmoid(layer.key_projection(x)).view(2, 19, 3, 8)
    v = layer.value_projection(x).view(2, 19, 3, 8)
    ref = layer.out_projection(quadratic_flow(q, k, v, causal=causal).reshape(2, 19, 24))
    torch.testing.assert_close(layer(x), ref, atol=1e-12, rtol=1e-10)


def test_flows_are_conserved():
    """Without eps, fixing every sink's incoming flow to 1 makes the sources emit n in total, and vice versa."""
    T, S = 29, 17
    q, k = sigmoid_randn(B, T, H, D, seed=2), sigmoid_randn(B, S, H, D, seed=3)
    incoming, outgoing, conserved_sink, conserved_source = conservation_flows(q, k, eps=0.0)
    # normalised sinks each receive flow exactly 1: (phi(q_i) I_i) . sum_j phi(k_j) = 1
    torch.testing.assert_close(
        torch.einsum("bthd,bhd->bth", q * incoming[..., None], k.sum(1)), torch.ones(B, T, H, dtype=torch.float64)
    )
    torch.testing.assert_close(
        torch.einsum("bshd,bhd->bsh", k * outgoing[..., None], q.sum(1)), torch.ones(B, S, H, dtype=torch.float64)
    )
    torch.testing.assert_close(conserved_source.sum(1), torch.full((B, H), float(T), dtype=torch.float64))
    torch.testing.assert_close(conserved_sink.sum(1), torch.full((B, H), float(S), dtype=torch.float64))
    # with the official eps the conservation holds to ~eps relative
    *_, sink_eps, source_eps = conservation_flows(q, k, eps=EPS)
    assert (source_eps.sum(1) / T - 1).abs().max() < 1e-4 and (sink_eps.sum(1) / S - 1).abs().max() < 1e-4


def test_output_of_constant_values_is_allocation_times_competed_flow():
    """v = 1: o_i = sigmoid(I^_i n / m) * sum_j (phi(q_i) I_i . phi(k_j)) c_j, where the flow weights
    phi(q_i) I_i . phi(k_j) sum to (just under, by eps) 1 and the competition c = softmax(O^) * m sums to m. So o_i
    lies between allocation_i * min_j c_j and allocation_i * max_j c_j, and a constant value scales the output."""
    T, S = 13, 21
    q, k = sigmoid_randn(B, T, H, D, seed=4), sigmoid_randn(B, S, H, D, seed=5)
    o, _ = flow_attention(q, k, torch.ones(B, S, H, 1, dtype=torch.float64), causal=False, eps=EPS)
    incoming, _, sink, source = conservation_flows(q, k, eps=EPS)
    competition = torch.softmax(source.clamp(-1, 1), dim=1) * S  # (B, S, H)
    torch.testing.assert_close(competition.sum(1), torch.full((B, H), float(S), dtype=torch.float64))
    allocation = torch.sigmoid(sink * T / S)  # (B, T, H)
    flow = torch.einsum("bthd,bshd->bths", q * incoming[..., None], k)  # (B, T, H, S)
    assert ((flow.sum(-1) - 1).abs() < 1e-4).all() and (flow.sum(-1) <= 1).all()
    low = allocation * competition.amin(1)[:, None] * flow.sum(-1)
    high = allocation * competition.amax(1)[:, None] * flow.sum(-1)
    assert (o[..., 0] >= low - 1e-12).all() and (o[..., 0] <= high + 1e-12).all()
    assert (competition.amax(1) - competition.amin(1)).min() > 1e-3  # the bounds are not one number
    value = torch.randn(1, 1, H, 1, dtype=torch.float64)
    o_const, _ = flow_attention(q, k, value.expand(B, S, H, 1), causal=False, eps=EPS)
    torch.testing.assert_close(o_const, o * value)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_padded_tokens_are_absent(causal):
    """A padded token is neither sink nor source: the real outputs equal those of the sequence without it."""
    torch.manual_seed(0)
    layer = build_attention("flowformer", dim=24, num_heads=3, causal=causal).double().eval()
    x = torch.randn(1, 15, 24, dtype=torch.float64)
    mask = torch.ones(1, 15, dtype=torch.bool)
    mask[0, [0, 4, 5, 13]] = False
    padded = layer(x, padding_mask=mask)[mask]
    torch.testing.assert_close(padded, layer(x[:, mask[0]])[0], atol=1e-12, rtol=1e-10)


def test_cross_padding_equals_shorter_context():
    torch.manual_seed(0)
    layer = build_attention("flowformer", dim=24, num_heads=3, cross=True).double().eval()
    x, context = torch.randn(2, 9, 24, dtype=torch.float64), torch.randn(2, 14, 24, dtype=torch.float64)
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[:, 10:] = False
    torch.testing.assert_close(
        layer(x, context=context, padding_mask=mask), layer(x, context=context[:, :10]), atol=1e-12, rtol=1e-10
    )


def test_decoding_one_token_at_a_time_equals_the_full_causal_forward():
    torch.manual_seed(0)
    layer = build_attention("flowformer", dim=24, num_heads=3, causal=True).double().eval()
    x = torch.randn(2, 21, 24, dtype=torch.float64)
    cache = layer.new_cache(2)
    stepped = torch.cat([layer(x[:, t : t + 1], cache=cache) for t in range(21)], dim=1)
    torch.testing.assert_close(stepped, layer(x), atol=1e-12, rtol=1e-10)
    assert cache.state.kv.shape == (2, 3, 8, 8) and cache.state.count.tolist() == [21, 21]


def test_bad_eps_raises():
    with pytest.raises(ValueError, match="eps must be >= 0"):
        build_attention("flowformer", dim=24, num_heads=3, eps=-1.0)
