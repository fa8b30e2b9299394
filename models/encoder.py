"""Encoder: a bidirectional transformer for sequence classification around any ``noncausal_self`` attention.

Token embedding, an optional learned CLS token (BERT, Devlin et al. 2019, https://arxiv.org/abs/1810.04805), learned
absolute positions or rotary ones (RoFormer, Su et al. 2021: ``rope=True`` is passed to every layer that has that
option; recurrent layers such as GLA or Mamba carry order in their scan and need none), ``depth`` pre-norm
:class:`attnzoo.layers.Block`s, a final norm, CLS or masked-mean pooling and a linear head. This is the LRA
classification set-up (Tay et al. 2021, https://arxiv.org/abs/2011.04006).

Padding: ``padding_mask`` (B, T), True = real token, goes to every attention layer (padded keys have no influence)
and to the mean pooling; the CLS token is prepended so right padding never moves a real token. So padding a batch
leaves the logits of its unpadded examples unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo.layers import Block, attention_info, create_norm, split_spec
from attnzoo.layers.factory import accepts_device_dtype
from attnzoo.models.pretrained import PretrainedMixin
from attnzoo.models.specs import per_layer

log = logging.getLogger(__name__)

POSITIONS = ("learned", "rope", "none")
POOLS = ("cls", "mean")


class Encoder(nn.Module, PretrainedMixin):
    """Bidirectional encoder + classification head, per-layer attention, CLS or mean pooling."""

    task = "classification"

    @accepts_device_dtype
    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        *,
        dim: int = 64,
        depth: int = 2,
        num_heads: int = 4,
        attention: Any = "softmax",
        max_seq_len: int = 512,
        positions: str = "learned",
        pool: str = "cls",
        mlp: str = "gelu",
        mlp_ratio: float = 4.0,
        norm: str = "layernorm",
        dropout: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        """
        Args:
            vocab_size: number of token ids.
            num_classes: classifier outputs.
            dim: model width.
            depth: number of blocks.
            num_heads: attention heads per block.
            attention: a name, ``{"name": ..., **options}``, or a list with one entry per block.
            max_seq_len: longest input (without the CLS token) for learned positions.
            positions: ``learned`` (absolute embeddings), ``rope`` (rotary, in layers with a ``rope`` option) or
                ``none``.
            pool: ``cls`` (a learned token prepended, its output classifies) or ``mean`` (mean over real tokens).
            mlp: ``gelu`` or ``swiglu``.
            mlp_ratio: MLP hidden width / dim.
            norm: ``layernorm`` or ``rmsnorm``.
            dropout: embedding, MLP and head dropout.
            drop_path: stochastic depth, increasing linearly to this value over the blocks.
            device: where to create the parameters (``"meta"``: shapes only), as for torch modules.
            dtype: floating-point dtype of the parameters (built in float32, then converted; layers' float32_params
                stay float32 at least).
        """
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"Encoder: positions must be one of {POSITIONS}; got {positions!r}.")
        if pool not in POOLS:
            raise ValueError(f"Encoder: pool must be one of {POOLS}; got {pool!r}.")
        self.vocab_size = vocab_size
        self.num_classes = num_classes
        self.max_seq_len = max_seq_len
        self.pool = pool
        num_prefix = 1 if pool == "cls" else 0
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos_emb = nn.Embedding(max_seq_len + num_prefix, dim) if positions == "learned" else None
        self.drop = nn.Dropout(dropout)
        specs = [self._with_rope(s) if positions == "rope" else s for s in per_layer(attention, depth)]
        self.blocks = nn.ModuleList(
            Block(
                dim,
                num_heads,
                spec,
                causal=False,
                mlp=mlp,
                mlp_ratio=mlp_ratio,
                norm=norm,
                dropout=dropout,
                drop_path=drop_path * i / max(depth - 1, 1),
            )
            for i, spec in enumerate(specs)
        )
        self.attention_names = [split_spec(s)[0] for s in specs]
        self.norm = create_norm(norm, dim)
        self.head = nn.Linear(dim, num_classes)
        for module in (self.tok_emb, self.pos_emb):
            if module is not None:
                nn.init.normal_(module.weight, std=0.02)  # BERT / GPT-2 embedding init
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        nn.init.zeros_(self.head.bias)
        nn.init.normal_(self.head.weight, std=0.02)

    @staticmethod
    def _with_rope(spec: Any) -> Any:
        name, options = split_spec(spec)
        if "rope" not in attention_info(name).options:
            log.info("Encoder: %s has no rope option; it gets no position embedding (positions=rope).", name)
            return spec
        return {"name": name, "rope": True, **options}

    @property
    def aux_loss(self) -> Tensor | None:
        """Sum of the attention layers' auxiliary losses from the last forward (None if no layer has one)."""
        losses = [b.attn.aux_loss for b in self.blocks if b.attn.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def forward_features(self, idx: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Pooled features (B, dim) for token ids ``idx`` (B, T); ``padding_mask`` (B, T) bool, True = real."""
        if idx.dim() != 2:
            raise ValueError(f"Encoder: idx must be (B, T) token ids; got shape {tuple(idx.shape)}.")
        B, T = idx.shape
        if self.pos_emb is not None and self.max_seq_len < T:
            raise ValueError(
                f"Encoder: sequence of {T} tokens is longer than max_seq_len={self.max_seq_len}; build the model "
                f"with a larger max_seq_len (model.max_seq_len=...)."
            )
        if padding_mask is not None and (padding_mask.dtype != torch.bool or padding_mask.shape != idx.shape):
            raise ValueError(
                f"Encoder: padding_mask must be bool of shape {tuple(idx.shape)} (True = real token); got "
                f"{padding_mask.dtype} {tuple(padding_mask.shape)}."
            )
        x = self.tok_emb(idx)  # (B, T, dim)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1 + T, dim)
            if padding_mask is not None:
                padding_mask = torch.cat([padding_mask.new_ones(B, 1), padding_mask], dim=1)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(x.shape[1], device=idx.device))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, padding_mask=padding_mask)
        x = self.norm(x)
        if self.pool == "cls":
            return x[:, 0]
        if padding_mask is None:
            return x.mean(dim=1)
        weights = padding_mask.to(x.dtype)[..., None]  # (B, T, 1)
        return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)

    def forward(self, idx: Tensor, *, padding_mask: Tensor | None = None) -> Tensor:
        """Class logits (B, num_classes)."""
        return self.head(self.drop(self.forward_features(idx, padding_mask)))
