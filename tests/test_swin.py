"""Swin window attention: against timm's SwinTransformerBlock attention with copied weights, and a float64 oracle."""

from __future__ import annotations

import pytest
import torch
from timm.models.swin_transformer import SwinTransformerBlock

from attnzoo.layers import build_attention
from attnzoo.layers.windows import window_layout
from attnzoo.models.vit import ViT

DIM, HEADS = 16, 2


def oracle(layer, x: torch.Tensor, grid, shift, padding_mask=None) -> torch.Tensor:
    """Naive float64 Swin: explicit (T x T) mask and bias built token by token from grid coordinates."""
    B, T, C = x.shape
    H, D, P = layer.num_heads, layer.head_dim, layer.num_prefix_tokens
    h, w = grid
    wh, ww = (min(m, s) for m, s in zip(layer.window_size, grid))
    sh, sw = (0 if s <= m else shift for m, s in zip((wh, ww), grid))
    Hp, Wp = -(-h // wh) * wh, -(-w // ww) * ww
    q, k, v = layer.qkv(x).view(B, T, 3, H, D).unbind(2)
    logits = torch.einsum("bthd,bshd->bhts", q, k) * D**-0.5
    allowed = torch.zeros(T, T, dtype=torch.bool)
    bias = torch.zeros(H, T, T, dtype=x.dtype)
    allowed[:P, :] = True
    allowed[:, :P] = True
    table_w = layer.window_size[1]

    def place(i, j):  # shifted padded coordinates, window id, region label
        r, c = (i - sh) % Hp, (j - sw) % Wp
        band = lambda z, n, m, s: int(s > 0 and z >= n - m) + int(s > 0 and z >= n - s)
        return r, c, (r // wh, c // ww), band(r, Hp, wh, sh) * 3 + band(c, Wp, ww, sw)

    for a in range(h * w):
        ra, ca, wa, la = place(a // w, a % w)
        for b in range(h * w):
            rb, cb, wb, lb = place(b // w, b % w)
            if wa == wb and la == lb:
                allowed[P + a, P + b] = True
                index = (ra % wh - rb % wh + layer.window_size[0] - 1) * (2 * table_w - 1) + ca % ww - cb % ww
                bias[:, P + a, P + b] = layer.relative_position_bias_table[index + table_w - 1]
    mask = allowed[None, None] if padding_mask is None else allowed[None, None] & padding_mask[:, None, None, :]
    weights = torch.softmax((logits + bias).masked_fill(~mask, float("-inf")), dim=-1)
    o = torch.einsum("bhts,bshd->bthd", weights, v).reshape(B, T, C)
    return layer.proj(o)


@pytest.mark.parametrize(
    "grid,window,shift",
    [((8, 8), 4, 2), ((8, 8), 4, 0), ((6, 6), 3, 1), ((4, 4), 7, 3), ((4, 8), 4, 2), ((14, 14), 7, 3)],
    ids=lambda v: str(v),
)
def test_matches_timm_block_attention(grid, window, shift):
    """timm's roll + window partition + relative position bias + shift mask, weights copied (float64)."""
    torch.manual_seed(0)
    block = SwinTransformerBlock(DIM, grid, num_heads=HEADS, window_size=window, shift_size=shift).double().eval()
    torch.nn.init.normal_(block.attn.relative_position_bias_table)
    layer = build_attention("swin", dim=DIM, num_heads=HEADS, window_size=window, shift_size=shift, grid_size=grid)
    layer = layer.double().eval()
    layer.load_state_dict({k[5:]: t for k, t in block.state_dict().items() if k.startswith("attn.")}, strict=True)
    x = torch.randn(2, *grid, DIM, dtype=torch.float64)
    ref = block._attn(x).reshape(2, -1, DIM)
    torch.testing.assert_close(layer(x.reshape(2, -1, DIM)), ref, atol=1e-12, rtol=0)


def test_shift_mask_equals_timm():
    for grid, window, shift in [((8, 8), (4, 4), (2, 2)), ((6, 9), (3, 3), (1, 1)), ((14, 14), (7, 7), (3, 3))]:
        block = SwinTransformerBlock(DIM, grid, num_heads=HEADS, window_size=window, shift_size=shift)
        labels = window_layout(grid, window, shift).region.view(-1, window[0] * window[1])
        assert torch.equal(labels[:, :, None] != labels[:, None, :], block.attn_mask != 0)


@pytest.mark.parametrize(
    "grid,window,shift,prefix",
    [((9, 9), 7, 3, 0), ((5, 7), 3, 1, 1), ((6, 5), 4, 0, 2), ((4, 4), 7, 3, 1)],
    ids=lambda v: str(v),
)
def test_matches_float64_oracle_with_padding_and_prefix(grid, window, shift, prefix):
    """Grids that are no multiple of the window (padded, padding masked), prefix tokens, a key padding mask."""
    torch.manual_seed(1)
    layer = build_attention(
        "swin",
        dim=DIM,
        num_heads=HEADS,
        window_size=window,
        shift_size=shift,
        grid_size=grid,
        num_prefix_tokens=prefix,
    ).double()
    torch.nn.init.normal_(layer.relative_position_bias_table)
    T = prefix + grid[0] * grid[1]
    x = torch.randn(2, T, DIM, dtype=torch.float64)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[0, [prefix, T - 1]] = False
    got = layer(x, padding_mask=mask)
    ref = oracle(layer, x, grid, shift, padding_mask=mask)
    torch.testing.assert_close(got[mask], ref[mask], atol=1e-12, rtol=0)


def test_wrapped_tokens_do_not_see_the_opposite_edge():
    """9x9 grid, window 7, shift 3: token (0, 0) sees only rows 0..2 (its wrapped region), never the bottom edge."""
    layer = build_attention("swin", dim=DIM, num_heads=HEADS, window_size=7, shift_size=3, grid_size=(9, 9)).double()
    x = torch.randn(1, 81, DIM, dtype=torch.float64, requires_grad=True)
    layer(x)[0, 0].sum().backward()
    rows = x.grad[0].view(9, 9, DIM).abs().sum((1, 2)).nonzero().flatten().tolist()
    assert rows == [0, 1, 2]


def test_one_dimensional_windows():
    """Without a grid: windows of window_size consecutive tokens (grid (1, T)); shifted on odd layer_index."""
    torch.manual_seed(2)
    for layer_index, shift in ((0, 0), (1, 2)):
        layer = build_attention("swin", dim=DIM, num_heads=HEADS, window_size=5, layer_index=layer_index).double()
        assert layer.shift_size == shift
        x = torch.randn(2, 13, DIM, dtype=torch.float64)
        torch.testing.assert_close(layer(x), oracle(layer, x, (1, 13), shift), atol=1e-12, rtol=0)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="shift_size must be"):
        build_attention("swin", dim=DIM, num_heads=HEADS, window_size=4, shift_size=4)
    with pytest.raises(ValueError, match="window_size must be"):
        build_attention("swin", dim=DIM, num_heads=HEADS, window_size=0)
    layer = build_attention("swin", dim=DIM, num_heads=HEADS, grid_size=(3, 3), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="3x3 grid"):
        layer(torch.randn(1, 9, DIM))


def test_vit_passes_layer_index_and_alternates_shifts():
    torch.manual_seed(0)
    model = ViT(img_size=16, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=3, num_heads=4,
                attention={"name": "swin", "window_size": 4})  # fmt: skip
    layers = model.attention_layers()
    assert [a.layer_index for a in layers] == [0, 1, 2]
    assert [a.shift_size for a in layers] == [0, 2, 0]
    assert all(a.grid_size == (8, 8) and a.num_prefix_tokens == 1 for a in layers)
    x = torch.randn(2, 1, 16, 16)
    logits = model(x)
    logits.sum().backward()
    assert logits.shape == (2, 10) and torch.isfinite(layers[1].relative_position_bias_table.grad).all()


@pytest.mark.parametrize(
    "grid,window,shift,prefix",
    [((8, 8), 4, 2, 0), ((9, 9), 7, 3, 1), ((5, 7), 3, 1, 2), ((4, 4), 7, 3, 1), ((1, 13), 5, 2, 0), ((4, 4), 1, 0, 3)],
    ids=lambda v: str(v),
)
def test_flex_lowering_equals_the_batched_windows(grid, window, shift, prefix):
    """The same mask_mod / bias_mod through FlexAttention (its CPU forward) and through the batched-window SDPA."""
    from attnzoo.kernels.sparse_attention.flex import sparse_attention_flex  # noqa: F401  (FlexAttention present)

    torch.manual_seed(3)
    options = dict(window_size=window, shift_size=shift, grid_size=grid, num_prefix_tokens=prefix)
    layer = build_attention("swin", dim=DIM, num_heads=HEADS, **options).eval()
    torch.nn.init.normal_(layer.relative_position_bias_table)
    T = prefix + grid[0] * grid[1]
    x = torch.randn(2, T, DIM)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[0, [prefix, T - 1]] = False
    with torch.no_grad():
        expected = layer(x, padding_mask=mask)
        layer.backend = "flex"
        got = layer(x, padding_mask=mask)
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=1e-5)


def test_backend_option_is_checked():
    with pytest.raises(ValueError, match=r"unknown backend 'triton'.*flex"):
        build_attention("swin", dim=DIM, num_heads=HEADS, backend="triton")
