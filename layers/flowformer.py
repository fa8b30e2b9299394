"""Flowformer (Flow-Attention) — Wu et al. 2022, "Flowformer: Linearizing Transformers with Conservation Flows",
ICML 2022, https://arxiv.org/abs/2202.06258. Reference impl: https://github.com/thuml/Flowformer
(``Flow_Attention.py``: ``Flow_Attention`` and ``Flow_Attention_Causal``).

Attention as a flow network: the keys are sources, the queries sinks, the capacity of the edge (i, j) is
phi(q_i) . phi(k_j) with phi = sigmoid. Per head, with n queries (sinks) and m keys (sources), eps added to every
entry of the vectors it sits beside (the official placement):

    I_i  = 1 / ((phi(q_i) + eps) . (sum_j phi(k_j) + eps))                incoming flow of sink i (normaliser)
    O_j  = 1 / ((phi(k_j) + eps) . (sum_i phi(q_i) + eps))                outgoing flow of source j (normaliser)
    I^_i = (phi(q_i) + eps) . (sum_j phi(k_j) O_j + eps)                  conserved incoming flow (sources fixed to 1)
    O^_j = clamp((phi(k_j) + eps) . (sum_i phi(q_i) I_i + eps), -1, 1)    conserved outgoing flow (sinks fixed to 1)
    o_i  = sigmoid(I^_i * n / m) * (phi(q_i) I_i) sum_j phi(k_j)^T (softmax_j(O^_j) * m * v_j)
                                                                          allocation * normalised aggregation
                                                                          of the competed values

Without eps the flows are conserved: sum_j O^_j = n (each sink receives flow 1) and sum_i I^_i = m; the competition
softmax_j(O^) * m sums to m over the sources. Causal (``Flow_Attention_Causal``): every sum over j becomes the prefix
sum over j <= i and is divided by the position count n_i = i (1-based), approximating the non-causal flows:

    I_i  = n_i / ((phi(q_i) + eps) . (sum_{j<=i} phi(k_j) + eps))
    O_i  = n_i / ((phi(k_i) + eps) . (sum_{j<=i} phi(q_j) + eps))
    I^_i = (phi(q_i) + eps) . (sum_{j<=i} phi(k_j) O_j + eps) / n_i
    O^_i = clamp((phi(k_i) + eps) . (sum_{j<=i} phi(q_j) I_j + eps) / n_i, -1, 1)
    c_i  = exp(O^_i) / sum_{j<=i} exp(O^_j) * n_i                         causal competition
    o_i  = sigmoid(I^_i) * (phi(q_i) I_i / n_i) sum_{j<=i} phi(k_j)^T (c_j v_j)

Everything is a prefix sum, so the causal layer decodes with a constant-size state: the four running D-vectors, the
running sum of exp(O^) and the K x V state of :func:`attnzoo.kernels.linear_attn` (which computes the last sum,
chunked on CPU, O(T)). The clamp keeps exp(O^) in [1/e, e], so its running sum cannot overflow.

Padding: a padded token is treated as absent. Its features are zeroed (it adds nothing to any sum), it is left out of
the competition and the counts n, m and n_i count real tokens only; for self-attention that holds for it as a query
too, since sum_i phi(q_i) enters every key's flow. Defaults (``Flow_Attention``): eps 1e-6, projections with bias
(``nn.Linear``), parameter names ``query_projection``/``key_projection``/``value_projection``/``out_projection`` as
the official module, so its state dict loads directly. The official output dropout is 0.05; here ``proj_drop``
defaults to 0.0 like every zoo layer (set 0.05 for the official regularisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnzoo.kernels import linear_attn
from attnzoo.layers.registry import Attention, register_attention


@dataclass
class FlowState:
    """Running sums of a causal Flow-Attention stream (per batch and head), float32 or float64.

    ``sum_k``/``sum_q`` (B, H, D): sum phi(k_j), sum phi(q_j); ``sum_k_out``/``sum_q_in`` (B, H, D): sum phi(k_j) O_j,
    sum phi(q_j) I_j; ``sum_exp`` (B, H): sum exp(O^_j); ``kv`` (B, H, D, V): sum phi(k_j)^T c_j v_j; ``count`` (B,)
    int64: real tokens consumed (n_i of the next token is ``count`` + 1 if it is real).
    """

    sum_k: Tensor
    sum_q: Tensor
    sum_k_out: Tensor
    sum_q_in: Tensor
    sum_exp: Tensor
    kv: Tensor
    count: Tensor


def conservation_flows(q: Tensor, k: Tensor, *, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The non-causal flows of :func:`flow_attention` (before the clamp of O^), for the conservation tests.

    Args:
        q: (B, T, H, D) sink features phi(q), zero at absent (padded) queries.
        k: (B, S, H, D) source features phi(k), zero at padded keys.
        eps: the official eps (added entrywise to the vectors of each dot product).

    Returns:
        ``(incoming, outgoing, conserved_sink, conserved_source)``: I and I^ (B, T, H), O and O^ (B, S, H).
    """
    sum_k, sum_q = k.sum(1), q.sum(1)  # (B, H, D)
    incoming = 1.0 / torch.einsum("bthd,bhd->bth", q + eps, sum_k + eps)  # (B, T, H)
    outgoing = 1.0 / torch.einsum("bshd,bhd->bsh", k + eps, sum_q + eps)  # (B, S, H)
    conserved_sink = torch.einsum("bthd,bhd->bth", q + eps, (k * outgoing[..., None]).sum(1) + eps)
    conserved_source = torch.einsum("bshd,bhd->bsh", k + eps, (q * incoming[..., None]).sum(1) + eps)
    return incoming, outgoing, conserved_sink, conserved_source


def _noncausal(q: Tensor, k: Tensor, v: Tensor, eps: float, query_mask: Tensor | None, key_mask: Tensor | None):
    B, T, S = q.shape[0], q.shape[1], k.shape[1]
    if query_mask is not None:
        q = q * query_mask[:, :, None, None]
    if key_mask is not None:
        k, v = k * key_mask[:, :, None, None], v * key_mask[:, :, None, None]
    n = (query_mask.sum(1) if query_mask is not None else q.new_full((B,), T)).to(q.dtype).view(B, 1, 1)
    m = (key_mask.sum(1) if key_mask is not None else q.new_full((B,), S)).to(q.dtype).view(B, 1, 1)
    incoming, _, conserved_sink, conserved_source = conservation_flows(q, k, eps=eps)
    conserved_source = conserved_source.clamp(-1.0, 1.0)  # official "for stability"
    allocation = torch.sigmoid(conserved_sink * (n / m.clamp_min(1)))  # (B, T, H)
    # softmax over the real sources; O^ lies in [-1, 1], so exp needs no max shift and cannot overflow
    weight = torch.exp(conserved_source)
    if key_mask is not None:
        weight = weight * key_mask[:, :, None]
    competition = weight / weight.sum(1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny) * m  # (B, S, H)
    o, _ = linear_attn(q * incoming[..., None], k, v * competition[..., None], causal=False, normalize=False)
    return o * allocation[..., None], None


def _causal(q: Tensor, k: Tensor, v: Tensor, eps: float, mask: Tensor | None, state: FlowState | None):
    B, T = q.shape[:2]
    real = mask if mask is not None else torch.ones(B, T, dtype=torch.bool, device=q.device)
    if mask is not None:
        q, k, v = q * mask[:, :, None, None], k * mask[:, :, None, None], v * mask[:, :, None, None]
    count = real.long().cumsum(1)  # (B, T) real tokens at positions <= i
    if state is not None:
        count = count + state.count[:, None]
    # n_i: the official (arange + 1), counting real tokens; >= 1 so a leading padded position divides by 1
    normal = count.clamp_min(1).to(q.dtype)[:, :, None]  # (B, T, 1)

    def prefix(x: Tensor, carried: Tensor | None) -> Tensor:  # inclusive prefix sum over time, continued from a state
        out = x.cumsum(1)
        return out if carried is None else out + carried[:, None]

    cum_k = prefix(k, None if state is None else state.sum_k)  # (B, T, H, D)
    cum_q = prefix(q, None if state is None else state.sum_q)
    incoming = normal / torch.einsum("bthd,bthd->bth", q + eps, cum_k + eps)  # (B, T, H)
    outgoing = normal / torch.einsum("bthd,bthd->bth", k + eps, cum_q + eps)
    cum_k_out = prefix(k * outgoing[..., None], None if state is None else state.sum_k_out)
    cum_q_in = prefix(q * incoming[..., None], None if state is None else state.sum_q_in)
    conserved_sink = torch.einsum("bthd,bthd->bth", q + eps, cum_k_out + eps) / normal
    conserved_source = (torch.einsum("bthd,bthd->bth", k + eps, cum_q_in + eps) / normal).clamp(-1.0, 1.0)
    allocation = torch.sigmoid(conserved_sink)
    weight = torch.exp(conserved_source) * real[:, :, None]  # in [1/e, e] at real tokens, 0 at padded ones
    cum_weight = prefix(weight, None if state is None else state.sum_exp)  # (B, T, H)
    # a real token's own weight is in its running sum, so only a leading padded position meets 0 / 0
    competition = weight / cum_weight.clamp_min(torch.finfo(q.dtype).tiny) * normal
    o, kv = linear_attn(
        q * (incoming / normal)[..., None],
        k,
        v * competition[..., None],
        causal=True,
        normalize=False,
        initial_state=None if state is None else state.kv,
        output_final_state=True,
    )
    new_state = FlowState(
        cum_k[:, -1], cum_q[:, -1], cum_k_out[:, -1], cum_q_in[:, -1], cum_weight[:, -1], kv, count[:, -1]
    )
    return o * allocation[..., None], new_state


def flow_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    eps: float = 1e-6,
    query_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
    state: FlowState | None = None,
) -> tuple[Tensor, FlowState | None]:
    """Flow-Attention on sigmoid features (the functional core of :class:`Flowformer`, equations in the module doc).

    Args:
        q: (B, T, H, D) query features phi(q) = sigmoid(W_q x).
        k: (B, S, H, D) key features phi(k).
        v: (B, S, H, V) values.
        causal: prefix flows normalised by position (``Flow_Attention_Causal``); needs S == T.
        eps: the official eps, added entrywise inside every flow dot product.
        query_mask: (B, T) bool, True = real query; False leaves the query out of sum_i phi(q_i) and the count n
            (non-causal self-attention with padding).
        key_mask: (B, S) bool, True = real key. Causal: the mask of the tokens (queries and keys alike).
        state: running sums of a causal stream from an earlier call, or None at a sequence start.

    Returns:
        ``(o, state)``: o (B, T, H, V) in float32 at least; the causal stream's new :class:`FlowState` (None when
        non-causal).
    """
    dtype = torch.promote_types(q.dtype, torch.float32)
    # flows, exp and the sums in float32 at least, also under bf16/fp16 autocast
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if causal:
            return _causal(q, k, v, eps, key_mask, state)
        return _noncausal(q, k, v, eps, query_mask, key_mask)


@dataclass
class FlowformerCache:
    """Decoding state of one causal Flowformer layer (constant size: see :class:`FlowState`)."""

    batch_size: int
    state: FlowState | None = None


@register_attention("flowformer")
class Flowformer(Attention):
    """Flowformer: sigmoid linear attention with conservation flows (competition of sources, allocation to sinks)."""

    patterns = frozenset({"noncausal_self", "causal_self", "noncausal_cross"})

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        eps: float = 1e-6,
        bias: bool = True,
        proj_drop: float = 0.0,
    ) -> None:
        """
        Args:
            dim: model width.
            num_heads: heads; head_dim = dim // num_heads is the feature and value dimension.
            causal: the causal flows of ``Flow_Attention_Causal`` (query i sees keys j <= i).
            cross: keys/values from ``context`` (sources and sinks of different lengths, as ``Flow_Attention``).
            eps: added entrywise inside every flow dot product (official 1e-6).
            bias: bias in the four projections (official ``nn.Linear`` default, True).
            proj_drop: dropout after the output projection (official 0.05; 0.0 here like every zoo layer).
        """
        super().__init__(dim, num_heads, causal=causal, cross=cross)
        if not eps >= 0:
            raise ValueError(f"flowformer: eps must be >= 0; got {eps!r}.")
        self.eps = eps
        self.query_projection = nn.Linear(dim, dim, bias=bias)
        self.key_projection = nn.Linear(dim, dim, bias=bias)
        self.value_projection = nn.Linear(dim, dim, bias=bias)
        self.out_projection = nn.Linear(dim, dim, bias=bias)
        self.dropout = nn.Dropout(proj_drop)

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: FlowformerCache | None = None,
    ) -> Tensor:
        self.check_inputs(x, context, padding_mask, cache)
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        source = context if self.cross else x
        S = source.shape[1]
        q = torch.sigmoid(self.query_projection(x).view(B, T, H, D))  # (B, T, H, D) non-negative sink features
        k = torch.sigmoid(self.key_projection(source).view(B, S, H, D))  # (B, S, H, D) source features
        v = self.value_projection(source).view(B, S, H, D)  # (B, S, H, D)
        query_mask = None if self.cross else padding_mask  # self-attention: a padded token is no sink either
        o, state = flow_attention(
            q,
            k,
            v,
            causal=self.causal,
            eps=self.eps,
            query_mask=query_mask,
            key_mask=padding_mask,
            state=None if cache is None else cache.state,
        )
        if cache is not None:
            cache.state = state
        return self.dropout(self.out_projection(o.reshape(B, T, self.dim).to(x.dtype)))

    def new_cache(self, batch_size: int) -> FlowformerCache:
        if not self.causal:
            return super().new_cache(batch_size)  # raises: only causal layers decode
        return FlowformerCache(batch_size)

    def state_size(self, seq_len: int) -> int:
        D = self.head_dim
        # per head: four running D-vectors, the running sum of exp(O^) and the D x D aggregation state
        return self.num_heads * (4 * D + 1 + D * D)
