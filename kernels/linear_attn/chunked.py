"""Chunked linear attention in torch: the CPU path.

Causal (chunk size C, N = ceil(T / C) chunks, chunk n holds positions nC .. nC + C - 1):

    o_n = (q_n k_n^T ⊙ tril) v_n + q_n S_n,     S_n = S_0 + sum_{m<n} k_m^T v_m   (state at the start of chunk n)

All chunks are processed at once with batched matmuls in a chunk-major (N * B * H, C, D) layout; only the prefix
sums of the per-chunk updates k_n^T v_n (N, B * H, K, V) loop over chunks (never over time steps). Memory per head is
O(T·C + T·K·V / C), i.e. O(T·d) at the default C = 64 ≈ d, never per-token K x V states. The backward (a custom
autograd.Function) keeps q, k, v, the masked scores and the chunk states, so training memory stays at that size:

    dA = (do v^T) ⊙ tril,  dq_n = dA k_n + do_n S_n^T,  dk_n = dA^T q_n + v_n G_n^T,  dv_n = A^T do_n + k_n G_n,
    G_n = dS_final + sum_{m>n} q_m^T do_m   (gradient reaching the state after chunk n),   dS_0 = G_{-1}.

Normalised (o_t = num_t / den_t, den_t = q_t . z_t + eps, z_t = z_0 + sum_{j<=t} k_j): the denominator is the same
recurrence with v = 1, so it rides along as row sums of the masked scores plus q_n z_n, and its gradient
dden_t = -(do_t . o_t) / den_t enters dA (broadcast over keys), dq (dden_t z_n) and dk (the suffix sums of
q_m^T dden_m) — vector work beside the V-wide GEMMs.

Non-causal: S = S_0 + k^T v, o = q S (two matmuls, autograd).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _to_chunks(x: Tensor, C: int) -> Tensor:
    """(B, T, H, D) -> (N * B * H, C, D), chunk-major, zero-padding T up to a multiple of C."""
    B, T, H, D = x.shape
    pad = (-T) % C
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
    N = x.shape[1] // C
    return x.view(B, N, C, H, D).permute(1, 0, 3, 2, 4).reshape(N * B * H, C, D)


def _from_chunks(x: Tensor, B: int, H: int, T: int) -> Tensor:
    """(N * B * H, C, D) -> (B, T, H, D)."""
    NBH, C, D = x.shape
    N = NBH // (B * H)
    return x.view(N, B, H, C, D).permute(1, 0, 3, 2, 4).reshape(B, N * C, H, D)[:, :T]


SCAN_BLOCK = 16  # chunks per block of the blocked prefix sum


def _exclusive_scan(parts: Tensor, initial: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor]:
    """Exclusive prefix sums over the leading (chunk) axis of ``parts`` (N, ...) starting from ``initial`` (reverse:
    suffix sums from the end), and the total. Blocked: running sums inside blocks of ``SCAN_BLOCK`` chunks (one add per
    position in a block, over all blocks at once), then the blocks' offsets — about 2 sqrt(N) ops instead of N, which
    matters because every small op costs a thread-pool round trip; torch's CPU cumsum along a leading axis is ~10x
    slower still (measured). The reverse scan runs the same steps from the other end of one buffer rather than on
    flipped copies (a flip is a full copy, twice per call)."""
    N = parts.shape[0]
    flat = parts.reshape(N, -1)
    block = min(SCAN_BLOCK, N)
    nb = -(-N // block)
    out = flat.new_empty(nb * block + 1, flat.shape[1])
    # forward: row 0 the start, row n + 1 the inclusive sum up to chunk n; reverse: row n the inclusive sum from
    # chunk n to the end, the last row the start; the padding rows between hold zeros
    start_row, body = (nb * block, out[:-1]) if reverse else (0, out[1:])
    if initial is None:
        out[start_row].zero_()
    else:
        out[start_row] = initial.reshape(-1)
    body[:N].copy_(flat)
    body[N:].zero_()
    blocks = body.view(nb, block, -1)
    steps = range(block - 2, -1, -1) if reverse else range(1, block)
    for i in steps:  # inclusive sums inside every block at once
        blocks[:, i] += blocks[:, i + 1 if reverse else i - 1]
    offset = out[start_row].clone()
    for j in reversed(range(nb)) if reverse else range(nb):  # a block's offset: the start plus every earlier total
        total = blocks[j, 0 if reverse else -1].clone()
        blocks[j] += offset
        offset += total
    starts, total = (out[1 : N + 1], out[0]) if reverse else (out[:N], out[N])
    return starts.view(parts.shape), total.view(parts.shape[1:])


def _prefix_sums(parts: Tensor, initial: Tensor | None) -> tuple[Tensor, Tensor]:
    """State at the start of every chunk from the chunks' writes (N, ...) and ``initial``; and the final state."""
    return _exclusive_scan(parts, initial, reverse=False)


def _suffix_sums(parts: Tensor, final: Tensor | None) -> Tensor:
    """For each chunk n: ``final`` + the sum of parts[m] over later chunks m > n (the gradient after chunk n)."""
    return _exclusive_scan(parts, final, reverse=True)[0]


class _CausalChunked(torch.autograd.Function):
    """Causal chunked linear attention on chunk-major (N * BH, C, D) tensors; with ``normalize``, the denominator
    q_t . z_t + eps is carried beside the numerator (z: a K-vector per chunk) rather than as an extra value column,
    which would make every GEMM V + 1 wide (measured ~2x slower per GEMM at V = 64)."""

    @staticmethod
    def forward(ctx, q, k, v, S0, z0, BH: int, normalize: bool, eps: float):
        N = q.shape[0] // BH
        kv = torch.bmm(k.transpose(1, 2), v)  # (N * BH, K, V): each chunk's write
        starts, final = _prefix_sums(kv.view(N, BH, *kv.shape[1:]), S0)
        scores = torch.bmm(q, k.transpose(1, 2)).tril_()  # (N * BH, C, C)
        o = torch.bmm(q, starts.view_as(kv)).add_(torch.bmm(scores, v))  # (bmm + add_: baddbmm loops per batch on CPU)
        z_starts = z_final = den = None
        if normalize:
            z_starts, z_final = _prefix_sums(k.sum(1).view(N, BH, -1), z0)  # (N, BH, K)
            den = torch.bmm(q, z_starts.view(N * BH, -1, 1)).squeeze(-1).add_(scores.sum(-1)).add_(eps)
            o.div_(den[..., None])
        # scores and chunk states are kept (O(T C + T K V / C), the size of q at C ~ K): recomputing them costs two
        # of the fourteen GEMMs of a forward + backward
        ctx.save_for_backward(q, k, v, S0, z0, den, o if normalize else None, scores, starts, z_starts)
        ctx.BH, ctx.normalize = BH, normalize
        return o, final, z_final

    @staticmethod
    def backward(ctx, do: Tensor, dfinal: Tensor | None, dz_final: Tensor | None):
        q, k, v, S0, z0, den, o, scores, starts, z_starts = ctx.saved_tensors
        BH, normalize = ctx.BH, ctx.normalize
        N = q.shape[0] // BH
        starts = starts.view(N * BH, *starts.shape[2:])
        if normalize:
            dden = (do * o).sum(-1).div_(den).neg_()  # o = num / den
            do = do / den[..., None]  # the numerator's gradient
        dscores = torch.bmm(do, v.transpose(1, 2))
        if normalize:
            dscores += dden[..., None]  # den_t = sum_{j<=t} q_t . k_j + q_t . z_start
        dscores.tril_()
        dq = torch.bmm(do, starts.transpose(1, 2)).add_(torch.bmm(dscores, k))
        del starts
        qdo = torch.bmm(q.transpose(1, 2), do)  # (N * BH, K, V)
        after = _suffix_sums(qdo.view(N, BH, *qdo.shape[1:]), dfinal)  # gradient reaching the state after chunk n
        dS0 = (after[0] + qdo.view_as(after)[0]) if S0 is not None and ctx.needs_input_grad[3] else None
        after = after.view_as(qdo)
        dk = torch.bmm(v, after.transpose(1, 2)).add_(torch.bmm(dscores.transpose(1, 2), q))
        del dscores
        dv = torch.bmm(k, after).add_(torch.bmm(scores.transpose(1, 2), do))
        dz0 = None
        if normalize:
            dq.addcmul_(dden[..., None], z_starts.view(N * BH, 1, -1))
            qz = torch.bmm(dden[:, None, :], q).view(N, BH, -1)  # (N, BH, K): sum_t dden_t q_t per chunk
            z_after = _suffix_sums(qz, dz_final)
            dk += z_after.view(N * BH, 1, -1)
            if z0 is not None and ctx.needs_input_grad[4]:
                dz0 = z_after[0] + qz[0]
        return dq, dk, dv, dS0, dz0, None, None, None


def linear_attn_chunked(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, initial_state: Tensor | None, chunk_size: int = 64
) -> tuple[Tensor, Tensor]:
    """q (B, T, H, K), k (B, S, H, K), v (B, S, H, V), initial_state (B, H, K, V) or None -> (o, final state)."""
    if not causal:
        state = torch.einsum("bshk,bshv->bhkv", k, v)
        if initial_state is not None:
            state = state + initial_state
        return torch.einsum("bthk,bhkv->bthv", q, state), state
    return _causal(q, k, v, initial_state, None, chunk_size, normalize=False, eps=0.0)[:2]


def linear_attn_chunked_normalized(
    q: Tensor, k: Tensor, v: Tensor, initial_state: Tensor | None, chunk_size: int, eps: float
) -> tuple[Tensor, Tensor]:
    """Causal o_t = (q_t S_t) / (q_t . z_t + eps); initial_state and the returned state are (B, H, K, V + 1) with z
    as the last column, the layout of the ones-column formulation used by the other backends."""
    S0 = z0 = None
    if initial_state is not None:
        S0, z0 = initial_state[..., :-1], initial_state[..., -1]
    o, final, z_final = _causal(q, k, v, S0, z0, chunk_size, normalize=True, eps=eps)
    return o, torch.cat([final, z_final[..., None]], dim=-1)


def _causal(q, k, v, S0, z0, chunk_size: int, normalize: bool, eps: float):
    B, T, H, K = q.shape
    BH = B * H
    C = max(1, min(chunk_size, T))  # a chunk longer than the sequence only adds padding
    S0 = None if S0 is None else S0.reshape(BH, K, -1)
    z0 = None if z0 is None else z0.reshape(BH, K)
    o, final, z_final = _CausalChunked.apply(
        _to_chunks(q, C), _to_chunks(k, C), _to_chunks(v, C), S0, z0, BH, normalize, eps
    )
    final = final.view(B, H, *final.shape[1:])
    return _from_chunks(o, B, H, T), final, (None if z_final is None else z_final.view(B, H, K))
