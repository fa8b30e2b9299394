"""Performer (FAVOR+) — Choromanski et al. 2021, "Rethinking Attention with Performers", ICLR 2021,
https://arxiv.org/abs/2009.14794

Softmax attention is approximated by positive orthogonal random features (eq. 7, Lemma 1), per head:

    x~ = x * D^-1/4,   u = W x~,   W: (M, D) orthogonal random rows (one matrix per layer, shared by the heads)
    phi(x) = M^-1/2 * (exp(u - |x~|^2/2 - c) + feature_eps)     E[phi(q).phi(k)] = exp(q.k / sqrt(D))  (eps = c = 0)
    o_i = phi(q_i)^T sum_j phi(k_j) v_j^T / (phi(q_i)^T sum_j phi(k_j) + denom_eps)          (j <= i if causal)

``kernel="relu"`` is the generalized kernel phi(x) = ReLU(W x~) + feature_eps (Section 2.2). The sums run through
``attnzoo.kernels.linear_attn`` (chunked prefix sums when causal), so cost is O((T + S) M D).

Defaults and their sources: nb_features 256 (the paper's and the official JAX ``make_fast_softmax_attention``; the
yaml keeps it), ortho_scaling 0 (chi-distributed row norms, both official codes), feature_redraw_interval 1000,
feature_eps 1e-4 for softmax and 1e-3 for relu (performer-pytorch), denom_eps 1e-6 (JAX numerical_stabilizer).

Deliberate differences from performer-pytorch 1.1.4 (each one option away; ``official_favor_options`` and
``Performer.from_official`` select the official behaviour, which the golden tests reproduce to 1e-10):

* ``sign_correct_qr=True``: Q's columns are multiplied by sign(diag R), so the random rows are Haar-uniform (without
  it LAPACK's sign convention biases the first column of every block).
* ``stabilizer="prefix"``: the key stabiliser c_i is the running max over the real keys j <= i of
  max_m(u_j - |k~_j|^2/2) (all real keys when non-causal), and output i is computed exactly as if every key had been
  shifted by c_i, including the feature_eps term. Causal output i therefore equals the non-causal layer on the prefix
  x[:i+1]: the layer is exactly causal and prefill-then-step equals the full forward. The query stabiliser
  max_m u - |q~|^2/2 (a per-query constant, which cancels) keeps a large-norm query from underflowing to the
  eps-only uniform row. ``stabilizer="official"`` uses one max of u over all keys and features per (batch, head), also
  when causal (so y_i then depends on later keys through feature_eps and no cache is possible), and max_m u for
  queries.
* ``eps_placement="denominator"``: den = phi(q).z + denom_eps in both modes. performer-pytorch adds 1e-6 to every
  entry of the causal key sum (``"key_sum"``: den = phi(q).(z + eps 1)) and uses no eps when non-causal.
* Padded keys have their features zeroed (performer-pytorch zeroes v only, so padded keys stay in the denominator).
  Padded keys are also left out of every stabiliser max.

Exactness note: in float32 a spread of more than ~40 nats between key logits inside one call makes the per-position
rescale exp(c_T - c_i) saturate; outputs stay finite, but are then approximate at the early positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.errors import unknown
from attnzoo.kernels import linear_attn
from attnzoo.layers.registry import Attention, register_attention

KERNELS = ("softmax", "relu")
STABILIZERS = ("prefix", "official")
EPS_PLACEMENTS = ("denominator", "key_sum")


def orthogonal_random_features(
    nb_features: int,
    head_dim: int,
    *,
    scaling: int = 0,
    sign_correct: bool = True,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """Gaussian orthogonal random matrix W (nb_features, head_dim), the FAVOR+ projection (paper Section 2.4).

    Rows come in blocks of ``head_dim`` orthonormal rows (QR of a Gaussian matrix; the last block is truncated), then
    each row is rescaled: ``scaling=0`` by the norm of a fresh N(0, I) vector (chi-distributed, so each row is
    marginally Gaussian-like), ``scaling=1`` by sqrt(head_dim).

    Args:
        nb_features: M, the number of random features (rows).
        head_dim: D, the head dimension (columns).
        scaling: 0 (chi norms) or 1 (sqrt(D)), performer-pytorch's ``ortho_scaling``.
        sign_correct: multiply Q's columns by sign(diag R) so the blocks are Haar-distributed (QR's sign convention
            otherwise fixes the sign pattern of R and biases Q).
        generator: torch RNG to draw from (the global one if None).
        dtype: dtype of the result (drawn and orthogonalised in float64).
        device: device of the result (drawn on the CPU).
    """
    if scaling not in (0, 1):
        raise ValueError(f"performer: ortho_scaling must be 0 (chi row norms) or 1 (sqrt(D)); got {scaling!r}.")
    nb_blocks = -(-nb_features // head_dim)
    gaussian = torch.randn(nb_blocks, head_dim, head_dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)  # one batched QR: a loop of small QRs is ~50x slower on a loaded CPU
    if sign_correct:
        q = q * torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0)[:, None, :]
    matrix = q.transpose(1, 2).reshape(nb_blocks * head_dim, head_dim)[:nb_features]  # (M, D), rows orthonormal
    if scaling == 0:
        norms = torch.randn(nb_features, head_dim, generator=generator, dtype=torch.float64).norm(dim=1)
    else:
        norms = torch.full((nb_features,), math.sqrt(head_dim), dtype=torch.float64)
    return (matrix * norms[:, None]).to(device=device, dtype=dtype)


def official_favor_options(causal: bool, generalized_attention: bool = False) -> dict[str, Any]:
    """The ``favor_attention`` / ``Performer`` options that reproduce performer-pytorch 1.1.4's ``FastAttention``.

    Args:
        causal: the official module's ``causal`` (it decides where its eps goes).
        generalized_attention: the official ReLU kernel instead of softmax features.
    """
    return {
        "kernel": "relu" if generalized_attention else "softmax",
        "feature_eps": 1e-3 if generalized_attention else 1e-4,
        "denom_eps": 1e-6 if causal else 0.0,  # official non-causal: 1 / (phi(q) . sum phi(k)), no eps
        "eps_placement": "key_sum",
        "stabilizer": "official",
        "normalize_data": True,
    }


def favor_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection_matrix: Tensor,
    *,
    causal: bool,
    kernel: str = "softmax",
    feature_eps: float = 1e-4,
    denom_eps: float = 1e-6,
    eps_placement: str = "denominator",
    stabilizer: str = "prefix",
    normalize_data: bool = True,
    padding_mask: Tensor | None = None,
    initial_state: tuple[Tensor, Tensor] | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """FAVOR+ attention on given per-head q, k, v (the functional core of :class:`Performer`).

    Keys j are written as phi(k_j) = ratio * (exp(a_j - c) + feature_eps) with a_j = u_j - |k~_j|^2/2. With the
    reference shift c_ref of this call and r_i = exp(c_ref - c_i), the score of query i and key j in query i's own
    shift c_i is ``[r_i phi(q_i), feature_eps sum(phi(q_i))] . ratio [exp(a_j - c_ref), 1]``, so one linear-attention
    call over M + 1 features (v with a ones column for the denominator) gives every position its exact prefix result.

    Args:
        q: (B, T, H, D) queries, k: (B, S, H, D) keys, v: (B, S, H, V) values (before any feature map).
        projection_matrix: (M, D) random features W.
        causal: query i sees keys j <= i (needs S == T).
        kernel: "softmax" (positive random features) or "relu" (ReLU(W x~) + feature_eps).
        feature_eps: added to every feature.
        denom_eps: denominator guard, placed by ``eps_placement``.
        eps_placement: "denominator" (phi(q).z + eps) or "key_sum" (phi(q).(z + eps), performer-pytorch causal).
        stabilizer: "prefix" (exactly causal running max) or "official" (performer-pytorch's global max).
        normalize_data: scale q and k by D^-1/4 before the projection.
        padding_mask: (B, S) bool, True = real key; padded keys get zero features.
        initial_state: ``(state (B, H, M + 1, V + 1), key_max (B, H))`` from an earlier call (causal decoding).
        output_final_state: also return the state after the last key.

    Returns:
        ``(o, final)``: o (B, T, H, V) in float32 (float64 for float64 inputs); ``final = (state, key_max)`` if
        ``output_final_state`` else None.
    """
    if kernel not in KERNELS:
        raise ValueError("performer: " + unknown("kernel", kernel, KERNELS))
    if stabilizer not in STABILIZERS:
        raise ValueError("performer: " + unknown("stabilizer", stabilizer, STABILIZERS))
    if eps_placement not in EPS_PLACEMENTS:
        raise ValueError("performer: " + unknown("eps_placement", eps_placement, EPS_PLACEMENTS))
    if causal and initial_state is not None and stabilizer == "official" and kernel == "softmax":
        raise ValueError(
            "performer: stabilizer='official' takes one max over the whole sequence, so it cannot continue from a "
            "state; use stabilizer='prefix' for incremental decoding."
        )
    acc = torch.float64 if torch.float64 in (q.dtype, k.dtype, v.dtype) else torch.float32
    # features, sums and denominators in float32 even under bf16/fp16 autocast: exp features underflow in half
    with torch.autocast(q.device.type, enabled=False):
        q, k, v, W = q.to(acc), k.to(acc), v.to(acc), projection_matrix.to(acc)
        M = W.shape[0]
        data_scale = q.shape[-1] ** -0.25 if normalize_data else 1.0
        u_q = torch.einsum("bthd,md->bthm", q * data_scale, W)  # (B, T, H, M)
        u_k = torch.einsum("bshd,md->bshm", k * data_scale, W)  # (B, S, H, M)
        keep = None if padding_mask is None else padding_mask[:, :, None]  # (B, S, 1)
        prev_state, prev_max = initial_state if initial_state is not None else (None, None)
        if kernel == "relu":
            ratio = 1.0  # performer-pytorch's generalized kernel has no M^-1/2
            base_q = F.relu(u_q) + feature_eps  # phi(q) / ratio
            shifted_k = F.relu(u_k)  # (B, S, H, M)
            if keep is not None:
                shifted_k = shifted_k * keep[..., None]
            r = None
            key_max = torch.zeros(q.shape[0], q.shape[2], dtype=acc, device=q.device) if prev_max is None else prev_max
        else:
            ratio = M**-0.5
            sq_q = q.square().sum(-1, keepdim=True) * data_scale**2 / 2  # |q~|^2 / 2, (B, T, H, 1)
            sq_k = k.square().sum(-1, keepdim=True) * data_scale**2 / 2  # (B, S, H, 1)
            u_max = u_k.detach().amax(-1)  # (B, S, H)
            if stabilizer == "official":
                q_shift = u_q.detach().amax(-1, keepdim=True) + sq_q
                peak = u_max  # official: max of u, without -|k~|^2/2
            else:
                q_shift = u_q.detach().amax(-1, keepdim=True)  # = max_m(u - |q~|^2/2) + |q~|^2/2
                peak = u_max - sq_k.detach()[..., 0]  # max_m a_j, a_j = u_j - |k~_j|^2/2
            base_q = torch.exp(u_q - q_shift) + feature_eps  # phi(q) / ratio, (B, T, H, M)
            if keep is not None:
                peak = peak.masked_fill(~keep, -math.inf)
            if causal and stabilizer == "prefix":
                running = peak.cummax(dim=1).values  # c_i before the carried max, (B, S, H)
                if prev_max is not None:
                    running = torch.maximum(running, prev_max[:, None])
                key_max = running[:, -1]  # (B, H)
            else:
                key_max = peak.amax(dim=1)
                running = None
            ref = torch.where(torch.isfinite(key_max), key_max, torch.zeros_like(key_max))  # c_ref; 0 if no keys
            key_shift = sq_k + ref[:, None, :, None]  # (B, S, H, 1): one small tensor, one pass over (B, S, H, M)
            if keep is not None:
                key_shift = key_shift.masked_fill(~keep[..., None], math.inf)  # exp -> 0: no feature at all
            shifted_k = torch.exp(u_k - key_shift)  # exp(a_j - c_ref) <= 1
            r = None
            if running is not None:
                running = torch.where(torch.isfinite(running), running, ref[:, None])  # no key yet: any shift
                # saturate instead of overflowing; only reached when key logits spread > log(max)/2 in one call
                limit = math.log(torch.finfo(acc).max) / 2
                r = torch.exp((ref[:, None] - running).clamp(max=limit))[..., None]  # (B, T, H, 1)
            if prev_state is not None:
                rescale = torch.exp(prev_max - ref)  # carried rows were shifted by c_prev; 0 when c_prev = -inf
                prev_state = torch.cat([prev_state[:, :, :M] * rescale[..., None, None], prev_state[:, :, M:]], 2)
        ones_k = torch.ones_like(shifted_k[..., :1])  # (B, S, H, 1)
        if keep is not None:
            ones_k = ones_k * keep[..., None]
        k_feat = torch.cat([shifted_k, ones_k], dim=-1)  # (B, S, H, M + 1)
        # both features carry the M^-1/2 ratio: put ratio^2 on the query side, in the small per-position factor
        sum_q = base_q.sum(-1, keepdim=True)  # (B, T, H, 1)
        q_scale = ratio**2 if r is None else r * ratio**2
        q_feat = torch.cat([base_q * q_scale, (feature_eps * ratio**2) * sum_q], -1)  # (B, T, H, M + 1)
        v_ext = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # (B, S, H, V + 1): last column -> z
        o, state = linear_attn(
            q_feat,
            k_feat,
            v_ext,
            causal=causal,
            normalize=False,
            initial_state=prev_state,
            output_final_state=output_final_state,
        )
        numerator, z = o[..., :-1], o[..., -1]  # (B, T, H, V), (B, T, H)
        # performer-pytorch's causal eps sits on every entry of the key sum: phi(q).(z + eps 1)
        guard = (denom_eps * ratio) * sum_q[..., 0] if eps_placement == "key_sum" else denom_eps
        den = z + guard
        den = den.masked_fill(den == 0, 1.0)  # nothing to attend to (all keys padded, eps 0): output 0, not NaN
        o = numerator / den[..., None]
    return o, ((state, key_max) if output_final_state else None)


@dataclass
class PerformerCache:
    """Decoding state of one causal Performer layer: constant size in the sequence length.

    ``state`` (B, H, M + 1, V + 1) float32: rows :M hold sum_j exp(a_j - key_max) [v_j, 1] (S and z), row M holds
    sum_j [v_j, 1] (the feature_eps part); ``key_max`` (B, H) is the running key stabiliser; ``length`` the
    number of positions seen.
    """

    batch_size: int
    state: Tensor | None = None
    key_max: Tensor | None = None
    length: int = 0


@register_attention("performer")
class Performer(Attention):
    """Performer / FAVOR+: softmax approximated by positive orthogonal random features (linear in length)."""

    patterns = frozenset({"noncausal_self", "causal_self", "noncausal_cross"})
    pattern_note = "FAVOR+ has no aligned-stream causal cross form here; use softmax or cosformer for causal_cross."

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        nb_features: int = 256,
        kernel: str = "softmax",
        ortho_scaling: int = 0,
        feature_redraw_interval: int | None = 1000,
        feature_eps: float | None = None,
        denom_eps: float = 1e-6,
        eps_placement: str = "denominator",
        stabilizer: str = "prefix",
        normalize_data: bool = True,
        sign_correct_qr: bool = True,
        qkv_bias: bool = False,
        out_bias: bool = True,
        proj_drop: float = 0.0,
    ) -> None:
        """
        Args:
            dim: model width.
            num_heads: heads; head_dim = dim // num_heads.
            causal: query i sees keys j <= i.
            cross: keys/values from ``context``.
            nb_features: M random features per head (paper: 256; performer-pytorch: int(D ln D)).
            kernel: "softmax" (FAVOR+ positive features) or "relu" (generalized kernel).
            ortho_scaling: row norms of W: 0 chi-distributed, 1 sqrt(D).
            feature_redraw_interval: redraw W every this many training forwards (None: never). Never in eval.
            feature_eps: added to every feature; None = 1e-4 for softmax, 1e-3 for relu (performer-pytorch).
            denom_eps: denominator guard (JAX numerical_stabilizer 1e-6).
            eps_placement: "denominator" (phi(q).z + eps) or "key_sum" (performer-pytorch causal).
            stabilizer: "prefix" (exactly causal, streamable) or "official" (performer-pytorch; no cache).
            normalize_data: scale q and k by D^-1/4 (both official codes).
            sign_correct_qr: Haar-uniform orthogonal blocks (False: performer-pytorch's draw).
            qkv_bias: bias in to_q/to_k/to_v (performer-pytorch: False).
            out_bias: bias in to_out (performer-pytorch: True).
            proj_drop: dropout after to_out.
        """
        super().__init__(dim, num_heads, causal=causal, cross=cross)
        if kernel not in KERNELS:
            raise ValueError("performer: " + unknown("kernel", kernel, KERNELS))
        if stabilizer not in STABILIZERS:
            raise ValueError("performer: " + unknown("stabilizer", stabilizer, STABILIZERS))
        if eps_placement not in EPS_PLACEMENTS:
            raise ValueError("performer: " + unknown("eps_placement", eps_placement, EPS_PLACEMENTS))
        if not isinstance(nb_features, int) or nb_features < 1:
            raise ValueError(f"performer: nb_features must be a positive int (paper: 256); got {nb_features!r}.")
        if feature_redraw_interval is not None and (
            not isinstance(feature_redraw_interval, int) or feature_redraw_interval < 1
        ):
            raise ValueError(
                f"performer: feature_redraw_interval must be a positive int or None (never redraw); "
                f"got {feature_redraw_interval!r}."
            )
        feature_eps = (1e-3 if kernel == "relu" else 1e-4) if feature_eps is None else feature_eps
        if feature_eps < 0 or denom_eps < 0:
            raise ValueError(f"performer: feature_eps and denom_eps must be >= 0; got {feature_eps!r}, {denom_eps!r}.")
        self.nb_features = nb_features
        self.ortho_scaling = ortho_scaling
        self.sign_correct_qr = sign_correct_qr
        self.feature_redraw_interval = feature_redraw_interval
        self.favor_options = {
            "kernel": kernel,
            "feature_eps": feature_eps,
            "denom_eps": denom_eps,
            "eps_placement": eps_placement,
            "stabilizer": stabilizer,
            "normalize_data": normalize_data,
        }
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_out = nn.Linear(dim, dim, bias=out_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        # persistent buffers: a checkpoint reproduces the features and resumes the redraw schedule
        self.register_buffer("projection_matrix", self._draw(torch.get_default_dtype()))
        self.register_buffer("calls_since_redraw", torch.zeros((), dtype=torch.long))

    def _draw(self, dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
        return orthogonal_random_features(
            self.nb_features,
            self.head_dim,
            scaling=self.ortho_scaling,
            sign_correct=self.sign_correct_qr,
            dtype=dtype,
            device=device,
        )

    @torch.no_grad()
    def redraw_features(self) -> None:
        """Draw a new projection matrix W in place (same dtype and device)."""
        W = self.projection_matrix
        W.copy_(self._draw(W.dtype, W.device))

    def _count_training_call(self) -> None:
        """Redraw W so that each matrix serves exactly ``feature_redraw_interval`` training forwards."""
        if self.feature_redraw_interval is None:
            return
        if int(self.calls_since_redraw) >= self.feature_redraw_interval:
            self.redraw_features()
            self.calls_since_redraw.zero_()
        self.calls_since_redraw += 1

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: PerformerCache | None = None,
    ) -> Tensor:
        self.check_inputs(x, context, padding_mask, cache)
        if self.training and cache is None:  # a redraw mid-decoding would invalidate the cached state
            self._count_training_call()
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        source = context if self.cross else x
        S = source.shape[1]
        q = self.to_q(x).view(B, T, H, D)
        k = self.to_k(source).view(B, S, H, D)
        v = self.to_v(source).view(B, S, H, D)
        initial = None
        if cache is not None and cache.state is not None:
            initial = (cache.state, cache.key_max)
        o, final = favor_attention(
            q,
            k,
            v,
            self.projection_matrix,
            causal=self.causal,
            padding_mask=padding_mask,
            initial_state=initial,
            output_final_state=cache is not None,
            **self.favor_options,
        )  # (B, T, H, D)
        if cache is not None:
            cache.state, cache.key_max = final
            cache.length += T
        return self.proj_drop(self.to_out(o.reshape(B, T, self.dim).to(x.dtype)))

    def new_cache(self, batch_size: int) -> PerformerCache:
        if not self.causal:
            return super().new_cache(batch_size)  # raises: only causal layers decode
        if self.favor_options["stabilizer"] == "official" and self.favor_options["kernel"] == "softmax":
            raise ValueError(
                "performer: stabilizer='official' takes one max over the whole sequence, so it cannot decode "
                "incrementally; build the layer with stabilizer='prefix' (the default)."
            )
        return PerformerCache(batch_size)

    def state_size(self, seq_len: int) -> int:
        # (M + 1) x (D + 1) state and one running max per head, whatever the length
        return self.num_heads * ((self.nb_features + 1) * (self.head_dim + 1) + 1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nb_features={self.nb_features}, kernel={self.favor_options['kernel']}"

    @classmethod
    def from_official(
        cls,
        state_dict: dict[str, Tensor],
        *,
        dim: int,
        causal: bool = False,
        heads: int = 8,
        dim_head: int = 64,
        local_heads: int = 0,
        nb_features: int | None = None,
        feature_redraw_interval: int | None = 1000,
        generalized_attention: bool = False,
        kernel_fn: Any = None,
        dropout: float = 0.0,
        no_projection: bool = False,
        qkv_bias: bool = False,
        attn_out_bias: bool = True,
        **unsupported: Any,
    ) -> Performer:
        """Build a layer that reproduces performer-pytorch 1.1.4's ``SelfAttention`` with its ``state_dict``.

        Keyword arguments are the official ``Attention.__init__`` ones (``dim``, ``heads``, ``dim_head``, ...); the
        layer uses :func:`official_favor_options` and the official W (loaded, so ``sign_correct_qr`` only affects
        later redraws, where it is set False as well). The layer takes the state_dict's dtype.

        Raises:
            ValueError: settings the zoo contract cannot express (dim_head * heads != dim, local heads,
                ``no_projection``, a kernel_fn other than ReLU, a state_dict of the wrong shape).
        """
        if unsupported:
            raise TypeError(f"Performer.from_official: unsupported official argument(s) {sorted(unsupported)}.")
        if dim_head * heads != dim:
            raise ValueError(
                f"Performer.from_official: the zoo contract has head_dim = dim // num_heads, so dim_head * heads must "
                f"equal dim; got dim={dim}, heads={heads}, dim_head={dim_head} (performer-pytorch's dim_head defaults "
                f"to 64: pass it explicitly)."
            )
        if local_heads or no_projection:
            raise ValueError(
                f"Performer.from_official: local_heads={local_heads}, no_projection={no_projection} are not supported; "
                f"only global FAVOR+ heads with a projection matrix convert."
            )
        if kernel_fn is not None and not isinstance(kernel_fn, nn.ReLU):
            raise ValueError(f"Performer.from_official: only kernel_fn=nn.ReLU() converts; got {kernel_fn!r}.")
        key = "fast_attention.projection_matrix"
        if key not in state_dict:
            raise ValueError(f"Performer.from_official: state_dict has no {key!r}; keys: {sorted(state_dict)}.")
        W = state_dict[key]
        if nb_features is not None and W.shape[0] != nb_features:
            raise ValueError(f"Performer.from_official: nb_features={nb_features} but {key} has {W.shape[0]} rows.")
        layer = cls(
            dim,
            heads,
            causal=causal,
            nb_features=W.shape[0],
            feature_redraw_interval=feature_redraw_interval,
            sign_correct_qr=False,
            qkv_bias=qkv_bias,
            out_bias=attn_out_bias,
            proj_drop=dropout,
            **official_favor_options(causal, generalized_attention),
        ).to(W.dtype)
        ours = {("projection_matrix" if name == key else name): value for name, value in state_dict.items()}
        missing, unexpected = layer.load_state_dict(ours, strict=False)
        if unexpected or set(missing) - {"calls_since_redraw"}:
            raise ValueError(
                f"Performer.from_official: state_dict does not match a SelfAttention(dim={dim}, heads={heads}, "
                f"dim_head={dim_head}, qkv_bias={qkv_bias}, attn_out_bias={attn_out_bias}); missing "
                f"{sorted(set(missing) - {'calls_since_redraw'})}, unexpected {sorted(unexpected)}."
            )
        return layer
