"""Hedgehog — Zhang, Bhatia, Kumbong & Ré 2024, "The Hedgehog & the Porcupine: Expressive Linear Attentions with
Softmax Mimicry", ICLR 2024, https://arxiv.org/abs/2402.04347. Reference impls: HazyResearch/lolcats
(``src/model/feature_map.py``: ``FeatureMapMLP`` + ``SoftmaxDim``; ``src/model/linear_attention/linear_attention.py``);
also fla-org/flash-linear-attention (``fla/modules/feature_map.py``, ``HedgehogFeatureMap``).

Linear attention whose feature map is learned per head so that phi(q) . phi(k) mimics exp(q . k): a linear map
y = W_h x + b_h (W_h: head_dim x feature_dim) followed by a spiky, non-negative, "fullspace" activation that sees
both signs of y::

    activation="softmax" (default):  phi(x) = [softmax_f(y) ; softmax_f(-y)]  (2 feature_dim features, each half
                                     sums to 1), clamped below at eps
    activation="exp":                phi(x) = [exp(y) ; exp(-y)]               (the paper's Hedgehog listing)

    o_i = sum_j phi_q(q_i) . phi_k(k_j) v_j / (sum_j phi_q(q_i) . phi_k(k_j) + eps)

with j <= i for causal_self, j <= i + S - T for causal_cross (bottom-right aligned, :mod:`attnzoo.layers.cross`),
all j otherwise; q and k have separate maps (LoLCATs' ``tie_qk_kernels: false``, ``tie_qk=True`` shares one). The
sums run through :func:`attnzoo.kernels.linear_attn` (chunked on CPU, O(T)), so causal Hedgehog decodes with the
constant state S = sum_j phi_k(k_j)^T v_j, z = sum_j phi_k(k_j) per head.

Which activation the official code uses: LoLCATs' configs (``feature_map: softmax_dim``, ``fullspace: true``) use
the per-half softmax over the feature dim, so that is the default; the paper's listing exponentiates [W x ; -W x]
directly (``exp``); fla's ``HedgehogFeatureMap`` takes one softmax over all 2F entries of [2 y ; -2 y]. They differ by
per-token positive factors (and fla's by the factor 2 in y), which cancel for a query (numerator and denominator
scale alike) but not for a key. For ``exp`` each query's features are computed as exp(+-y - max|y|) (an exact
rescaling, it cancels); key features are exp(+-y) of y clamped to [-EXP_LIMIT, EXP_LIMIT] so that the float32
state cannot overflow.

Defaults: W initialised to the identity per head (the paper's listing: ``nn.init.eye_`` on an
``nn.Linear(head_dim, head_dim)``; LoLCATs' ``zero_init`` option does the same; its distillation configs start from
Kaiming-uniform instead), feature_dim = head_dim (the paper's square map), no bias (LoLCATs ``bias: false``; set
``feature_bias=True`` for the paper's ``nn.Linear`` bias, initialised to zero there), eps = 1e-12 for both the
feature clamp and the denominator (LoLCATs ``feature_map_kwargs.eps`` and ``LolcatsLinearAttention.eps``), q/k/v/o
projections without bias (the Llama/Mistral layers LoLCATs converts). Queries enter the map unscaled (no 1/sqrt(d)).
``rope=True`` rotates q and k (RoPE, base 10000) before the maps, as LoLCATs does with the Llama layer's rotary
embedding (the maps then see absolute positions: phi(R_i q) . phi(R_j k) is not a function of i - j); off by default,
as in the paper's Hedgehog. Positions follow ``softmax``: a cache's offset, bottom-right alignment in causal_cross.

The paper trains phi by softmax mimicry: a cross-entropy between the teacher's softmax attention weights and the
linear attention weights, :func:`hedgehog_distillation_loss` (on the layer's projected q and k, ``q_proj(x)`` viewed
as (B, T, H, head_dim)).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnzoo.layers.cross import query_start, rotate_from
from attnzoo.layers.linear import LinearAttentionCache, feature_linear_attention
from attnzoo.layers.registry import ALL_PATTERNS, Attention, register_attention
from attnzoo.layers.rope import RotaryEmbedding

ACTIVATIONS = ("softmax", "exp")
EXP_LIMIT = 30.0  # exp(30) ~ 1e13: a sum over a million keys of such features stays far below float32's 3e38


class HedgehogFeatureMap(nn.Module):
    """phi(x) = act(W_h x + b_h) per head, W_h (head_dim x feature_dim) initialised to the identity.

    Maps (B, T, H, head_dim) to (B, T, H, 2 feature_dim) features, in float32 at least (they feed float32 state
    sums; bf16 softmax or exp loses too much). ``is_query`` selects the exact per-token rescaling of the ``exp``
    activation that only a query may take (see the module docstring).
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        feature_dim: int,
        *,
        activation: str = "softmax",
        bias: bool = False,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        self.activation = activation
        self.eps = eps
        # (H, D, F): eye_ per head is the identity for F == D and the leading identity block otherwise
        self.weight = nn.Parameter(torch.eye(head_dim, feature_dim).repeat(num_heads, 1, 1))
        self.bias = nn.Parameter(torch.zeros(num_heads, feature_dim)) if bias else None

    def forward(self, x: Tensor, *, is_query: bool = False) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            y = torch.einsum("bthd,hdf->bthf", x.to(dtype), self.weight.to(dtype))  # (B, T, H, F)
            if self.bias is not None:
                y = y + self.bias.to(dtype)
            if self.activation == "softmax":
                features = torch.cat([torch.softmax(y, dim=-1), torch.softmax(-y, dim=-1)], dim=-1)
                return features.clamp_min(self.eps)
            if is_query:  # one factor exp(-max|y|) on both halves: it cancels in the ratio, and exp <= 1
                shift = y.abs().amax(dim=-1, keepdim=True)
                features = torch.cat([torch.exp(y - shift), torch.exp(-y - shift)], dim=-1)
            else:
                y = y.clamp(-EXP_LIMIT, EXP_LIMIT)
                features = torch.cat([torch.exp(y), torch.exp(-y)], dim=-1)
            return features.clamp_min(self.eps)


def hedgehog_distillation_loss(
    q: Tensor,
    k: Tensor,
    feature_map: nn.Module,
    key_feature_map: nn.Module | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    eps: float = 1e-12,
) -> Tensor:
    """Softmax-mimicry loss of the paper: cross-entropy between softmax and Hedgehog attention weights.

    Teacher A_ij = softmax_j(scale q_i . k_j), student A^_ij = phi_q(q_i) . phi_k(k_j) / sum_l phi_q(q_i) . phi_k(k_l)
    (both over j <= i if ``causal``); loss = mean over batch, heads and queries of -sum_j A_ij log A^_ij. The teacher
    is detached (it is the target). Quadratic in T: meant for the short sequences distillation uses.

    Args:
        q: (B, T, H, D) projected queries (before any feature map).
        k: (B, S, H, D) projected keys.
        feature_map: the query map, e.g. ``layer.feature_map_q``; also used for keys unless ``key_feature_map``.
        key_feature_map: the key map, e.g. ``layer.feature_map_k``.
        causal: mask j > i (needs S == T).
        scale: the teacher's logit scale; default 1/sqrt(D).
        eps: added to the student's row sums.

    Returns:
        a scalar tensor.
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"hedgehog_distillation_loss: q (B, T, H, D) and k (B, S, H, D) must agree in B, H, D; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}."
        )
    T, S = q.shape[1], k.shape[1]
    if causal and S != T:
        raise ValueError(f"hedgehog_distillation_loss: causal=True needs as many keys as queries; got T={T}, S={S}.")
    key_feature_map = feature_map if key_feature_map is None else key_feature_map
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = torch.promote_types(q.dtype, torch.float32)
    allowed = torch.ones(T, S, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril()
    with torch.autocast(q.device.type, enabled=False):
        logits = torch.einsum("bthd,bshd->bhts", q.to(dtype), k.to(dtype)) * scale  # (B, H, T, S)
        teacher = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).detach()
        scores = torch.einsum("bthf,bshf->bhts", feature_map(q, is_query=True), key_feature_map(k))
        scores = scores.masked_fill(~allowed, 0.0)
        # log of the masked entries is taken at 1 (teacher weight 0 there), which keeps their gradient finite
        log_student = torch.log(scores.masked_fill(~allowed, 1.0)) - torch.log(scores.sum(-1, keepdim=True) + eps)
        return -(teacher * log_student).sum(-1).mean()


@register_attention("hedgehog")
class HedgehogAttention(Attention):
    """Hedgehog: linear attention with a learned, softmax-mimicking feature map (Zhang et al. 2024)."""

    patterns = ALL_PATTERNS

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        feature_dim: int | None = None,
        activation: str = "softmax",
        feature_bias: bool = False,
        tie_qk: bool = False,
        eps: float = 1e-12,
        bias: bool = False,
        rope: bool = False,
        rope_base: float = 10000.0,
    ) -> None:
        """
        Args:
            dim: model width.
            num_heads: heads; values use head_dim = dim // num_heads.
            causal: query i sees keys j <= i.
            cross: keys/values from ``context``.
            feature_dim: output width F of the learned map per head (2F features after the activation); None =
                head_dim (the paper's square map, initialised to the identity).
            activation: ``"softmax"`` ([softmax(y); softmax(-y)], LoLCATs/fla) or ``"exp"`` ([exp(y); exp(-y)],
                the paper's listing).
            feature_bias: learned bias b_h in the map (zero-initialised, as the paper's ``nn.Linear``).
            tie_qk: one feature map for queries and keys (LoLCATs ``tie_qk_kernels``: False).
            eps: feature clamp and denominator epsilon (LoLCATs: 1e-12).
            bias: bias in the q/k/v/o projections (the Llama layers LoLCATs converts: False).
            rope: rotary position embedding on q and k before the feature maps (LoLCATs keeps the Llama layer's).
            rope_base: RoPE frequency base.
        """
        super().__init__(dim, num_heads, causal=causal, cross=cross)
        feature_dim = self.head_dim if feature_dim is None else feature_dim
        if not isinstance(feature_dim, int) or isinstance(feature_dim, bool) or feature_dim <= 0:
            raise ValueError(f"hedgehog: feature_dim must be a positive int or None (= head_dim); got {feature_dim!r}.")
        if activation not in ACTIVATIONS:
            raise ValueError(f"hedgehog: activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}.")
        if not eps >= 0:
            raise ValueError(f"hedgehog: eps must be >= 0; got {eps!r}.")
        self.feature_dim = feature_dim
        self.activation = activation
        self.eps = eps
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)
        maps = [
            HedgehogFeatureMap(num_heads, self.head_dim, feature_dim, activation=activation, bias=feature_bias, eps=eps)
            for _ in range(1 if tie_qk else 2)
        ]
        self.feature_map_q, self.feature_map_k = maps[0], maps[-1]
        self.rope = RotaryEmbedding(self.head_dim, rope_base) if rope else None

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: LinearAttentionCache | None = None,
    ) -> Tensor:
        self.check_inputs(x, context, padding_mask, cache)
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        source = context if self.cross else x
        S = source.shape[1]
        q, k = self.q_proj(x).view(B, T, H, D), self.k_proj(source).view(B, S, H, D)
        if self.rope is not None:  # positions as in softmax: the cache's offset, bottom-right in causal_cross
            offset = 0 if cache is None else cache.length
            q_offset = query_start(T, S, offset, causal=self.causal, cross=self.cross, name=self.name)
            q, k = rotate_from(self.rope, q, q_offset), self.rope(k, offset)
        q = self.feature_map_q(q, is_query=True)  # (B, T, H, 2F)
        k = self.feature_map_k(k)  # (B, S, H, 2F)
        v = self.v_proj(source).view(B, S, H, D)  # (B, S, H, D)
        o = feature_linear_attention(self, q, k, v, padding_mask, cache)
        return self.o_proj(o.reshape(B, T, self.dim).to(x.dtype))

    def new_cache(self, batch_size: int) -> LinearAttentionCache:
        if not self.causal:
            return super().new_cache(batch_size)  # raises: only causal layers decode
        return LinearAttentionCache(batch_size)

    def state_size(self, seq_len: int) -> int:
        return self.num_heads * 2 * self.feature_dim * (self.head_dim + 1)  # S and z per head, independent of seq_len

    def extra_repr(self) -> str:
        rope = ", rope=True" if self.rope is not None else ""
        return f"{super().extra_repr()}, feature_dim={self.feature_dim}, activation={self.activation}{rope}"
