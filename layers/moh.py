"""Mixture-of-Head attention (MoH) — Jin et al. 2024, "MoH: Multi-Head Attention as Head-Routing Mixture-of-Experts",
https://arxiv.org/abs/2410.11842. Reference impl: https://github.com/SkyworkAI/MoH (MoH-DiT/models.py, MoH-ViT,
MoH-LLaMA3).

Heads 0 .. h_s-1 are shared (always on), heads h_s .. h-1 are E = h - h_s routed heads of which each token uses k.
The head outputs are weighted, not averaged ("weighted summation of heads"), per query token t:

    p_t = softmax(W_r x_t)                          (E routed heads; ``wg``)
    r_t = k * p_t * 1[top-k] / sum_{top-k} p_t      (renormalised over the chosen heads, scaled by k)
    s_t = h_s * softmax(W_s x_t)                    (shared heads; ``wg_1``; s_t = 1 when h_s == 1)
    (a1, a2) = 2 * softmax(W_0 x_t)                 (shared vs routed; ``wg_0``)
    y_t = proj( concat_i g_{t,i} head_i(t) ),       g_t = [a1 s_t, a2 r_t]
    L_b = E * sum_i P_i f_i,  P_i = mean_t p_{t,i},  f_i = mean_t 1[i in top-k(t)]      (= k at perfect balance)

The count scalings make zero routers give all-one gates, so MoH with k = E and zero routers is exactly multi-head
attention. ``aux_loss = lb_coeff * L_b`` in training (lb_coeff 0.01: MoH-ViT engine.py), statistics over the
non-padded query tokens; None in eval.

Routers (``router=``):

* ``learned`` (default; the paper, MoH-ViT and MoH-DiT): as above. The DiT code builds ``wg_1`` only for h_s > 1 but
  calls it for any h_s > 0 (a crash at h_s = 1); we follow the ViT code, s_t = 1 for h_s == 1.
* ``query_norm`` (the released MoH-LLaMA3 inference code): parameter-free; logit_i = ||q_{t,i}||_2 over the routed
  heads divided by their standard deviation across heads, softmax, top-k, and a *binary* gate (1 for the shared and
  the selected heads, 0 otherwise). It has no load-balance loss (as released). Needs k >= 1 and E >= 2.

Defaults: ``shared_heads = num_heads // 2`` and ``routed_heads = max(1, num_heads // 4)`` are MoH-LLaMA3's split
(32 heads: 16 shared + top-8 of 16 routed, 75% of the heads active); the ViT/DiT configs choose them per stage.
Parameter names are timm's (``qkv``, ``proj``) and the official router names (``wg``, ``wg_0``, ``wg_1``), so
:meth:`MoHAttention.from_official` loads an official MoH-DiT ``MoHAttention`` state dict by a straight key copy.
Gating needs only the query-side token, so causal masks, cross-attention and the KV cache work unchanged; the cache
keeps every head (a later token may route to any head). Every head is computed densely and an unselected head's
output is multiplied by 0, so MoH here costs about what softmax attention costs; skipping those heads needs a sparse
kernel (not implemented).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.errors import unknown
from attnzoo.layers.kv_cache import KVCache
from attnzoo.layers.registry import ALL_PATTERNS, Attention, register_attention
from attnzoo.layers.rope import RotaryEmbedding
from attnzoo.layers.softmax import SoftmaxAttention

ROUTERS = ("learned", "query_norm")


@dataclass
class MoHRouting:
    """The routing decision of one forward, per query token."""

    gates: Tensor  # (B, T, H) weight of each head's output; 0 for routed heads not chosen
    probs: Tensor | None  # (B, T, E) router softmax over the routed heads (None without routed heads)
    indices: Tensor | None  # (B, T, k) chosen routed heads, 0-based among the routed heads


@register_attention("moh")
class MoHAttention(Attention):
    """Mixture-of-Head attention: shared heads plus top-k routed heads per token, head outputs weighted by gates."""

    patterns = ALL_PATTERNS
    # the q/k/v path is softmax attention's, parameter names included (qkv or q + kv, q_norm, k_norm, rope)
    project = SoftmaxAttention.project
    attend = SoftmaxAttention.attend

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        shared_heads: int | None = None,
        routed_heads: int | None = None,
        router: str = "learned",
        lb_coeff: float = 0.01,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        qk_norm: bool = False,
        rope: bool = False,
        rope_base: float = 10000.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        """
        Args:
            dim: model width.
            num_heads: all heads h (shared + routed); head_dim = dim // num_heads.
            causal: query i sees keys j <= i.
            cross: keys/values from ``context``; gates still come from the query-side ``x``.
            shared_heads: always-on heads h_s (default num_heads // 2, MoH-LLaMA3).
            routed_heads: routed heads used per token, k (default max(1, num_heads // 4), capped at E = h - h_s).
                k = 0 needs h_s = h (weighted multi-head attention).
            router: ``learned`` (paper, ViT/DiT) or ``query_norm`` (parameter-free, MoH-LLaMA3 release).
            lb_coeff: weight beta of the load-balance loss in ``aux_loss`` (0.01, MoH-ViT engine.py).
            qkv_bias: bias in the q/k/v projection (timm default False; MoH-DiT uses True).
            proj_bias: bias in the output projection.
            qk_norm: LayerNorm over the head dim on q and k.
            rope: rotary position embedding on q and k.
            rope_base: RoPE frequency base.
            attn_drop: dropout on attention probabilities (training only).
            proj_drop: dropout after the output projection.
        """
        super().__init__(dim, num_heads, causal=causal, cross=cross)
        label = self.name
        if router not in ROUTERS:
            raise ValueError(f"{label}: " + unknown("router", router, ROUTERS))
        if shared_heads is None:
            shared_heads = num_heads // 2
        if not isinstance(shared_heads, int) or not 0 <= shared_heads <= num_heads:
            raise ValueError(
                f"{label}: shared_heads must be an integer in [0, num_heads={num_heads}]; got {shared_heads!r}."
            )
        num_routed = num_heads - shared_heads  # E, the experts of the router
        if routed_heads is None:
            routed_heads = min(max(1, num_heads // 4), num_routed)
        if not isinstance(routed_heads, int) or not 0 <= routed_heads <= num_routed:
            raise ValueError(
                f"{label}: routed_heads (top-k) must be an integer in [0, num_heads - shared_heads = {num_routed}]; "
                f"got {routed_heads!r}."
            )
        if routed_heads == 0 and num_routed > 0:
            raise ValueError(
                f"{label}: routed_heads=0 would never use the {num_routed} routed heads; set shared_heads={num_heads} "
                f"for weighted multi-head attention or routed_heads >= 1."
            )
        if router == "query_norm" and (routed_heads < 1 or num_routed < 2):
            raise ValueError(
                f"{label}: router='query_norm' divides the query norms by their std over the routed heads, so it "
                f"needs routed_heads >= 1 and num_heads - shared_heads >= 2; got routed_heads={routed_heads}, "
                f"{num_routed} routed head(s). Lower shared_heads or use router='learned'."
            )
        if lb_coeff < 0:
            raise ValueError(f"{label}: lb_coeff must be >= 0; got {lb_coeff!r}.")
        self.shared_heads = shared_heads
        self.routed_heads = routed_heads
        self.num_routed = num_routed
        self.router = router
        self.lb_coeff = lb_coeff
        if cross:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.rope = RotaryEmbedding(self.head_dim, rope_base) if rope else None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        # router weights exist exactly when the official code creates them, so official state dicts load strictly
        self.wg = self.wg_0 = self.wg_1 = None
        if router == "learned":
            if routed_heads > 0:
                self.wg = nn.Linear(dim, num_routed, bias=False)
                if shared_heads > 0:
                    self.wg_0 = nn.Linear(dim, 2, bias=False)
            if shared_heads > 1:
                self.wg_1 = nn.Linear(dim, shared_heads, bias=False)
        # fraction of (query token, head) pairs with a non-zero gate in the last forward, over non-padded tokens;
        # a detached 0-dim tensor (float(layer.head_usage) for a number) so logging it does not sync a GPU
        self.head_usage: Tensor | None = None

    @classmethod
    def from_official(cls, state_dict: dict[str, Tensor], **init_kwargs: Any) -> MoHAttention:
        """Build from an official MoH ``MoHAttention`` (MoH-DiT/models.py) configuration and state dict.

        Args:
            state_dict: the official module's ``state_dict()`` (keys ``qkv``, ``proj``, ``wg``, ``wg_0``, ``wg_1``).
            **init_kwargs: the official constructor arguments: ``dim``, ``num_heads``, ``qkv_bias``, ``qk_norm``,
                ``attn_drop``, ``proj_drop``, ``shared_head``, ``routed_head``, ``head_dim`` (None or dim // heads).

        Returns:
            A non-causal self-attention ``moh`` layer with the learned router, in the state dict's dtype.
        """
        kwargs = dict(init_kwargs)
        dim, num_heads = kwargs.pop("dim"), kwargs.pop("num_heads", 8)
        head_dim = kwargs.pop("head_dim", None)
        if head_dim is not None and head_dim * num_heads != dim:
            raise ValueError(
                f"moh.from_official: head_dim={head_dim} with num_heads={num_heads} gives width {head_dim * num_heads}"
                f" != dim={dim}; attnzoo layers keep head_dim = dim // num_heads."
            )
        kwargs.pop("norm_layer", None)  # LayerNorm in the official code, as here
        mapping = {"shared_head": "shared_heads", "routed_head": "routed_heads"}
        options = {mapping.get(k, k): v for k, v in kwargs.items()}
        options.setdefault("shared_heads", 0)
        options.setdefault("routed_heads", 0)
        layer = cls(dim, num_heads, router="learned", **options)
        dtype = next(iter(state_dict.values())).dtype
        layer.to(dtype).load_state_dict(state_dict, strict=True)
        return layer

    def route(self, x: Tensor, q: Tensor | None = None) -> MoHRouting:
        """The per-token head gates for the query-side input ``x`` (B, T, dim).

        ``q`` (B, T, H, D), the projected queries before qk-norm and RoPE, is needed by the ``query_norm`` router;
        it is computed from ``x`` when not given. Gates are computed in float32 at least (float64 stays float64).
        """
        B, T, _ = x.shape
        dtype = torch.promote_types(x.dtype, torch.float32)
        h_s, k = self.shared_heads, self.routed_heads
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            if self.router == "query_norm":
                if q is None:
                    q = self._project_q(x)
                logits = q[:, :, h_s:].to(dtype).norm(dim=-1)  # (B, T, E)
                # divide by the spread across heads (MoH-LLaMA3); clamped where all norms are equal
                std = logits.std(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).eps)
                probs = torch.softmax(logits / std, dim=-1)
                indices = probs.topk(k, dim=-1).indices  # (B, T, k)
                chosen = torch.zeros_like(probs).scatter_(-1, indices, 1.0)
                gates = torch.cat([chosen.new_ones(B, T, h_s), chosen], dim=-1)  # binary gates (B, T, H)
                return MoHRouting(gates, probs, indices)
            shared = None
            if h_s == 1:  # the ViT rule (the DiT code has no wg_1 for a single shared head)
                shared = x.new_ones(B, T, 1)
            elif h_s > 1:
                shared = h_s * torch.softmax(F.linear(x, self.wg_1.weight.to(dtype)), dim=-1)  # (B, T, h_s)
            if k == 0:
                return MoHRouting(shared, None, None)
            probs = torch.softmax(F.linear(x, self.wg.weight.to(dtype)), dim=-1)  # (B, T, E)
            indices = probs.topk(k, dim=-1).indices  # (B, T, k)
            chosen = torch.zeros_like(probs).scatter_(-1, indices, 1.0)
            routed = probs * chosen
            routed = k * routed / routed.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).eps)
            if shared is None:
                return MoHRouting(routed, probs, indices)
            mix = 2 * torch.softmax(F.linear(x, self.wg_0.weight.to(dtype)), dim=-1)  # (B, T, 2): a1, a2
            gates = torch.cat([mix[..., :1] * shared, mix[..., 1:] * routed], dim=-1)  # (B, T, H)
            return MoHRouting(gates, probs, indices)

    def load_balance_loss(self, routing: MoHRouting, valid: Tensor | None = None) -> Tensor:
        """L_b = E * sum_i P_i f_i over the ``valid`` (B, T) query tokens (all if None); k at perfect balance."""
        probs = routing.probs
        chosen = torch.zeros_like(probs).scatter_(-1, routing.indices, 1.0)
        if valid is None:
            valid = torch.ones(probs.shape[:2], dtype=torch.bool, device=probs.device)
        weight = valid.to(probs.dtype)[..., None]  # (B, T, 1)
        count = weight.sum().clamp_min(1.0)  # no valid token: loss 0, not NaN
        mean_prob = (probs * weight).sum(dim=(0, 1)) / count  # P_i (E,)
        frac_chosen = (chosen * weight).sum(dim=(0, 1)) / count  # f_i (E,)
        return self.num_routed * (mean_prob * frac_chosen).sum()

    def _project_q(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        if self.cross:
            return self.q(x).view(B, T, self.num_heads, self.head_dim)
        bias = None if self.qkv.bias is None else self.qkv.bias[: self.dim]
        return F.linear(x, self.qkv.weight[: self.dim], bias).view(B, T, self.num_heads, self.head_dim)

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        self.check_inputs(x, context, padding_mask, cache)
        B, T, _ = x.shape
        q, k, v = self.project(x, context)
        routing = self.route(x, q)  # from the projected queries, before qk-norm and RoPE (query_norm router)
        o = self.attend(q, k, v, padding_mask=padding_mask, cache=cache)  # (B, T, H, D)
        o = o * routing.gates[..., None].to(o.dtype)  # weighted summation of heads (through proj)
        # in self-attention the padding mask also marks which query tokens are real
        valid = None if self.cross else padding_mask
        used = (routing.gates != 0).to(routing.gates.dtype).mean(dim=-1)  # (B, T)
        if valid is not None:
            # the mean over real tokens (over all when none is real), as a weighted mean: no data-dependent branch
            weight = valid.to(used.dtype)
            weight = torch.where(weight.sum() > 0, weight, torch.ones_like(weight))
            used = (used * weight).sum() / weight.sum()
        self.head_usage = used.mean().detach()
        self.aux_loss = None
        if self.training and self.router == "learned" and self.routed_heads > 0:
            self.aux_loss = self.lb_coeff * self.load_balance_loss(routing, valid)
        return self.proj_drop(self.proj(o.reshape(B, T, self.dim)))

    def new_cache(self, batch_size: int) -> KVCache:
        if not self.causal:
            return super().new_cache(batch_size)  # raises: only causal layers decode
        return KVCache(batch_size)

    def state_size(self, seq_len: int) -> int:
        return 2 * seq_len * self.dim  # keys and values of every head: any head may be routed to later

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, shared_heads={self.shared_heads}, routed_heads={self.routed_heads} "
            f"of {self.num_routed}, router={self.router}"
        )
