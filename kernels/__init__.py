"""attnzoo.kernels: functional, autograd-capable ops in the (B, T, H, D) layout.

Each op has a recurrent reference (the oracle, float64-capable), a torch chunked form (the CPU path) and a Triton
kernel (CUDA), behind one function with ``backend="auto"|"reference"|"torch"|"triton"``.
"""

from attnzoo.kernels.delta_rule import delta_rule
from attnzoo.kernels.dispatch import BACKENDS, choose_backend, triton_available
from attnzoo.kernels.gla import gla, simple_gla
from attnzoo.kernels.linear_attn import linear_attn
from attnzoo.kernels.selective_scan import selective_scan
from attnzoo.kernels.sparse_attention import BlockPattern, band_pattern, sparse_attention

__all__ = [
    "BACKENDS",
    "BlockPattern",
    "band_pattern",
    "choose_backend",
    "delta_rule",
    "gla",
    "linear_attn",
    "selective_scan",
    "simple_gla",
    "sparse_attention",
    "triton_available",
]
