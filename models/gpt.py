"""GPT: a decoder-only language model around any causal attention in the registry.

Token embedding (+ learned absolute positions if asked; RoPE lives in the attention layers that offer it), ``depth``
pre-norm blocks, a final norm and an LM head tied to the embedding (Press & Wolf 2017). The initialisation follows
GPT-2 / nanoGPT for the parts the model owns (N(0, 0.02), residual projections scaled by 1/sqrt(2 * depth)); attention
layers keep their own initialisation (Mamba's dt and A, for example, must not be overwritten).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.layers import Block, create_norm
from attnzoo.layers.factory import accepts_device_dtype
from attnzoo.models.pretrained import PretrainedMixin
from attnzoo.models.specs import link_layers, per_layer, with_position

POSITIONS = ("none", "learned")


class GPT(nn.Module, PretrainedMixin):
    """Decoder-only LM with per-layer attention (one spec, or a list with one spec per layer)."""

    task = "lm"  # the training task that fits this backbone (attnzoo.training.TASKS)

    @accepts_device_dtype
    def __init__(
        self,
        vocab_size: int,
        *,
        dim: int = 64,
        depth: int = 2,
        num_heads: int = 4,
        attention: Any = "softmax",
        max_seq_len: int = 1024,
        positions: str = "none",
        mlp: str = "gelu",
        mlp_ratio: float = 4.0,
        norm: str = "layernorm",
        dropout: float = 0.0,
        drop_path: float = 0.0,
        tie_weights: bool = True,
    ) -> None:
        """
        Args:
            vocab_size: number of token ids.
            dim: model width.
            depth: number of blocks.
            num_heads: attention heads per block.
            attention: a name, ``{"name": ..., **options}``, or a list of those with one entry per block.
            max_seq_len: longest sequence (prompt + generation) for learned positions.
            positions: ``none`` (position information comes from the attention, e.g. RoPE or recurrence) or
                ``learned`` (absolute embeddings, GPT-2).
            mlp: ``gelu`` or ``swiglu``.
            mlp_ratio: MLP hidden width / dim (0: no MLP, Mamba-style mixer-only blocks).
            norm: ``layernorm`` or ``rmsnorm``.
            dropout: embedding and MLP dropout.
            drop_path: stochastic depth, increasing linearly to this value over the blocks.
            tie_weights: share the LM head with the token embedding.
            device: where to create the parameters (``"meta"``: shapes only), as for torch modules.
            dtype: floating-point dtype of the parameters (built in float32, then converted; layers' float32_params
                stay float32 at least).
        """
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"GPT: positions must be one of {POSITIONS}; got {positions!r}.")
        self.vocab_size = vocab_size
        self.dim = dim
        self.depth = depth
        self.max_seq_len = max_seq_len
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(max_seq_len, dim) if positions == "learned" else None
        self.drop = nn.Dropout(dropout)
        specs = [with_position(spec, i, depth) for i, spec in enumerate(per_layer(attention, depth))]
        self.blocks = nn.ModuleList(
            Block(
                dim,
                num_heads,
                spec,
                causal=True,
                mlp=mlp,
                mlp_ratio=mlp_ratio,
                norm=norm,
                dropout=dropout,
                drop_path=drop_path * i / max(depth - 1, 1),
            )
            for i, spec in enumerate(specs)
        )
        link_layers([block.attn for block in self.blocks])  # cross-layer state such as RWKV-7's value residual
        self.norm = create_norm(norm, dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self._init_own_weights()
        if tie_weights:
            self.head.weight = self.tok_emb.weight

    def _init_own_weights(self) -> None:
        for module in [self.tok_emb, self.pos_emb, self.head]:
            if module is not None:
                nn.init.normal_(module.weight, std=0.02)
        for block in self.blocks:
            if block.mlp is None:
                continue
            for name, p in block.mlp.named_parameters():
                if p.dim() >= 2:
                    # residual projections scaled per GPT-2 paper so the residual stream's variance stays O(1)
                    std = 0.02 / math.sqrt(2 * self.depth) if name.startswith("fc2") else 0.02
                    nn.init.normal_(p, std=std)
                else:
                    nn.init.zeros_(p)

    @property
    def aux_loss(self) -> Tensor | None:
        """Sum of the attention layers' auxiliary losses from the last forward (None if no layer has one)."""
        losses = [b.attn.aux_loss for b in self.blocks if b.attn.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def new_caches(self, batch_size: int) -> list[Any]:
        """One decoding cache per block, for :meth:`forward` with ``caches=``."""
        return [block.attn.new_cache(batch_size) for block in self.blocks]

    def forward(
        self,
        idx: Tensor,
        *,
        padding_mask: Tensor | None = None,
        caches: list[Any] | None = None,
        offset: int = 0,
    ) -> Tensor:
        """Logits (B, T, vocab) for token ids ``idx`` (B, T).

        With ``caches`` (from :meth:`new_caches`), ``idx`` are the next T tokens after ``offset`` earlier ones.
        """
        if idx.dim() != 2:
            raise ValueError(f"GPT: idx must be (B, T) token ids; got shape {tuple(idx.shape)}.")
        _B, T = idx.shape
        if self.pos_emb is not None and offset + T > self.max_seq_len:
            raise ValueError(
                f"GPT: sequence of {offset + T} tokens is longer than max_seq_len={self.max_seq_len} of the learned "
                f"positions; build the model with a larger max_seq_len (model.max_seq_len=...)."
            )
        if caches is not None and len(caches) != len(self.blocks):
            raise ValueError(f"GPT: expected {len(self.blocks)} caches (one per block); got {len(caches)}.")
        x = self.tok_emb(idx)  # (B, T, dim)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(offset, offset + T, device=idx.device))
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, padding_mask=padding_mask, cache=None if caches is None else caches[i])
        return self.head(self.norm(x))

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Sample ``max_new_tokens`` continuations of ``idx`` (B, T); ``temperature=0`` is greedy decoding.

        With ``use_cache`` the prompt is run once and each new token costs one step of every layer's cache
        (constant time for recurrent layers, O(context) for softmax); without it every step re-runs the sequence.
        """
        if temperature < 0:
            raise ValueError(f"generate: temperature must be >= 0; got {temperature}.")
        was_training = self.training
        self.eval()
        caches = self.new_caches(idx.shape[0]) if use_cache else None
        out, step_input, offset = idx, idx, 0
        for _ in range(max_new_tokens):
            if use_cache:
                logits = self(step_input, caches=caches, offset=offset)[:, -1]
                offset += step_input.shape[1]
            else:
                logits = self(out)[:, -1]
            next_token = _sample(logits, temperature, top_k)
            out = torch.cat([out, next_token], dim=1)
            step_input = next_token
        self.train(was_training)
        return out


def _sample(logits: Tensor, temperature: float, top_k: int | None) -> Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
