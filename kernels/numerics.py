"""Numerical helpers shared by the chunked CPU kernels."""

from __future__ import annotations

import torch
from torch import Tensor


def exp_(x: Tensor, exact_zero: bool = True) -> Tensor:
    """exp(x) in place, with exponents below the dtype's floor (masked -inf entries included) mapped to exactly 0
    (``exact_zero=False``: to exp(floor), which saves two passes where no entry is masked).

    Decays exp(A dt) and exp(b_i - b_j) go far below float32's range once steps or gates are large. exp(-80) = 2e-35 in
    float32 (exp(-700) = 1e-304 in float64) is ~28 orders of magnitude below the precision of any sum it enters, but
    smaller results are denormals, which make exp and matmul ~100x slower on x86 CPUs, and exp of -inf or of arguments
    below ~-87 is itself 10-25x slower than in the normal range (measured here: 4M floats in [-100, -99] take 124 ms
    against 5 ms in [-50, -49]). So those are clamped, then zeroed.
    """
    floor = -700.0 if x.dtype == torch.float64 else -80.0
    if not exact_zero:
        return x.clamp_min_(floor).exp_()
    dead = x < floor
    return x.clamp_min_(floor).exp_().masked_fill_(dead, 0)
