"""Neighborhood attention (NAT / DiNAT): the layer core against a float64 oracle written here from NATTEN's rules.

The oracle loops over query positions and builds each neighbour set from explicit lists: the query's dilation
group (positions with its residue mod d), its index in that list, and the window of kernel_size consecutive group
members starting at clamp(index - k // 2, 0, len(group) - k) (shifted inward at the borders); causal: the k most
recent group members. A group shorter than k (an axis shorter than k * d, padded by NATTEN's module) is seen whole.
2-D neighbour sets are products of the row and column sets; prefix tokens attend and are seen globally.

With a key padding mask (1-D non-causal), a sequence whose real tokens are one contiguous span is its own sequence:
the reference runs the oracle on that span alone (NATTEN's rule on the unpadded sequence) and puts it back in place;
a mask with holes, and the padded queries, keep the oracle of the padded length with the padded keys masked.
"""

from __future__ import annotations

import pytest
import torch
from conftest import LargestTensor

from attnzoo.kernels.sparse_attention import check_kv_blocks
from attnzoo.layers import build_attention
from attnzoo.layers.neighborhood import neighborhood_attention, neighborhood_pattern


def axis_neighbours(p: int, length: int, k: int, d: int, causal: bool) -> list[int]:
    group = list(range(p % d, length, d))
    g = group.index(p)
    if causal:
        return group[max(0, g - k + 1) : g + 1]
    if len(group) <= k:
        return group
    start = min(max(g - k // 2, 0), len(group) - k)
    return group[start : start + k]


def oracle(q, k, v, *, kernel_size, dilation=1, causal=False, grid=None, prefix=0, key_mask=None, rpb=None):
    """Float64 neighbourhood attention, one query at a time. q, k, v (B, T, H, D)."""
    _, T, H, D = q.shape
    L = T - prefix
    h_, w_ = (1, L) if grid is None else grid
    out = torch.zeros_like(q)
    for i in range(T):
        if i < prefix:
            keys = list(range(T))
            bias = torch.zeros(H, T, dtype=q.dtype)
        else:
            r, c = divmod(i - prefix, w_)
            rows = [0] if grid is None else axis_neighbours(r, h_, kernel_size, dilation, causal)
            cols = axis_neighbours(c, w_, kernel_size, dilation, causal)
            pairs = [(rr, cc) for rr in rows for cc in cols]
            keys = list(range(prefix)) + [prefix + rr * w_ + cc for rr, cc in pairs]
            bias = torch.zeros(H, len(keys), dtype=q.dtype)
            if rpb is not None:
                for n, (rr, cc) in enumerate(pairs):
                    dc = (cc - c) // dilation + kernel_size - 1
                    if grid is None:
                        bias[:, prefix + n] = rpb[:, dc]
                    else:
                        bias[:, prefix + n] = rpb[:, (rr - r) // dilation + kernel_size - 1, dc]
        idx = torch.tensor(keys)
        scores = torch.einsum("bhd,bshd->bhs", q[:, i], k[:, idx]) * D**-0.5 + bias  # (B, H, n)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, idx], float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query with only padded keys: zeros
        out[:, i] = torch.einsum("bhs,bshd->bhd", weights, v[:, idx])
    return out


def real_span(row: list[bool]) -> tuple[int, int] | None:
    """(start, length) when the True entries of ``row`` are one contiguous run, else None (holes, or none real)."""
    real = [i for i, r in enumerate(row) if r]
    if not real or real[-1] - real[0] + 1 != len(real):
        return None
    return real[0], len(real)


def padded_oracle(q, k, v, *, key_mask, causal=False, **kw):
    """The oracle with a key padding mask: each row with one contiguous real span is that span run alone (non-causal;
    causal rows are translation invariant, so the padded-length oracle is already the same), the rest (padded
    queries, rows with holes) the padded-length oracle with the padded keys masked."""
    out = oracle(q, k, v, causal=causal, key_mask=key_mask, **kw)
    if causal:
        return out
    out = out.clone()
    for b, row in enumerate(key_mask.tolist()):
        span = real_span(row)
        if span is not None:
            s, n = span
            piece = slice(s, s + n)
            out[b : b + 1, piece] = oracle(q[b : b + 1, piece], k[b : b + 1, piece], v[b : b + 1, piece], **kw)
    return out


def span_mask(T: int, spans: list[tuple[int, int]]) -> torch.Tensor:
    """(B, T) key mask, True on positions start .. start + length - 1 of each row."""
    pos = torch.arange(T)
    return torch.stack([(pos >= s) & (pos < s + n) for s, n in spans])


def qkv(B, T, H, D, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, H, D, generator=gen, dtype=torch.float64).requires_grad_(requires_grad) for _ in "qkv"]


CASES_1D = [
    pytest.param(11, 3, 1, False, id="T11-k3"),
    pytest.param(13, 3, 4, False, id="T13-k3-d4"),
    pytest.param(70, 7, 3, False, id="T70-k7-d3"),  # not a multiple of the 64-block
    pytest.param(11, 2, 1, True, id="causal-T11-k2"),
    pytest.param(70, 5, 1, True, id="causal-T70-k5"),
    pytest.param(130, 4, 3, True, id="causal-T130-k4-d3"),
]


@pytest.mark.parametrize("T,kernel,dilation,causal", CASES_1D)
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_1d_equals_oracle(T, kernel, dilation, causal, backend):
    q, k, v = qkv(2, T, 2, 8)
    got = neighborhood_attention(q, k, v, kernel_size=kernel, dilation=dilation, causal=causal, backend=backend)
    ref = oracle(q, k, v, kernel_size=kernel, dilation=dilation, causal=causal)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("T", [12, 75, 80], ids=["T12-no-full-window", "T75", "T80"])
@pytest.mark.parametrize("block_size", [5, 16, None])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_causal_blocked_path_any_block_size(T, block_size, padded):
    """The blocked path (p = ceil(reach / b) previous blocks per query block, the first p blocks apart) equals the
    oracle for blocks smaller than the window, a sequence shorter than p blocks, and a partial last block."""
    q, k, v = qkv(2, T, 2, 4, seed=8)
    mask = None
    if padded:
        mask = torch.ones(2, T, dtype=torch.bool)
        mask[0, 1:4] = False
        mask[1, T // 2 :: 3] = False
    kw = dict(kernel_size=9, dilation=2, causal=True)
    got = neighborhood_attention(q, k, v, key_mask=mask, backend="blocked", block_size=block_size, **kw)
    torch.testing.assert_close(got, oracle(q, k, v, key_mask=mask, **kw), atol=1e-12, rtol=1e-10)


CASES_2D = [
    pytest.param((5, 7), 3, 1, 0, id="5x7-k3"),
    pytest.param((6, 9), 3, 2, 1, id="6x9-k3-d2-prefix1"),
    pytest.param((9, 10), 5, 1, 2, id="9x10-k5-prefix2"),
    pytest.param((7, 7), 7, 1, 1, id="7x7-k7-prefix1"),
]


@pytest.mark.parametrize("grid,kernel,dilation,prefix", CASES_2D)
def test_2d_with_bias_and_prefix_equals_oracle(grid, kernel, dilation, prefix):
    T = prefix + grid[0] * grid[1]
    q, k, v = qkv(2, T, 3, 8, seed=1)
    rpb = torch.randn(3, 2 * kernel - 1, 2 * kernel - 1, dtype=torch.float64)
    kw = dict(kernel_size=kernel, dilation=dilation)
    got = neighborhood_attention(q, k, v, grid_size=grid, num_prefix_tokens=prefix, rpb=rpb, backend="torch", **kw)
    ref = oracle(q, k, v, grid=grid, prefix=prefix, rpb=rpb, **kw)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-10)


def test_1d_bias_equals_oracle():
    q, k, v = qkv(1, 23, 2, 4, seed=2)
    rpb = torch.randn(2, 9, dtype=torch.float64)
    got = neighborhood_attention(q, k, v, kernel_size=5, dilation=2, rpb=rpb)
    torch.testing.assert_close(got, oracle(q, k, v, kernel_size=5, dilation=2, rpb=rpb), atol=1e-12, rtol=1e-10)


def test_borders_shift_the_window_inward():
    """Query 0 of a 1-D sequence with k = 5 sees keys 0..4 (not 0..2 as a truncated window); with d = 2 query 1
    sees 1, 3, 5, 7, 9; the centre query sees the symmetric window."""
    pattern = neighborhood_pattern(None, 20, 5, 1, False)
    mask = pattern.mask_mod(None, None, torch.arange(20)[:, None], torch.arange(20)[None, :])
    assert mask[0].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    assert mask[19].nonzero().flatten().tolist() == [15, 16, 17, 18, 19]
    assert mask[10].nonzero().flatten().tolist() == [8, 9, 10, 11, 12]
    dilated = neighborhood_pattern(None, 20, 5, 2, False).mask_mod(None, None, torch.tensor(1), torch.arange(20))
    assert dilated.nonzero().flatten().tolist() == [1, 3, 5, 7, 9]
    assert (mask.sum(-1) == 5).all()


def test_padded_axis_sees_its_whole_group():
    """pad_to_kernel: a 4x4 grid under a 7x7 kernel (NATTEN's module pads to 7x7): every query sees all 16."""
    q, k, v = qkv(2, 17, 2, 8, seed=3)
    got = neighborhood_attention(q, k, v, kernel_size=7, grid_size=(4, 4), num_prefix_tokens=1, pad_to_kernel=True)
    ref = oracle(q, k, v, kernel_size=7, grid=(4, 4), prefix=1)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-10)
    dense = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(got, dense, atol=1e-12, rtol=1e-10)
    q, k, v = qkv(1, 10, 1, 4, seed=4)  # 1-D, groups of 3 and 2 under k = 3, d = 4
    got = neighborhood_attention(q, k, v, kernel_size=3, dilation=4, pad_to_kernel=True)
    torch.testing.assert_close(got, oracle(q, k, v, kernel_size=3, dilation=4), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_padding_mask_equals_oracle(causal):
    """Row 0 has holes (the padded length's windows, holes masked); row 1 is left-padded (its span's windows)."""
    T = 75
    q, k, v = qkv(2, T, 2, 8, seed=5)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[0, [3, 4, 5, 40]] = False
    mask[1, :6] = False  # the first queries of a causal row see only padding: zeros
    kw = dict(kernel_size=5, dilation=1 if causal else 2, causal=causal)
    got = neighborhood_attention(q, k, v, key_mask=mask, **kw)
    torch.testing.assert_close(got, padded_oracle(q, k, v, key_mask=mask, **kw), atol=1e-12, rtol=1e-10)
    if not causal:  # row 1's last queries: the span's rule and the padded length's differ only at the left border
        assert not torch.allclose(got[1, 6:12], oracle(q, k, v, key_mask=mask, **kw)[1, 6:12])


# (T, spans): right, left and both-sided padding, spans shorter than kernel_size * dilation (pad_to_kernel: the
# whole dilation groups), a span of one token, and spans crossing the 64-blocks of the gathered-tile lowering
PADDED_BATCHES = [
    pytest.param(20, [(0, 20), (0, 13), (0, 5), (0, 1)], id="right"),
    pytest.param(20, [(7, 13), (15, 5), (3, 17), (19, 1)], id="left"),
    pytest.param(20, [(2, 11), (6, 4), (1, 18), (9, 2)], id="both"),
    pytest.param(150, [(0, 150), (0, 97), (61, 89), (40, 70)], id="T150-blocks"),
]


@pytest.mark.parametrize("T,spans", PADDED_BATCHES)
@pytest.mark.parametrize("kernel,dilation", [(3, 1), (7, 1), (3, 2), (7, 2)])
def test_padded_batch_equals_each_sequence_alone(T, spans, kernel, dilation):
    """Each real span of a padded batch gives what the same sequence alone gives (NATTEN's rule on L_b positions),
    float64, against the token-by-token oracle on the unpadded sequence and against the op on the sequence alone."""
    q, k, v = qkv(len(spans), T, 2, 8, seed=9)
    mask = span_mask(T, spans)
    kw = dict(kernel_size=kernel, dilation=dilation)
    got = neighborhood_attention(q, k, v, key_mask=mask, pad_to_kernel=True, **kw)
    for b, (s, n) in enumerate(spans):
        one = [t[b : b + 1, s : s + n] for t in (q, k, v)]
        torch.testing.assert_close(got[b : b + 1, s : s + n], oracle(*one, **kw), atol=1e-12, rtol=1e-10)
        alone = neighborhood_attention(*one, pad_to_kernel=True, **kw)
        torch.testing.assert_close(got[b : b + 1, s : s + n], alone, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got, padded_oracle(q, k, v, key_mask=mask, **kw), atol=1e-12, rtol=1e-10)


def test_padded_batch_with_prefix_token_equals_alone():
    """1-D with a prefix token: the span is taken over the sequence after the prefix."""
    T, spans, kw = 21, [(3, 10), (0, 20), (12, 4)], dict(kernel_size=5, dilation=2, num_prefix_tokens=1)
    q, k, v = qkv(len(spans), T, 2, 8, seed=13)
    mask = torch.cat([torch.ones(len(spans), 1, dtype=torch.bool), span_mask(T - 1, spans)], dim=1)
    got = neighborhood_attention(q, k, v, key_mask=mask, pad_to_kernel=True, **kw)
    for b, (s, n) in enumerate(spans):
        idx = torch.tensor([0, *range(1 + s, 1 + s + n)])
        one = [t[b : b + 1, idx] for t in (q, k, v)]
        ref = oracle(*one, kernel_size=5, dilation=2, prefix=1)
        torch.testing.assert_close(got[b : b + 1, idx], ref, atol=1e-12, rtol=1e-10)


def test_padded_batch_with_bias_and_gradients_equal_alone():
    """The relative position bias (group offsets are translation invariant) and the gradients at the real span."""
    T, spans, kernel, dilation = 30, [(0, 30), (4, 19), (0, 9)], 5, 2
    q, k, v = qkv(len(spans), T, 2, 4, seed=10, requires_grad=True)
    rpb = torch.randn(2, 2 * kernel - 1, dtype=torch.float64, requires_grad=True)
    mask = span_mask(T, spans)
    kw = dict(kernel_size=kernel, dilation=dilation, rpb=rpb, pad_to_kernel=True)
    weight = torch.randn(len(spans), T, 2, 4, dtype=torch.float64) * mask[..., None, None]  # real queries only
    got = torch.autograd.grad((neighborhood_attention(q, k, v, key_mask=mask, **kw) * weight).sum(), [q, k, v, rpb])
    ref = [torch.zeros_like(t) for t in (q, k, v, rpb)]
    for b, (s, n) in enumerate(spans):
        one = [t[b : b + 1, s : s + n] for t in (q, k, v)]
        out = oracle(*one, kernel_size=kernel, dilation=dilation, rpb=rpb)
        grads = torch.autograd.grad((out * weight[b : b + 1, s : s + n]).sum(), [q, k, v, rpb])
        ref = [r + g for r, g in zip(ref, grads)]
    for name, g, r in zip(["dq", "dk", "dv", "drpb"], got, ref):
        torch.testing.assert_close(g, r, atol=1e-11, rtol=1e-9, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dilation", [1, 3])
def test_causal_padded_batch_equals_alone(dilation):
    """Causal windows never look right and their groups are lags of d: left or both-sided padding changes nothing
    for the real span, on the blocked path and the gathered-tile lowering."""
    T, spans = 40, [(0, 40), (11, 29), (5, 20), (0, 6)]
    q, k, v = qkv(len(spans), T, 2, 8, seed=11)
    mask = span_mask(T, spans)
    kw = dict(kernel_size=5, dilation=dilation, causal=True)
    for backend in ("blocked", "torch"):
        got = neighborhood_attention(q, k, v, key_mask=mask, backend=backend, **kw)
        for b, (s, n) in enumerate(spans):
            one = [t[b : b + 1, s : s + n] for t in (q, k, v)]
            torch.testing.assert_close(got[b : b + 1, s : s + n], oracle(*one, **kw), atol=1e-12, rtol=1e-10)


def test_sequence_spans():
    from attnzoo.layers.neighborhood import sequence_spans

    mask = span_mask(10, [(0, 10), (0, 4), (6, 4), (2, 5), (3, 1)])
    holes = torch.tensor([[True, False, True] + [True] * 7, [False] * 10])  # a hole; nothing real
    start, length = sequence_spans(torch.cat([mask, holes]))
    assert start.tolist() == [0, 0, 6, 2, 3, 0, 0]
    assert length.tolist() == [10, 4, 4, 5, 1, 10, 10]  # no single span: the padded length's rule


@pytest.mark.parametrize(
    "kw",
    [
        pytest.param(dict(kernel_size=3, dilation=2, grid_size=(6, 7), num_prefix_tokens=1, bias=True), id="2d"),
        pytest.param(dict(kernel_size=4, dilation=2, causal=True), id="causal-blocked"),
        pytest.param(dict(kernel_size=5, dilation=1, causal=True, backend="torch"), id="causal-torch"),
    ],
)
def test_gradients_equal_oracle(kw):
    kw = dict(kw)
    bias = kw.pop("bias", False)
    grid, prefix = kw.get("grid_size"), kw.get("num_prefix_tokens", 0)
    T = prefix + (grid[0] * grid[1] if grid else 67)
    q, k, v = qkv(1, T, 2, 4, seed=6, requires_grad=True)
    k_size = kw["kernel_size"]
    rpb = torch.randn(2, 2 * k_size - 1, 2 * k_size - 1, dtype=torch.float64, requires_grad=True) if bias else None
    weight = torch.randn(1, T, 2, 4, dtype=torch.float64)
    inputs = [q, k, v] + ([rpb] if bias else [])
    got = torch.autograd.grad((neighborhood_attention(q, k, v, rpb=rpb, **kw) * weight).sum(), inputs)
    kw.pop("backend", None)
    ref_out = oracle(
        q, k, v, kernel_size=k_size, dilation=kw["dilation"], causal=kw.get("causal", False), grid=grid,
        prefix=prefix, rpb=rpb,
    )  # fmt: skip
    ref = torch.autograd.grad((ref_out * weight).sum(), inputs)
    for name, g, r in zip(["dq", "dk", "dv", "drpb"], got, ref):
        torch.testing.assert_close(g, r, atol=1e-11, rtol=1e-9, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(
    "grid,length,kernel,dilation,causal,prefix",
    [
        ((6, 9), 54, 3, 2, False, 1),
        (None, 200, 7, 3, False, 0),
        (None, 300, 9, 2, True, 0),
        ((20, 12), 240, 5, 1, False, 3),
    ],
)
def test_kv_blocks_cover_the_mask(grid, length, kernel, dilation, causal, prefix):
    pattern = neighborhood_pattern(grid, length, kernel, dilation, causal, prefix, block_size=16)
    check_kv_blocks(pattern)


@pytest.mark.parametrize("kernel,dilation", [(7, 3), (9, 1), (5, 4)])
def test_kv_blocks_cover_the_per_sequence_windows(kernel, dilation):
    """The band (no widening) covers every span's windows, and the padded queries' full-length ones."""
    from attnzoo.layers.neighborhood import sequence_spans

    T = 100
    mask = span_mask(T, [(0, 100), (0, 37), (23, 77), (17, 50), (40, 11), (99, 1), (50, 5)])
    mask = torch.cat([mask, torch.zeros(1, T, dtype=torch.bool)])
    spans = sequence_spans(mask)
    pattern = neighborhood_pattern(None, T, kernel, dilation, False, spans=spans, block_size=16)
    check_kv_blocks(pattern, batch_size=mask.shape[0])


@pytest.mark.parametrize("dilation", [1, 2])
def test_prefill_then_step_equals_full(dilation):
    torch.manual_seed(0)
    layer = build_attention("neighborhood", dim=16, num_heads=2, causal=True, kernel_size=4, dilation=dilation)
    layer = layer.double().eval()
    x = torch.randn(2, 30, 16, dtype=torch.float64)
    full = layer(x)
    cache = layer.new_cache(2)
    parts = [layer(x[:, :9], cache=cache)] + [layer(x[:, t : t + 1], cache=cache) for t in range(9, 20)]
    parts.append(layer(x[:, 20:], cache=cache))  # a 10-token chunk after steps
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-12, rtol=1e-10)
    assert cache.keys.shape[1] == 3 * dilation  # constant size: (kernel_size - 1) * dilation keys
    assert layer.state_size(30) == 2 * 3 * dilation * 16


def _has_flex() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_flex(), reason="torch.nn.attention.flex_attention is not available")
@pytest.mark.parametrize(
    "kw,T",
    [
        (dict(kernel_size=3, dilation=2, grid_size=(6, 9), num_prefix_tokens=1), 55),
        (dict(kernel_size=5, dilation=3, causal=True), 70),
        (dict(kernel_size=7, dilation=1), 40),
    ],
)
def test_flex_forward_equals_torch_lowering(kw, T):
    q, k, v = (t.float() for t in qkv(2, T, 2, 16, seed=7))
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, [2, 30]] = False
    rpb = torch.randn(2, 2 * kw["kernel_size"] - 1, 2 * kw["kernel_size"] - 1) if "grid_size" in kw else None
    with torch.no_grad():
        flex = neighborhood_attention(q, k, v, key_mask=mask, rpb=rpb, backend="flex", **kw)
        ref = neighborhood_attention(q, k, v, key_mask=mask, rpb=rpb, backend="torch", **kw)
    torch.testing.assert_close(flex, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not _has_flex(), reason="torch.nn.attention.flex_attention is not available")
@pytest.mark.parametrize("dilation", [1, 2])
def test_flex_per_sequence_windows_equal_torch_lowering(dilation):
    """The spans reach FlexAttention's mask_mod as (B,) tensors indexed by b: same outputs as the gathered tiles."""
    T, spans = 150, [(0, 150), (0, 9), (61, 89), (20, 70)]
    q, k, v = (t.float() for t in qkv(len(spans), T, 2, 16, seed=12))
    mask = span_mask(T, spans)
    rpb = torch.randn(2, 13)
    kw = dict(kernel_size=7, dilation=dilation, key_mask=mask, rpb=rpb, pad_to_kernel=True)
    with torch.no_grad():
        flex = neighborhood_attention(q, k, v, backend="flex", **kw)
        ref = neighborhood_attention(q, k, v, backend="torch", **kw)
    real = mask[..., None, None]
    torch.testing.assert_close(flex * real, ref * real, atol=1e-5, rtol=1e-5)


def test_layer_2d_grid_and_bias_default():
    layer = build_attention("neighborhood", dim=16, num_heads=2, grid_size=(5, 6), num_prefix_tokens=1)
    assert layer.rpb.shape == (2, 13, 13)  # NAT: bias on the grid by default
    assert layer(torch.randn(2, 31, 16)).shape == (2, 31, 16)
    assert build_attention("neighborhood", dim=16, num_heads=2).rpb is None  # 1-D: off
    assert build_attention("neighborhood", dim=16, num_heads=2, causal=True).rpb is None


def test_errors_are_clear():
    q, k, v = qkv(1, 11, 1, 4)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        build_attention("neighborhood", dim=16, num_heads=2, kernel_size=6)
    with pytest.raises(ValueError, match="kernel_size must be an integer >= 2"):
        build_attention("neighborhood", dim=16, num_heads=2, causal=True, kernel_size=1)
    with pytest.raises(ValueError, match="dilation must be an integer >= 1"):
        build_attention("neighborhood", dim=16, num_heads=2, dilation=0)
    with pytest.raises(ValueError, match="dilation must be an integer >= 1"):
        neighborhood_attention(q, k, v, kernel_size=3, dilation=1.5)
    with pytest.raises(ValueError, match=r"kernel_size \* dilation = 3 \* 4 = 12 exceeds the sequence length 11"):
        neighborhood_attention(q, k, v, kernel_size=3, dilation=4)
    q2, k2, v2 = qkv(1, 20, 1, 4)
    with pytest.raises(ValueError, match=r"= 5 exceeds the grid \(4, 5\)"):
        neighborhood_attention(q2, k2, v2, kernel_size=5, grid_size=(4, 5))
    with pytest.raises(ValueError, match="causal neighborhoods are 1-D"):
        build_attention("neighborhood", dim=16, num_heads=2, causal=True, grid_size=(4, 4))
    with pytest.raises(ValueError, match="rel_pos_bias=True is undefined for causal"):
        build_attention("neighborhood", dim=16, num_heads=2, causal=True, rel_pos_bias=True)
    with pytest.raises(ValueError, match="unknown backend 'flx'"):
        neighborhood_attention(q, k, v, kernel_size=3, backend="flx")


@pytest.mark.parametrize(
    "options,keys_per_query",
    [
        (dict(causal=True, kernel_size=9), 2 * 64),  # blocked path: own + previous 64-block
        (dict(kernel_size=5, grid_size=(64, 16)), 5 * 64),  # band of 4 rows + 15 columns each side: 5 key blocks
    ],
    ids=["causal-blocked", "2d-grid"],
)
def test_no_op_builds_a_T_by_T_tensor(options, keys_per_query):
    """Forward and backward at T = 1024: the largest tensor holds T x (keys a query block reads) per head."""
    T, heads = 1024, 4
    layer = build_attention("neighborhood", dim=32, num_heads=heads, **options)
    x = torch.randn(1, T, 32, requires_grad=True)
    with LargestTensor() as spy:
        layer(x).sum().backward()
    assert spy.numel <= heads * T * keys_per_query < heads * T * T / 3
