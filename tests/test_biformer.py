"""BiFormer bi-level routing attention against a float64 oracle written token by token from the paper's definition."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnzoo.layers import build_attention
from attnzoo.models.vit import ViT

DIM, HEADS = 16, 2


def oracle(layer, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Naive BiFormer: regions from grid coordinates, region means over real tokens, top-k routing, then an explicit
    softmax per (query token, head) over the real tokens of the routed regions and the prefix tokens, plus LCE."""
    B, T, C = x.shape
    H, D, P = layer.num_heads, layer.head_dim, layer.num_prefix_tokens
    h, w = layer.grid_size if layer.grid_size is not None else (1, T - P)
    side = [math.ceil(s / min(layer.n_win, s)) for s in (h, w)]  # region side per axis
    per_row = math.ceil(w / side[1])
    region_of = torch.tensor([(r // side[0]) * per_row + c // side[1] for r in range(h) for c in range(w)])
    R = math.ceil(h / side[0]) * per_row
    real = torch.ones(B, T, dtype=torch.bool) if padding_mask is None else padding_mask
    q, k, v = layer.qkv(x).view(B, T, 3, C).unbind(2)
    v = v * real[..., None]
    out = torch.zeros(B, T, C, dtype=x.dtype)
    for b in range(B):
        grid_real = real[b, P:]
        means = []
        for t in (q[b, P:].detach(), k[b, P:].detach()):
            members = [(region_of == r) & grid_real for r in range(R)]
            means.append(torch.stack([t[m].sum(0) / max(1, int(m.sum())) for m in members]))
        count = torch.stack([((region_of == r) & grid_real).sum() for r in range(R)])
        affinity = (means[0] * layer.scale) @ means[1].T
        affinity = affinity.masked_fill((count == 0)[None, :], float("-inf"))
        routed = affinity.topk(min(layer.topk, R), dim=-1).indices  # (R, k)
        for i in range(T):
            if i < P:
                keys = real[b].nonzero().flatten()  # prefix queries attend globally
            else:
                chosen = torch.isin(region_of, routed[region_of[i - P]]) & grid_real
                keys = torch.cat([real[b, :P].nonzero().flatten(), P + chosen.nonzero().flatten()])
            if len(keys) == 0:
                continue
            for head in range(H):
                cols = slice(head * D, (head + 1) * D)
                weights = torch.softmax(layer.scale * k[b, keys, cols] @ q[b, i, cols], dim=0)
                out[b, i, cols] = weights @ v[b, keys, cols]
    if layer.lepe is not None:  # LCE: depthwise conv of V laid out as the image, on grid tokens only
        image = v[:, P:].transpose(1, 2).reshape(B, C, h, w)
        if layer.grid_size is None:
            lce = F.conv1d(image[:, :, 0], layer.lepe.weight, layer.lepe.bias, padding="same", groups=C)
        else:
            lce = F.conv2d(image, layer.lepe.weight, layer.lepe.bias, padding="same", groups=C)
        out[:, P:] = out[:, P:] + lce.flatten(2).transpose(1, 2)
    return layer.proj(out)


def make(grid, seed=0, **options):
    torch.manual_seed(seed)
    layer = build_attention("biformer", dim=DIM, num_heads=HEADS, grid_size=grid, **options).double().eval()
    torch.nn.init.normal_(layer.lepe.weight) if layer.lepe is not None else None
    return layer


CASES = [  # (grid, n_win, topk, side_dwconv, prefix)
    ((8, 8), 4, 2, 5, 0),  # 16 regions of 2x2, a multiple of n_win
    ((8, 8), 2, 1, 3, 1),  # 4 regions of 4x4, one routed region, a class token
    ((7, 7), 7, 4, 5, 0),  # one-token regions (BiFormer's stage-4 layout)
    ((9, 6), 4, 3, 5, 2),  # region side 3 x 2, the last row of regions padded; two prefix tokens
    ((3, 10), 4, 5, 0, 1),  # fewer rows than n_win; topk > regions is clamped; no LCE
    (None, 4, 2, 3, 0),  # 1-D sequence: 4 regions of consecutive tokens, 1-D LCE
    (None, 3, 1, 5, 1),
]


@pytest.mark.parametrize("grid,n_win,topk,side_dwconv,prefix", CASES, ids=lambda v: str(v))
def test_matches_float64_oracle(grid, n_win, topk, side_dwconv, prefix):
    layer = make(grid, n_win=n_win, topk=topk, side_dwconv=side_dwconv, num_prefix_tokens=prefix)
    T = prefix + (grid[0] * grid[1] if grid else 21)
    x = torch.randn(2, T, DIM, dtype=torch.float64)
    torch.testing.assert_close(layer(x), oracle(layer, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("grid,prefix", [((6, 6), 1), (None, 0)])
def test_padding_mask_matches_oracle_and_padding_content_is_ignored(grid, prefix):
    layer = make(grid, n_win=3, topk=2, num_prefix_tokens=prefix)
    T = prefix + (36 if grid else 18)
    x = torch.randn(2, T, DIM, dtype=torch.float64)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[0, -7:] = False  # a whole region and part of another are padding
    mask[1, prefix + 2 : prefix + 5] = False
    out = layer(x, padding_mask=mask)
    torch.testing.assert_close(out, oracle(layer, x, mask), rtol=1e-10, atol=1e-10)
    x2 = x.clone()
    x2[~mask] = 100.0 * torch.randn_like(x2[~mask])
    torch.testing.assert_close(layer(x2, padding_mask=mask)[mask], out[mask], rtol=1e-10, atol=1e-10)


def test_gradients_match_oracle_and_routing_gets_none():
    layer = make((6, 6), n_win=3, topk=2, num_prefix_tokens=1)
    x = torch.randn(2, 37, DIM, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 37, DIM, dtype=torch.float64)
    got = torch.autograd.grad((layer(x) * grad_out).sum(), [x, *layer.parameters()])
    expected = torch.autograd.grad((oracle(layer, x) * grad_out).sum(), [x, *layer.parameters()])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("topk", [1, 4])
def test_routing_sends_every_token_to_the_region_with_the_matching_keys(topk):
    """Region 3's keys align with every query: with topk=1 every region routes there alone, so all attention weight
    lands on region 3's tokens (channel 0 of v marks them with 3.0); with topk=4 (all regions) it spreads out."""
    layer = make((4, 4), n_win=2, topk=topk, side_dwconv=0)
    region_of = torch.tensor([(r // 2) * 2 + c // 2 for r in range(4) for c in range(4)])
    with torch.no_grad():
        layer.qkv.weight.zero_()
        layer.qkv.bias.zero_()
        layer.qkv.weight[0, 1] = 1.0  # q_0 = x_1 = 1 for every token
        layer.qkv.weight[DIM : 2 * DIM].copy_(torch.eye(DIM))  # k = x
        layer.qkv.weight[2 * DIM :].copy_(torch.eye(DIM))  # v = x
        layer.proj.weight.copy_(torch.eye(DIM))
        layer.proj.bias.zero_()
    x = torch.zeros(1, 16, DIM, dtype=torch.float64)
    x[0, :, 2:] = torch.randn(16, DIM - 2, dtype=torch.float64)
    x[0, :, 1] = 1.0
    x[0, region_of == 3, 0] = 3.0
    weight_on_region_3 = layer(x)[0, :, 0] / 3.0
    if topk == 1:
        torch.testing.assert_close(weight_on_region_3, torch.ones(16, dtype=torch.float64), rtol=0, atol=1e-12)
    else:  # 4 tokens at logit 3 * dim^-0.5 against 12 at 0
        share = 4 * math.exp(3 * DIM**-0.5) / (4 * math.exp(3 * DIM**-0.5) + 12)
        torch.testing.assert_close(weight_on_region_3, torch.full((16,), share, dtype=torch.float64))


def test_vit_runs_biformer_on_its_patch_grid():
    torch.manual_seed(0)
    model = ViT(img_size=16, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=4,
                attention={"name": "biformer", "n_win": 4, "topk": 2})  # fmt: skip
    layers = model.attention_layers()
    assert all(a.grid_size == (8, 8) and a.num_prefix_tokens == 1 for a in layers)
    logits = model(torch.randn(2, 1, 16, 16))
    logits.sum().backward()
    assert logits.shape == (2, 10) and all(
        torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None
    )


def test_float32_and_bfloat16_follow_float64():
    layer = make((6, 6), n_win=3, topk=2)
    x = torch.randn(2, 36, DIM, dtype=torch.float64)
    expected = layer(x)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.1)):
        got = layer.to(dtype)(x.to(dtype))
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"n_win": 0}, "n_win must be a positive integer"),
        ({"topk": 0}, "topk must be a positive integer"),
        ({"side_dwconv": 4}, "side_dwconv must be 0 .* or an odd kernel size"),
        ({"qk_scale": -1.0}, "qk_scale must be a positive number"),
        ({"num_prefix_tokens": -1}, "num_prefix_tokens must be an integer >= 0"),
        ({"grid_size": (0, 4)}, r"grid_size must be \(h, w\) with positive integers"),
    ],
)
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        build_attention("biformer", dim=DIM, num_heads=HEADS, **options)


def test_causal_and_wrong_grid_raise_with_the_fix():
    with pytest.raises(ValueError, match="biformer"):
        build_attention("biformer", dim=DIM, num_heads=HEADS, causal=True)
    layer = build_attention("biformer", dim=DIM, num_heads=HEADS, grid_size=(4, 4))
    with pytest.raises(ValueError, match=r"built for num_prefix_tokens=0 \+ a 4x4 grid = 16 tokens; got 17"):
        layer(torch.randn(1, 17, DIM))


@pytest.mark.parametrize(
    "grid,n_win,topk,prefix", [((8, 8), 4, 2, 0), ((9, 6), 4, 3, 2), ((7, 7), 7, 4, 3), (None, 4, 2, 1)]
)
def test_flex_lowering_equals_the_gathered_regions(grid, n_win, topk, prefix):
    """The routing as a block-sparse pattern through FlexAttention (its CPU forward) equals the gathered regions,
    with padding and prefix tokens (3 prefix tokens on one-token regions take 3 prefix blocks)."""
    from attnzoo.kernels.sparse_attention.flex import sparse_attention_flex  # noqa: F401  (FlexAttention present)

    layer = make(grid, n_win=n_win, topk=topk, num_prefix_tokens=prefix).float()
    T = prefix + (grid[0] * grid[1] if grid else 21)
    x = torch.randn(2, T, DIM)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[0, -5:] = False
    with torch.no_grad():
        expected = layer(x, padding_mask=mask)
        layer.backend = "flex"
        got = layer(x, padding_mask=mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_backend_option_is_checked():
    with pytest.raises(ValueError, match=r"unknown backend 'triton'.*flex"):
        build_attention("biformer", dim=DIM, num_heads=HEADS, backend="triton")
