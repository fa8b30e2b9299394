"""ShortConvolution against an independent reference: torch's depthwise F.conv1d over [state; x], in float64, values
and gradients (x, weight, bias, state), on one tile and on many (whole-sequence tiles and runs of positions)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo.layers.short_conv as short_conv
from attnzoo.layers.short_conv import ShortConvolution


def reference(x, state, weight, bias, activation):
    """act(conv1d([state; x])) with the current token on the last tap: (B, T, C)."""
    full = torch.cat([state, x.transpose(1, 2)], dim=-1)  # (B, C, W - 1 + T)
    y = F.conv1d(full, weight, bias, groups=weight.shape[0]).transpose(1, 2)
    return F.silu(y) if activation == "silu" else y


def make(channels, width, bias, activation):
    torch.manual_seed(0)
    conv = ShortConvolution(channels, width, bias=bias, activation=activation).double()
    with torch.no_grad():  # every tap distinct, so a tap read at the wrong offset changes the result
        conv.weight.copy_(torch.randn_like(conv.weight))
        if bias:
            conv.bias.copy_(torch.randn_like(conv.bias))
    return conv


def check_against_reference(conv, B, T, with_state):
    C, W = conv.weight.shape[0], conv.weight.shape[-1]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, C, generator=gen, dtype=torch.float64, requires_grad=True)
    state = torch.randn(B, C, W - 1, generator=gen, dtype=torch.float64) if with_state else None
    state_ref = (torch.zeros(B, C, W - 1, dtype=torch.float64) if state is None else state.clone()).requires_grad_()
    if state is not None:
        state.requires_grad_(True)
    y, new_state = conv(x, state=state)
    expected = reference(x, state_ref, conv.weight, conv.bias, conv.activation)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    # the carried state is the last W - 1 inputs of [state; x]
    inputs = torch.cat([state_ref, x.transpose(1, 2)], -1).detach()
    torch.testing.assert_close(new_state, inputs[..., inputs.shape[-1] - (W - 1) :], rtol=0, atol=0)
    upstream = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    params = [conv.weight] + ([conv.bias] if conv.bias is not None else [])
    got = torch.autograd.grad(y, [x, *params] + ([state] if state is not None else []), upstream)
    want = torch.autograd.grad(expected, [x, *params] + ([state_ref] if state is not None else []), upstream)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("activation", ["silu", "identity"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("T", [1, 2, 5, 33])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-start", "state"])
def test_matches_conv1d_on_one_tile(activation, bias, width, T, with_state):
    check_against_reference(make(6, width, bias, activation), 3, T, with_state)


@pytest.mark.parametrize(
    "tile_elements, B, T",
    [
        (2 * 5 * 6, 7, 5),  # whole sequences, two per tile, the last tile with one
        (4 * 6, 2, 11),  # runs of 4 positions, the last run of 3: taps reach back into the previous run
        (6, 2, 7),  # one position per tile: every tap crosses a tile boundary
    ],
    ids=["sequence-tiles", "position-runs", "single-positions"],
)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-start", "state"])
def test_matches_conv1d_across_tiles(monkeypatch, tile_elements, B, T, with_state):
    monkeypatch.setattr(short_conv, "TILE_ELEMENTS", tile_elements)
    tiles = short_conv._tiles(B, T, 6)
    assert len(tiles) > 1
    # the tiles cover every (sequence, position) exactly once
    covered = torch.zeros(B, T, dtype=torch.int64)
    for seqs, pos in tiles:
        covered[seqs, pos] += 1
    assert bool((covered == 1).all())
    check_against_reference(make(6, 4, True, "silu"), B, T, with_state)


def test_pieces_equal_one_call_and_reverse_is_the_mirror():
    conv = make(5, 4, True, "silu")
    x = torch.randn(2, 9, 5, dtype=torch.float64)
    whole, _ = conv(x)
    first, state = conv(x[:, :4])
    second, state = conv(x[:, 4:5], state=state)
    third, _ = conv(x[:, 5:], state=state)
    torch.testing.assert_close(torch.cat([first, second, third], 1), whole, rtol=1e-13, atol=1e-13)
    mirrored, _ = conv(x, reverse=True)
    torch.testing.assert_close(mirrored, conv(x.flip(1))[0].flip(1), rtol=0, atol=0)


@pytest.mark.parametrize("silu", [True, False], ids=["silu", "identity"])
def test_gradcheck_of_the_op_in_float64(monkeypatch, silu):
    monkeypatch.setattr(short_conv, "TILE_ELEMENTS", 6)  # several tiles
    gen = torch.Generator().manual_seed(2)
    full = torch.randn(2, 2 + 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)  # W - 1 = 2 state rows
    weight = torch.randn(3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    op = lambda full, weight, bias: short_conv._CausalDepthwiseConv.apply(full, weight, bias, silu)
    assert torch.autograd.gradcheck(op, (full, weight, bias))
    assert torch.autograd.gradcheck(lambda full, weight: op(full, weight, None), (full, weight))


def test_half_precision_input_keeps_its_dtype_and_close_values():
    conv = ShortConvolution(8, 4, bias=True)
    x = torch.randn(2, 6, 8)
    y32, _ = conv(x)
    y16, _ = conv(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.05)


def test_bad_state_shape_names_the_expected_shape():
    conv = ShortConvolution(4, 4)
    with pytest.raises(ValueError, match=r"state must have shape \(B, C, W-1\) = \(2, 4, 3\); got \(2, 4, 2\)"):
        conv(torch.randn(2, 5, 4), state=torch.zeros(2, 4, 2))


def test_inference_mode_gives_the_training_mode_output():
    conv = make(6, 4, True, "silu")
    x = torch.randn(3, 9, 6, dtype=torch.float64)
    with torch.no_grad():  # the activation then overwrites the pre-activation buffer
        expected = reference(x, torch.zeros(3, 6, 3, dtype=torch.float64), conv.weight, conv.bias, "silu")
        y_no_grad, _ = conv(x)
    y_grad, _ = conv(x)
    assert y_grad.requires_grad
    torch.testing.assert_close(y_no_grad, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_grad.detach(), y_no_grad, rtol=0, atol=0)


def test_frozen_weights_get_no_gradient_and_the_input_gradient_is_unchanged():
    conv = make(6, 4, True, "silu")
    x = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(conv(x)[0].square().sum(), x)
    conv.requires_grad_(False)  # the backward then skips the weight and bias reductions
    (got,) = torch.autograd.grad(conv(x)[0].square().sum(), x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
