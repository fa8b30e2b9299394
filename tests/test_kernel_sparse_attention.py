"""The block-sparse attention op (kernels/sparse_attention): every backend against a float64 dense oracle.

The oracle is written here from the definition: evaluate the pattern's mask on every (query, key) pair, AND the key
padding mask, softmax over the visible keys in float64, zero for a query that sees no key. Band patterns are also
checked against a plain-Python predicate of the band, so a wrong ``mask_mod`` cannot agree with itself.
"""

import pytest
import torch
from conftest import LargestTensor

from attnzoo.kernels.sparse_attention import (
    BlockPattern,
    band_kv_blocks,
    band_pattern,
    check_kv_blocks,
    dense_mask,
    num_blocks,
    sparse_attention,
)

BACKENDS = ("torch", "reference")


def oracle(q, k, v, mask, key_mask=None, bias=None, scale=None):
    """float64 masked softmax attention; mask (B|1, H|1, T, S) bool, bias broadcastable to (B, H, T, S)."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale
    if bias is not None:
        scores = scores + bias.double()
    mask = mask.expand_as(scores)
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :]
    out = torch.zeros(*scores.shape[:3], v.shape[-1], dtype=torch.float64)
    for b in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            for i in range(scores.shape[2]):
                visible = mask[b, h, i].nonzero().flatten()
                if len(visible):
                    weights = torch.softmax(scores[b, h, i, visible], dim=0)
                    out[b, h, i] = weights @ v[b, visible, h]
    return out.transpose(1, 2)  # (B, T, H, Dv)


def band_predicate(T, S, before, after, dilation, causal):
    """The band written as a plain loop: query i aligned with key i + S - T (bottom-right)."""
    mask = torch.zeros(T, S, dtype=torch.bool)
    for i in range(T):
        for j in range(S):
            offset = j - (i + S - T)
            upper = 0 if causal else after * dilation
            mask[i, j] = -before * dilation <= offset <= upper and offset % dilation == 0
    return mask[None, None]


def qkv(B=2, T=37, S=None, H=2, D=8, Dv=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = T if S is None else S
    q = torch.randn(B, T, H, D, generator=g, dtype=dtype)
    k = torch.randn(B, S, H, D, generator=g, dtype=dtype)
    v = torch.randn(B, S, H, Dv or D, generator=g, dtype=dtype)
    return q, k, v


BANDS = [  # (T, S, before, after, dilation, causal, block_size)
    (37, 37, 7, 0, 1, True, 8),  # causal sliding window of 8, partial last block
    (37, 37, 3, 5, 1, False, 16),  # asymmetric non-causal band
    (40, 40, 4, 4, 3, False, 8),  # dilated
    (33, 33, 5, 0, 2, True, 8),  # dilated causal
    (12, 40, 6, 0, 1, True, 8),  # S > T: bottom-right alignment
    (40, 12, 2, 2, 1, False, 4),  # S < T: early queries see nothing
    (20, 20, 30, 30, 1, False, 64),  # band wider than the sequence = full attention, one block
]


@pytest.mark.parametrize("band", BANDS, ids=lambda b: "T{}_S{}_b{}_a{}_d{}_c{}_bs{}".format(*b))
def test_band_mask_mod_is_the_band(band):
    T, S, before, after, dilation, causal, block_size = band
    pattern = band_pattern(T, S, before, after, dilation=dilation, causal=causal, block_size=block_size)
    assert torch.equal(dense_mask(pattern), band_predicate(T, S, before, after, dilation, causal))
    check_kv_blocks(pattern)  # every allowed pair lies in a listed key block


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("band", BANDS, ids=lambda b: "T{}_S{}_b{}_a{}_d{}_c{}_bs{}".format(*b))
def test_band_attention_matches_float64_oracle(band, backend):
    T, S, before, after, dilation, causal, block_size = band
    q, k, v = qkv(T=T, S=S, Dv=5)
    pattern = band_pattern(T, S, before, after, dilation=dilation, causal=causal, block_size=block_size)
    expected = oracle(q, k, v, band_predicate(T, S, before, after, dilation, causal))
    got = sparse_attention(q, k, v, pattern, backend=backend)
    assert got.shape == (2, T, 2, 5)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("band", BANDS[:5], ids=lambda b: "T{}_S{}_b{}_a{}_d{}_c{}_bs{}".format(*b))
def test_torch_backend_gradients_match_oracle(band):
    T, S, before, after, dilation, causal, block_size = band
    q, k, v = (t.requires_grad_() for t in qkv(B=1, T=T, S=S))
    pattern = band_pattern(T, S, before, after, dilation=dilation, causal=causal, block_size=block_size)
    grad_out = torch.randn(1, T, 2, 8, dtype=torch.float64)
    got = torch.autograd.grad((sparse_attention(q, k, v, pattern, backend="torch") * grad_out).sum(), (q, k, v))
    mask = band_predicate(T, S, before, after, dilation, causal)
    expected = torch.autograd.grad((oracle(q, k, v, mask) * grad_out).sum(), (q, k, v))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_mask_hides_padded_keys_and_fully_masked_queries_get_zero(backend):
    T = 24
    q, k, v = (t.requires_grad_() for t in qkv(T=T))
    key_mask = torch.ones(2, T, dtype=torch.bool)
    key_mask[0, 5:] = False  # sequence 0: only keys 0..4 are real
    key_mask[1, :9] = False  # sequence 1: the first 9 keys are padding
    pattern = band_pattern(T, T, 3, 0, causal=True, block_size=8)  # window of 4: queries 0..8 of seq 1 see nothing
    out = sparse_attention(q, k, v, pattern, key_mask=key_mask, backend=backend)
    expected = oracle(q, k, v, band_predicate(T, T, 3, 0, 1, True), key_mask=key_mask)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert torch.all(out[1, :9] == 0) and torch.all(out[0, 9:] == 0)  # no visible real key -> exactly zero
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.all(k.grad[0, 5:] == 0) and torch.all(v.grad[1, :9] == 0)  # padded keys get no gradient

    # changing what sits under the padding changes nothing
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[~key_mask], v2[~key_mask] = 1e3, -1e3
    again = sparse_attention(q.detach(), k2, v2, pattern, key_mask=key_mask, backend=backend)
    torch.testing.assert_close(again, out.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_mod_adds_a_relative_position_bias(backend):
    T, H = 30, 3
    q, k, v = qkv(T=T, H=H)
    table = torch.randn(H, 2 * T - 1, dtype=torch.float64)

    def bias_mod(b, h, q_idx, kv_idx):
        return table[h, kv_idx - q_idx + T - 1]

    pattern = band_pattern(T, T, 4, 4, block_size=8)
    offsets = torch.arange(T)[None, :] - torch.arange(T)[:, None]
    bias = table[:, offsets + T - 1][None]  # (1, H, T, T)
    expected = oracle(q, k, v, band_predicate(T, T, 4, 4, 1, False), bias=bias, scale=0.3)
    got = sparse_attention(q, k, v, pattern, bias_mod=bias_mod, scale=0.3, backend=backend)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def routed_pattern(B, H, T, block_size, top, seed=0):
    """Data-dependent routing (BiFormer-like): every (sequence, head, query block) picks its own key blocks."""
    n = num_blocks(T, block_size)
    g = torch.Generator().manual_seed(seed)
    chosen = torch.rand(B, H, n, n, generator=g).argsort(dim=-1)[..., :top]  # (B, H, n, top), distinct blocks
    chosen[..., -1] = torch.where(torch.rand(B, H, n, generator=g) < 0.3, -1, chosen[..., -1])  # some unused slots
    allowed = torch.zeros(B, H, n, n + 1, dtype=torch.bool)
    allowed.scatter_(-1, torch.where(chosen < 0, n, chosen), True)
    allowed = allowed[..., :n]

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed[b, h % H, q_idx // block_size, kv_idx // block_size]  # H = 1: one routing for every head

    dense = allowed.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)[..., :T, :T]
    return BlockPattern(mask_mod, T, T, block_size, chosen), dense


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sequence_kv_blocks(backend):
    B, H, T, bs = 2, 3, 29, 4
    q, k, v = (t.requires_grad_() for t in qkv(B=B, T=T, H=H))
    pattern, dense = routed_pattern(B, H, T, bs, top=3)
    check_kv_blocks(pattern, B, H)
    got = sparse_attention(q, k, v, pattern, backend=backend)
    expected = oracle(q, k, v, dense)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


def test_per_sequence_kv_blocks_broadcast_over_heads():
    B, H, T, bs = 2, 3, 16, 4
    q, k, v = qkv(B=B, T=T, H=H)
    pattern, dense = routed_pattern(B, 1, T, bs, top=2)
    got = sparse_attention(q, k, v, pattern, backend="torch")
    torch.testing.assert_close(got, oracle(q, k, v, dense), rtol=1e-10, atol=1e-10)


def _has_flex() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_flex(), reason="this torch has no FlexAttention")
@pytest.mark.parametrize("case", ["band", "dilated_cross", "key_mask_bias", "routed"])
def test_flex_lowering_equals_torch_lowering_on_cpu_forward(case):
    """FlexAttention runs eagerly (forward only) on the CPU: the CUDA lowering is checked against the CPU one here.

    Eager FlexAttention evaluates mask_mod on every pair and does not skip unlisted blocks (measured: dropping a
    needed block from the BlockMask leaves its output unchanged), so this checks the mask, padding and score
    lowering; which blocks the compiled kernel visits is checked on ``coarse_kv_blocks`` directly (below)."""
    torch.manual_seed(0)
    B, H, T, S = 2, 2, 48, 48
    key_mask, bias_mod = None, None
    if case == "band":
        pattern = band_pattern(T, S, 15, 0, causal=True, block_size=16)
    elif case == "dilated_cross":
        S = 80
        pattern = band_pattern(T, S, 6, 2, dilation=2, block_size=16)
    elif case == "key_mask_bias":
        pattern = band_pattern(T, S, 8, 8, block_size=16)
        key_mask = torch.rand(B, S) > 0.3
        key_mask[:, 0] = True

        def bias_mod(b, h, q_idx, kv_idx):
            return (kv_idx - q_idx).float() * 0.05 * (h + 1)
    else:
        pattern, _ = routed_pattern(B, H, T, 16, top=2)
    q, k, v = qkv(B=B, T=T, S=S, H=H, D=16, dtype=torch.float32)
    with torch.no_grad():
        got = sparse_attention(q, k, v, pattern, key_mask=key_mask, bias_mod=bias_mod, backend="flex")
        expected = sparse_attention(q, k, v, pattern, key_mask=key_mask, bias_mod=bias_mod, backend="torch")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_auto_picks_torch_on_cpu_so_training_has_a_backward():
    q, k, v = (t.requires_grad_() for t in qkv(T=16))
    pattern = band_pattern(16, 16, 3, 0, causal=True, block_size=8)
    sparse_attention(q, k, v, pattern).sum().backward()  # backend="auto"
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_dtypes_follow_the_values():
    pattern = band_pattern(20, 20, 4, 0, causal=True, block_size=8)
    expected = None
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = qkv(T=20, dtype=dtype)
        out = sparse_attention(q, k, v, pattern, backend="torch")
        assert out.dtype == dtype
        if expected is None:
            expected = oracle(q, k, v, band_predicate(20, 20, 4, 0, 1, True))
        tol = 1e-5 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def test_banded_cost_grows_with_window_not_with_t_squared():
    """No op of the torch lowering, forward or backward, produces a T x S tensor for a banded pattern."""
    T, window, bs = 4096, 64, 64
    q, k, v = (t.requires_grad_() for t in qkv(B=1, T=T, H=1, D=8, dtype=torch.float32))
    pattern = band_pattern(T, T, window - 1, 0, causal=True, block_size=bs)
    with LargestTensor() as probe:
        sparse_attention(q, k, v, pattern, backend="torch").sum().backward()
    assert probe.numel <= 3 * T * bs  # tiles of (T/bs) x bs x (2 bs) scores: 2 T bs, far below T^2 = 64 T bs
    assert probe.numel < T * T // 16


def test_band_kv_blocks_lists_only_what_the_band_needs():
    blocks = band_kv_blocks(64, 64, 16, -15, 0)  # causal window 16, blocks of 16
    assert blocks.tolist() == [[0, -1], [0, 1], [1, 2], [2, 3]]
    assert band_kv_blocks(8, 64, 16, -3, 0).tolist() == [[3, -1]]  # bottom-right: the 8 queries see keys 53..63
    assert band_kv_blocks(32, 8, 8, 0, 0).tolist() == [[-1], [-1], [-1], [0]]  # S < T: the first 24 queries see none


@pytest.mark.parametrize(
    "T,S,lo,hi,bs", [(50, 50, -7, 3, 8), (13, 70, -20, 0, 16), (70, 13, -2, 2, 4), (9, 9, 0, 0, 2)]
)
def test_band_kv_blocks_cover_exactly_the_touched_blocks(T, S, lo, hi, bs):
    """Each listed block holds a band pair of its query block; each touched block is listed (no waste, no miss)."""
    blocks = band_kv_blocks(T, S, bs, lo, hi)
    for n in range(num_blocks(T, bs)):
        queries = range(n * bs, min(T, n * bs + bs))
        touched = {j // bs for i in queries for j in range(S) if lo <= j - (i + S - T) <= hi}
        assert {b for b in blocks[n].tolist() if b >= 0} == touched


def test_check_kv_blocks_reports_a_missing_block():
    good = band_pattern(32, 32, 9, 0, causal=True, block_size=8)
    narrow = BlockPattern(good.mask_mod, 32, 32, 8, good.kv_blocks[:, -1:])  # drops the previous block
    with pytest.raises(ValueError, match=r"kv_blocks misses allowed pairs.*query 0 \(block 0 of 4\) may attend key 0"):
        check_kv_blocks(narrow)


def test_bad_patterns_are_rejected_with_the_fix():
    mask_mod = band_pattern(16, 16, 1, 1, block_size=4).mask_mod
    with pytest.raises(ValueError, match="same key block twice"):
        BlockPattern(mask_mod, 16, 16, 4, torch.tensor([[0, 0], [1, 2], [2, 3], [3, -1]]))
    with pytest.raises(ValueError, match=r"key block indices in \[0, 4\)"):
        BlockPattern(mask_mod, 16, 16, 4, torch.tensor([[0], [1], [2], [4]]))
    with pytest.raises(ValueError, match=r"num_q_blocks = ceil\(q_len / block_size\)"):
        BlockPattern(mask_mod, 16, 16, 4, torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        BlockPattern(mask_mod, 16, 16, 4, torch.zeros(4, 1))
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        BlockPattern(mask_mod, 16, 16, 0, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="mask_mod must be callable"):
        BlockPattern(None, 16, 16, 4, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="before must be an int >= 0"):
        band_pattern(16, 16, -1, 0)
    with pytest.raises(ValueError, match="dilation must be a positive int"):
        band_pattern(16, 16, 1, 1, dilation=0)
    with pytest.raises(ValueError, match="min_offset=3 must be <= max_offset=1"):
        band_kv_blocks(16, 16, 4, 3, 1)


def test_bad_calls_name_the_problem_and_the_fix():
    q, k, v = qkv(T=16)
    pattern = band_pattern(16, 16, 3, 0, causal=True, block_size=8)
    with pytest.raises(ValueError, match=r"unknown backend 'triton'.*torch"):
        sparse_attention(q, k, v, pattern, backend="triton")
    with pytest.raises(ValueError, match=r"FlexAttention has no backward off CUDA.*backend='torch'"):
        sparse_attention(q.requires_grad_(), k, v, pattern, backend="flex")
    with pytest.raises(ValueError, match="no attention dropout"):
        sparse_attention(q.detach(), k, v, pattern, dropout_p=0.1, backend="flex")
    with pytest.raises(ValueError, match=r"built for q_len=16, kv_len=16, but q has T=16 and k has S=12"):
        sparse_attention(q, k[:, :12], v[:, :12], pattern)
    with pytest.raises(ValueError, match=r"k must have shape \(B, S, H, D\)"):
        sparse_attention(q, k[..., :4], v, pattern)
    with pytest.raises(ValueError, match=r"v must have shape"):
        sparse_attention(q, k, v[:, :, :1], pattern)
    with pytest.raises(ValueError, match="4-D floating-point"):
        sparse_attention(q[0], k, v, pattern)
    with pytest.raises(ValueError, match=r"key_mask must be a bool tensor of shape \(B, S\) = \(2, 16\)"):
        sparse_attention(q, k, v, pattern, key_mask=torch.ones(2, 16))
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        sparse_attention(q, k, v, pattern, dropout_p=1.0)
    with pytest.raises(TypeError, match="pattern must be a BlockPattern"):
        sparse_attention(q, k, v, "causal")


def test_dropout_is_applied_in_the_torch_backend():
    q, k, v = qkv(T=32, dtype=torch.float32)
    pattern = band_pattern(32, 32, 7, 0, causal=True, block_size=8)
    torch.manual_seed(0)
    plain = sparse_attention(q, k, v, pattern, backend="torch")
    dropped = sparse_attention(q, k, v, pattern, dropout_p=0.5, backend="torch")
    assert not torch.allclose(plain, dropped)
    # averaged over many draws, dropout is unbiased
    mean = torch.stack([sparse_attention(q, k, v, pattern, dropout_p=0.5, backend="torch") for _ in range(400)]).mean(0)
    assert (mean - plain).abs().mean() < 0.1 * plain.abs().mean()


def _listed_pairs(pattern, B=1, H=1):
    """(B|1, H|1, T, S) bool: the (query, key) pairs inside the listed key blocks of each query block."""
    blocks = pattern.kv_blocks if pattern.kv_blocks.dim() == 4 else pattern.kv_blocks[None, None]
    nkb, bs = pattern.num_kv_blocks, pattern.block_size
    listed = torch.zeros(*blocks.shape[:-1], nkb + 1, dtype=torch.bool)
    listed.scatter_(-1, torch.where(blocks < 0, nkb, blocks), True)
    listed = listed[..., :nkb].repeat_interleave(bs, -2).repeat_interleave(bs, -1)
    return listed[..., : pattern.q_len, : pattern.kv_len]


@pytest.mark.parametrize("block_size", [16, 24, 48, 128, 256])
@pytest.mark.parametrize("kind", ["band", "cross", "routed"])
def test_flex_reblocking_covers_exactly_the_coarse_blocks_the_pattern_touches(block_size, kind):
    """The BlockMask grid is a multiple of the compiled kernel's tile (128): a coarse block is listed iff it overlaps
    a listed fine block pair."""
    from attnzoo.kernels.sparse_attention.flex import coarse_kv_blocks, flex_block_size

    T, S = 300, (420 if kind == "cross" else 300)
    if kind == "routed":
        pattern, _ = routed_pattern(2, 3, T, block_size, top=2)
    else:
        pattern = band_pattern(T, S, 40, 7, dilation=2 if kind == "cross" else 1, block_size=block_size)
    coarse = flex_block_size(block_size)
    assert coarse % 128 == 0 and (coarse == block_size or block_size % 128)
    kv_num, kv_indices = coarse_kv_blocks(pattern, coarse)
    fine = _listed_pairs(pattern)
    nqc, nkc = num_blocks(T, coarse), num_blocks(S, coarse)
    padded = torch.zeros(*fine.shape[:2], nqc * coarse, nkc * coarse, dtype=torch.bool)
    padded[..., :T, :S] = fine
    expected = padded.view(*fine.shape[:2], nqc, coarse, nkc, coarse).any(3).any(-1)  # (B|1, H|1, nqc, nkc)
    assert torch.equal(kv_num, expected.sum(-1).int())
    for index in torch.cartesian_prod(*(torch.arange(n) for n in expected.shape[:3])).tolist():
        listed = kv_indices[tuple(index)][: kv_num[tuple(index)]].tolist()
        assert listed == expected[tuple(index)].nonzero().flatten().tolist()  # listed first, in order


@pytest.mark.skipif(not _has_flex(), reason="this torch has no FlexAttention")
@pytest.mark.parametrize("block_size", [24, 48, 256])
def test_flex_lowering_with_reblocking_equals_torch_lowering(block_size):
    torch.manual_seed(1)
    B, H, T, S = 1, 2, 300, 340
    pattern = band_pattern(T, S, 30, 5, dilation=3, block_size=block_size)
    key_mask = torch.rand(B, S) > 0.2
    q, k, v = qkv(B=B, T=T, S=S, H=H, D=16, dtype=torch.float32)
    with torch.no_grad():
        got = sparse_attention(q, k, v, pattern, key_mask=key_mask, backend="flex")
        expected = sparse_attention(q, k, v, pattern, key_mask=key_mask, backend="torch")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
