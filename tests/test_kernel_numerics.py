"""kernels/numerics.exp_: the floored, in-place exp the chunked CPU kernels share."""

from __future__ import annotations

import math

import pytest
import torch

from attnzoo.kernels.numerics import exp_


@pytest.mark.parametrize("dtype, floor", [(torch.float32, -80.0), (torch.float64, -700.0)])
def test_exp_floors_and_zeros(dtype, floor):
    x = torch.tensor([0.0, -1.0, -30.0, floor + 1.0, floor + 0.5, floor - 1.0, -1e4, -math.inf], dtype=dtype)
    got = exp_(x.clone())
    # in range: exp itself; at or below floor + ln 2 (masked -inf included): exactly 0
    torch.testing.assert_close(got[:4], torch.exp(x[:4]), rtol=1e-6, atol=0)
    assert (got[4:] == 0).all()
    floored = exp_(x.clone(), exact_zero=False)
    torch.testing.assert_close(floored[:5], torch.exp(x[:5]), rtol=1e-6, atol=0)
    assert (floored[5:] == torch.exp(torch.tensor(floor, dtype=dtype))).all()  # clamped, never denormal or zero


def test_exp_is_in_place():
    x, y = torch.linspace(-100, 0, 11), torch.linspace(-100, 0, 11)
    assert exp_(x) is x and exp_(y, exact_zero=False) is y
