"""sparse_transformer (Child et al. 2019) against a float64 oracle: the paper's sets A_i written out position by
position, a dense masked softmax over them; plus the properties of each factorisation."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import LargestTensor

from attnzoo.kernels.sparse_attention import sparse_attention
from attnzoo.layers import build_attention

DIM, HEADS = 32, 4
D = DIM // HEADS


@functools.cache
def paper_sets(T: int, mode: str, stride: int, c: int, causal: bool, component: str) -> torch.Tensor:
    """(T, T) bool, True where j is in A_i: the definitions of §4.2, one position pair at a time (cached: treat
    the result as read-only)."""
    allowed = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            if causal and j > i:
                continue
            if mode == "strided":
                local, column = abs(i - j) < stride, (i - j) % stride == 0
            else:
                local, column = i // stride == j // stride, j % stride in range(stride - c, stride)
            allowed[i, j] = {"local": local, "global": column, "merged": local or column}[component]
    return allowed


def head_components(combine: str) -> list[str]:
    if combine == "split":
        return ["local" if h % 2 == 0 else "global" for h in range(HEADS)]
    return [combine] * HEADS


def oracle(layer, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dense float64 attention over the paper's sets, using the layer's own projections."""
    B, T, _ = x.shape
    H, D = HEADS, DIM // HEADS
    q = layer.q_proj(x).view(B, T, H, D).transpose(1, 2)
    k = layer.k_proj(x).view(B, T, H, D).transpose(1, 2)
    v = layer.v_proj(x).view(B, T, H, D).transpose(1, 2)
    sets = torch.stack(
        [
            paper_sets(T, layer.mode, layer.stride, layer.summary_size, layer.causal, comp)
            for comp in head_components(layer.combine)
        ]
    )  # (H, T, T)
    mask = sets[None].expand(B, H, T, T).clone()
    if padding_mask is not None:
        mask &= padding_mask[:, None, None, :]
    scores = (q @ k.transpose(-1, -2)) / D**0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query with no key: zero output
    o = (probs @ v).transpose(1, 2).reshape(B, T, DIM)
    return layer.o_proj(o)


def make(**options):
    torch.manual_seed(0)
    return build_attention("sparse_transformer", dim=DIM, num_heads=HEADS, **options).double().eval()


CONFIGS = [
    pytest.param(
        mode, stride, c, causal, combine, id=f"{mode}-l{stride}-c{c}-{'causal' if causal else 'bidir'}-{combine}"
    )
    for mode, stride, c in [("strided", 4, 1), ("strided", 5, 1), ("fixed", 4, 2), ("fixed", 6, 1)]
    for causal in (True, False)
    for combine in ("merged", "split", "local", "global")
]


@pytest.mark.parametrize("mode,stride,c,causal,combine", CONFIGS)
@pytest.mark.parametrize("T", [1, 13, 24])
def test_matches_dense_oracle(mode, stride, c, causal, combine, T):
    layer = make(mode=mode, stride=stride, summary_size=c, causal=causal, combine=combine)
    x = torch.randn(2, T, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(T))
    torch.testing.assert_close(layer(x), oracle(layer, x), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("mode", ["strided", "fixed"])
@pytest.mark.parametrize("causal", [True, False])
def test_padding_matches_oracle(mode, causal):
    layer = make(mode=mode, stride=4, summary_size=2, causal=causal)
    x = torch.randn(2, 19, DIM, dtype=torch.float64)
    mask = torch.ones(2, 19, dtype=torch.bool)
    mask[0, [0, 3, 4, 11]] = False
    mask[1, 14:] = False
    got, ref = layer(x, padding_mask=mask), oracle(layer, x, mask)
    torch.testing.assert_close(got[mask], ref[mask], atol=1e-12, rtol=1e-10)


def test_mask_mod_is_the_paper_pattern():
    """The mask function the decoding path and FlexAttention use equals the paper's sets for every head."""
    for mode, c in [("strided", 1), ("fixed", 3)]:
        for combine in ("merged", "split"):
            for causal in (True, False):
                layer = make(mode=mode, stride=5, summary_size=c, causal=causal, combine=combine)
                T = 23
                pos = torch.arange(T)
                got = layer.mask_mod(None, torch.arange(HEADS)[:, None, None], pos[None, :, None], pos[None, None, :])
                ref = torch.stack([paper_sets(T, mode, 5, c, causal, comp) for comp in head_components(combine)])
                assert torch.equal(got, ref), (mode, combine, causal)


@pytest.mark.parametrize("mode", ["strided", "fixed"])
def test_decode_equals_full_forward_across_blocks(mode):
    """Prefill, single steps and a chunk, spanning several blocks of l, equal one forward (and stay exact)."""
    layer = make(mode=mode, stride=4, summary_size=2, causal=True)
    x = torch.randn(2, 21, DIM, dtype=torch.float64)
    cache = layer.new_cache(2)
    parts = [layer(x[:, :7], cache=cache)]
    parts += [layer(x[:, t : t + 1], cache=cache) for t in range(7, 15)]
    parts += [layer(x[:, 15:], cache=cache)]
    torch.testing.assert_close(torch.cat(parts, dim=1), layer(x), atol=1e-12, rtol=1e-10)
    assert layer.state_size(21) == 2 * 21 * DIM


def test_strided_two_hops_reach_every_earlier_position():
    """The paper's factorisation property: two strided layers connect every j <= i (local then column, or back)."""
    T, stride = 30, 5
    a = paper_sets(T, "strided", stride, 1, True, "local").double()
    b = paper_sets(T, "strided", stride, 1, True, "global").double()
    reach = (a @ b + b @ a) > 0
    assert torch.equal(reach, torch.ones(T, T).tril().bool())


@pytest.mark.parametrize("mode", ["strided", "fixed"])
@pytest.mark.parametrize("causal", [True, False])
def test_cpu_form_equals_flex_attention_lowering(mode, causal):
    """The blocked CPU form equals the CUDA lowering of the same mask function, FlexAttention (its CPU forward),
    and the op's dense reference, with padding."""
    layer = make(mode=mode, stride=4, summary_size=2, causal=causal, combine="split").float()
    q, k, v = (torch.randn(2, 19, HEADS, D, generator=torch.Generator().manual_seed(s)) for s in range(3))
    mask = torch.ones(2, 19, dtype=torch.bool)
    mask[0, [2, 7]] = False
    got = layer._attend_blocked(q, k, v, mask)
    pattern = layer.block_pattern(19)
    for backend in ("reference", "flex"):
        ref = sparse_attention(q, k, v, pattern, key_mask=mask, backend=backend)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode,per_query", [("strided", 2 * 32 + 512 // 32), ("fixed", 32 + 512 // 32 * 4)])
def test_cost_is_sparse(mode, per_query):
    """No op of a T=512, l=32 causal forward or backward builds a (T, T) tensor: the largest holds T x (2l + T/l)
    (strided) or T x (l + T c / l) (fixed, c = 4) entries per head, under a quarter of T x T."""
    layer = build_attention(
        "sparse_transformer", dim=DIM, num_heads=HEADS, causal=True, mode=mode, stride=32, summary_size=4
    )
    x = torch.randn(1, 512, DIM, requires_grad=True)
    with LargestTensor() as spy:
        layer(x).sum().backward()
    assert spy.numel <= HEADS * 512 * per_query < HEADS * 512 * 512 / 4


def test_bad_options_raise():
    with pytest.raises(ValueError, match="mode must be one of"):
        make(mode="sliding")
    with pytest.raises(ValueError, match="summary_size"):
        make(mode="fixed", stride=8, summary_size=9)
    with pytest.raises(ValueError, match="combine must be one of"):
        make(combine="interleaved")
    with pytest.raises(ValueError, match="has no pattern 'noncausal_cross'"):
        make(cross=True)
