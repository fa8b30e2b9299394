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


def _running_sums(parts: Tensor, initial: Tensor | None, reverse: bool) -> Tensor:
    """Running sums over the leading (chunk) axis of ``parts`` (N, ...), from ``initial`` (None: zero): (N + 1, ...).

    Forward: sums[n] = initial + the sum of parts[m] over m < n (the state at the start of chunk n; sums[N] is the
    final state). Reverse: sums[n] = initial + the sum over m >= n (sums[N] = initial).

    Blocked: running sums inside blocks of ``SCAN_BLOCK`` chunks (one add per position in a block, over all blocks at
    once), then the blocks' offsets: about 2 sqrt(N) ops instead of N, which matters because every small op costs a
    thread-pool round trip; torch's CPU cumsum along a leading axis is ~10x slower still (measured). The reverse sums
    run the same steps from the other end of one buffer rather than on flipped copies (a flip is a full copy)."""
    N = parts.shape[0]
    if N == 0:
        return parts.new_zeros(1, *parts.shape[1:]) if initial is None else initial.reshape(1, *parts.shape[1:])
    flat = parts.reshape(N, -1)
    block = min(SCAN_BLOCK, N)
    nb = -(-N // block)
    out = flat.new_empty(nb * block + 1, flat.shape[1])
    # forward: row 0 the start, row n + 1 the inclusive sum up to chunk n; reverse: row n the inclusive sum from
    # chunk n to the end, the last row the start; the padding rows between hold zeros (then the start: reverse)
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
    return out[: N + 1].view(N + 1, *parts.shape[1:])


class _CausalChunked(torch.autograd.Function):
    """Causal chunked linear attention on chunk-major (N * BH, C, D) tensors; with ``normalize``, the denominator
    q_t . z_t + eps is carried beside the numerator (z: a K-vector per chunk) rather than as an extra value column,
    which would make every GEMM V + 1 wide (measured ~2x slower per GEMM at V = 64).

    State GEMMs are skipped where their operand is zero or their result unused: with no initial state the first
    chunk starts from zero (no q_0 S_0, no do_0 S_0^T, no q_0^T do_0 unless dS_0 is asked for); with no final state
    asked for, the last chunk's write k^T v is never read; with no gradient for the final state the last chunk's
    G is zero (no v G^T, no k G). At MQAR's T = 128 (two chunks) that is 5 of the 12 state GEMM chunk-slices, at
    T <= C all of them."""

    @staticmethod
    def forward(ctx, q, k, v, S0, z0, BH: int, normalize: bool, eps: float, need_final: bool):
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: its GEMMs are skipped
        N, K, V = q.shape[0] // BH, q.shape[-1], v.shape[-1]
        written = N if need_final else N - 1  # chunks whose write k_n^T v_n is read
        kv = torch.bmm(k[: written * BH].transpose(1, 2), v[: written * BH])  # (written * BH, K, V)
        sums = _running_sums(kv.view(written, BH, K, V), S0, reverse=False)  # sums[n] = state at the start of chunk n
        final = sums[N] if need_final else None
        first = 0 if S0 is not None else 1  # the first chunk whose start state is not zero
        starts = sums[first:N].reshape(-1, K, V)  # ((N - first) * BH, K, V)
        scores = torch.bmm(q, k.transpose(1, 2)).tril_()  # (N * BH, C, C)
        o = torch.bmm(scores, v)
        if first < N:  # bmm + add_: baddbmm loops per batch on CPU
            o[first * BH :].add_(torch.bmm(q[first * BH :], starts))
        z_starts = z_final = den = None
        if normalize:
            z_sums = _running_sums(k.sum(1).view(N, BH, -1), z0, reverse=False)  # (N + 1, BH, K)
            z_starts, z_final = z_sums[:N], z_sums[N]
            den = torch.bmm(q, z_starts.reshape(N * BH, -1, 1)).squeeze(-1).add_(scores.sum(-1)).add_(eps)
            o.div_(den[..., None])
        # scores and chunk states are kept (O(T C + T K V / C), the size of q at C ~ K): recomputing them costs two
        # of the fourteen GEMMs of a forward + backward
        ctx.save_for_backward(q, k, v, S0, z0, den, o if normalize else None, scores, starts, z_starts)
        ctx.BH, ctx.normalize, ctx.first = BH, normalize, first
        return o, final, z_final

    @staticmethod
    def backward(ctx, do: Tensor | None, dfinal: Tensor | None, dz_final: Tensor | None):
        q, k, v, S0, z0, den, o, scores, starts, z_starts = ctx.saved_tensors
        BH, normalize, first = ctx.BH, ctx.normalize, ctx.first
        N, K, V = q.shape[0] // BH, q.shape[-1], v.shape[-1]
        if do is None:  # only the final state was used
            do = torch.zeros_like(v)
        if normalize:
            dden = (do * o).sum(-1).div_(den).neg_()  # o = num / den
            do = do / den[..., None]  # the numerator's gradient
        dscores = torch.bmm(do, v.transpose(1, 2))
        if normalize:
            dscores += dden[..., None]  # den_t = sum_{j<=t} q_t . k_j + q_t . z_start
        dscores.tril_()
        dq = torch.bmm(dscores, k)
        if first < N:
            dq[first * BH :].add_(torch.bmm(do[first * BH :], starts.transpose(1, 2)))
        del starts
        # G_n = dfinal + sum_{m > n} q_m^T do_m; chunk 0's own q^T do only feeds dS_0
        need_dS0 = S0 is not None and ctx.needs_input_grad[3]
        read_from = 0 if need_dS0 else 1
        qdo = torch.bmm(q[read_from * BH :].transpose(1, 2), do[read_from * BH :])
        sums = _running_sums(qdo.view(N - read_from, BH, K, V), dfinal, reverse=True)
        dS0 = sums[0] if need_dS0 else None
        last = N if dfinal is not None else N - 1  # G of the last chunk is dfinal: zero when it is None
        after = sums[1 - read_from : last + 1 - read_from].reshape(-1, K, V)  # (last * BH, K, V): G_0 .. G_{last-1}
        dk = torch.bmm(dscores.transpose(1, 2), q)
        del dscores
        dv = torch.bmm(scores.transpose(1, 2), do)
        if last > 0:
            dk[: last * BH].add_(torch.bmm(v[: last * BH], after.transpose(1, 2)))
            dv[: last * BH].add_(torch.bmm(k[: last * BH], after))
        dz0 = None
        if normalize:
            dq.addcmul_(dden[..., None], z_starts.reshape(N * BH, 1, -1))
            qz = torch.bmm(dden[:, None, :], q).view(N, BH, -1)  # (N, BH, K): sum_t dden_t q_t per chunk
            z_sums = _running_sums(qz, dz_final, reverse=True)
            dk += z_sums[1:].reshape(N * BH, 1, -1)
            if z0 is not None and ctx.needs_input_grad[4]:
                dz0 = z_sums[0]
        return dq, dk, dv, dS0, dz0, None, None, None, None


def linear_attn_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    initial_state: Tensor | None,
    chunk_size: int = 64,
    output_final_state: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """q (B, T, H, K), k (B, S, H, K), v (B, S, H, V), initial_state (B, H, K, V) or None -> (o, final state).

    With ``output_final_state=False`` the causal path returns None for the state and skips the last chunk's write."""
    if not causal:
        state = torch.einsum("bshk,bshv->bhkv", k, v)
        if initial_state is not None:
            state = state + initial_state
        return torch.einsum("bthk,bhkv->bthv", q, state), state
    return _causal(q, k, v, initial_state, None, chunk_size, False, 0.0, output_final_state)[:2]


def linear_attn_chunked_normalized(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: Tensor | None,
    chunk_size: int,
    eps: float,
    output_final_state: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Causal o_t = (q_t S_t) / (q_t . z_t + eps); initial_state and the returned state are (B, H, K, V + 1) with z
    as the last column, the layout of the ones-column formulation used by the other backends."""
    S0 = z0 = None
    if initial_state is not None:
        S0, z0 = initial_state[..., :-1], initial_state[..., -1]
    o, final, z_final = _causal(q, k, v, S0, z0, chunk_size, True, eps, output_final_state)
    return o, (torch.cat([final, z_final[..., None]], dim=-1) if output_final_state else None)


def _causal(q, k, v, S0, z0, chunk_size: int, normalize: bool, eps: float, need_final: bool):
    B, T, H, K = q.shape
    BH = B * H
    C = max(1, min(chunk_size, T))  # a chunk longer than the sequence only adds padding
    S0 = None if S0 is None else S0.reshape(BH, K, -1)
    z0 = None if z0 is None else z0.reshape(BH, K)
    o, final, z_final = _CausalChunked.apply(
        _to_chunks(q, C), _to_chunks(k, C), _to_chunks(v, C), S0, z0, BH, normalize, eps, need_final
    )
    final = None if final is None else final.view(B, H, *final.shape[1:])
    return _from_chunks(o, B, H, T), final, (None if z_final is None else z_final.view(B, H, K))
