"""Seq2Seq: an encoder-decoder transformer (Vaswani et al. 2017, "Attention Is All You Need",
https://arxiv.org/abs/1706.03762) around any registered attention, chosen separately for the encoder's self
attention, the decoder's self attention and the decoder's cross attention, per layer if wanted.

    memory = norm(encoder blocks(embed(src) + pos))                 every block: x + attn(norm(x)), x + mlp(norm(x))
    h      = embed(tgt) + pos
    h      = h + self_attn(norm1(h))                                causal_self, target padding mask
    h      = h + cross_attn(norm2(h), context=memory)               noncausal_cross, source padding mask on the keys
    h      = h + mlp(norm3(h));   logits = head(norm(h))            head tied to the embedding

Pre-norm blocks (Xiong et al. 2020, https://arxiv.org/abs/2002.04745) instead of the paper's post-norm: they train
without warmup tricks at the small, fast-learning-rate sizes a CPU run uses. One vocabulary and one embedding matrix
for source, target and the output layer (the paper, section 3.4: "we share the same weight matrix between the two
embedding layers and the pre-softmax linear transformation"); the generated tasks (attnzoo.data.seq2seq) read and
write the same symbols. Positions are learned absolute embeddings, one table for the encoder and one for the
decoder (the paper's sinusoids are the fixed alternative; BART learns them); self-attention layers may add RoPE.

Cross attention takes no RoPE (``rope=True`` is rejected): rotating decoder queries and encoder keys by their own
indices would relate positions of two different sequences, and it would make the query's index part of the layer,
so that cached generation, which runs cross attention for the new position alone, could not be exact.

Generation encodes the source once; every decoder self-attention layer decodes with its own ``new_cache`` (a KV
cache for softmax, a constant-size state for recurrent layers), and cross attention, which has no cache in the
contract, runs on the new position only: a ``noncausal_cross`` output at position t depends on the query at t and
the fixed encoder output alone, so this is exact. The encoder output's key/value projections are recomputed at each
step (O(S * dim^2) per layer and step); the contract gives no way to cache them across calls.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.layers import DropPath
from torch import Tensor, nn

from attnzoo.layers import Block, build_attention, create_mlp, create_norm, split_spec
from attnzoo.layers.factory import accepts_device_dtype
from attnzoo.models.gpt import _sample
from attnzoo.models.pretrained import PretrainedMixin
from attnzoo.models.specs import per_layer

POSITIONS = ("learned", "none")


class DecoderBlock(nn.Module):
    """Pre-norm decoder block: causal self attention, cross attention over the encoder output, MLP."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attention: Any = "softmax",
        cross_attention: Any = "softmax",
        *,
        mlp: str = "gelu",
        mlp_ratio: float = 4.0,
        norm: str = "layernorm",
        dropout: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        """
        Args:
            dim: model width.
            num_heads: heads of both attentions.
            attention: the causal self attention: a registered name or ``{"name": ..., **options}``.
            cross_attention: the cross attention over the encoder output (a layer with ``noncausal_cross``).
            mlp: ``gelu`` or ``swiglu``.
            mlp_ratio: hidden width / dim; 0 drops the MLP.
            norm: ``layernorm`` or ``rmsnorm``.
            dropout: dropout inside the MLP.
            drop_path: stochastic-depth rate of the three residual branches.
        """
        super().__init__()
        self.norm1 = create_norm(norm, dim)
        self.attn = build_attention(attention, dim=dim, num_heads=num_heads, causal=True)
        self.norm2 = create_norm(norm, dim)
        self.cross_attn = build_attention(cross_attention, dim=dim, num_heads=num_heads, causal=False, cross=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if mlp_ratio > 0:
            self.norm3 = create_norm(norm, dim)
            self.mlp = create_mlp(mlp, dim, int(dim * mlp_ratio), drop=dropout)
        else:
            self.norm3 = self.mlp = None

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        *,
        memory_padding_mask: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: Any = None,
    ) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), padding_mask=padding_mask, cache=cache))
        x = x + self.drop_path(self.cross_attn(self.norm2(x), context=memory, padding_mask=memory_padding_mask))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm3(x)))
        return x


class Seq2Seq(nn.Module, PretrainedMixin):
    """Encoder-decoder transformer with per-layer attention for encoder self, decoder self and decoder cross."""

    task = "seq2seq"  # the training task that fits this backbone (attnzoo.training.TASKS)

    @accepts_device_dtype
    def __init__(
        self,
        vocab_size: int,
        *,
        dim: int = 64,
        depth: int = 2,
        encoder_depth: int | None = None,
        num_heads: int = 4,
        attention: Any = "softmax",
        encoder_attention: Any = None,
        cross_attention: Any = "softmax",
        max_seq_len: int = 512,
        positions: str = "learned",
        mlp: str = "gelu",
        mlp_ratio: float = 4.0,
        norm: str = "layernorm",
        dropout: float = 0.0,
        drop_path: float = 0.0,
        bos_token_id: int = 1,
        eos_token_id: int | None = 2,
        pad_token_id: int = 0,
    ) -> None:
        """
        Args:
            vocab_size: number of token ids (source and target share them).
            dim: model width.
            depth: decoder blocks.
            encoder_depth: encoder blocks (None: ``depth``).
            num_heads: heads of every attention.
            attention: decoder self attention (causal): a name, ``{"name": ..., **options}``, or one per decoder block.
            encoder_attention: encoder self attention (non-causal), same forms, one per encoder block (None: the
                decoder's ``attention``, which then must be a single spec or have ``encoder_depth`` entries).
            cross_attention: decoder cross attention (``noncausal_cross``: softmax, linear, performer, agent, ...),
                same forms, one per decoder block.
            max_seq_len: longest source and longest target (with its start token) for the learned positions.
            positions: ``learned`` (absolute embeddings for encoder and decoder) or ``none`` (order from the
                attention alone, e.g. RoPE or recurrence in the self attention).
            mlp: ``gelu`` or ``swiglu``.
            mlp_ratio: MLP hidden width / dim (0: no MLP).
            norm: ``layernorm`` or ``rmsnorm``.
            dropout: embedding and MLP dropout.
            drop_path: stochastic depth, increasing linearly to this value over each stack's blocks.
            bos_token_id: the decoder's start token in :meth:`generate`.
            eos_token_id: the end token: :meth:`generate` pads a sequence with ``pad_token_id`` after it and stops
                once every sequence has one (None: always ``max_new_tokens``).
            pad_token_id: what :meth:`generate` writes after a sequence's end token.
            device: where to create the parameters (``"meta"``: shapes only), as for torch modules.
            dtype: floating-point dtype of the parameters (built in float32, then converted).
        """
        super().__init__()
        encoder_depth = depth if encoder_depth is None else encoder_depth
        if positions not in POSITIONS:
            raise ValueError(f"Seq2Seq: positions must be one of {POSITIONS}; got {positions!r}.")
        for label, value in (("depth", depth), ("encoder_depth", encoder_depth), ("vocab_size", vocab_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Seq2Seq: {label} must be a positive integer; got {value!r}.")
        for label, token in (
            ("bos_token_id", bos_token_id),
            ("eos_token_id", eos_token_id),
            ("pad_token_id", pad_token_id),
        ):
            if token is not None and not 0 <= token < vocab_size:
                raise ValueError(f"Seq2Seq: {label}={token} is not a token id in [0, vocab_size={vocab_size}).")
        self.vocab_size = vocab_size
        self.dim = dim
        self.depth = depth
        self.encoder_depth = encoder_depth
        self.max_seq_len = max_seq_len
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id

        decoder_specs = per_layer(attention, depth)
        encoder_specs = per_layer(attention if encoder_attention is None else encoder_attention, encoder_depth)
        cross_specs = [self._check_cross(spec) for spec in per_layer(cross_attention, depth)]

        self.tok_emb = nn.Embedding(vocab_size, dim)
        learned = positions == "learned"
        self.src_pos_emb = nn.Embedding(max_seq_len, dim) if learned else None
        self.tgt_pos_emb = nn.Embedding(max_seq_len, dim) if learned else None
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.ModuleList(
            Block(
                dim,
                num_heads,
                spec,
                causal=False,
                mlp=mlp,
                mlp_ratio=mlp_ratio,
                norm=norm,
                dropout=dropout,
                drop_path=drop_path * i / max(encoder_depth - 1, 1),
            )
            for i, spec in enumerate(encoder_specs)
        )
        self.encoder_norm = create_norm(norm, dim)
        self.decoder = nn.ModuleList(
            DecoderBlock(
                dim,
                num_heads,
                spec,
                cross,
                mlp=mlp,
                mlp_ratio=mlp_ratio,
                norm=norm,
                dropout=dropout,
                drop_path=drop_path * i / max(depth - 1, 1),
            )
            for i, (spec, cross) in enumerate(zip(decoder_specs, cross_specs))
        )
        self.norm = create_norm(norm, dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self._init_own_weights()
        self.head.weight = self.tok_emb.weight  # tied, as in the paper (section 3.4)

    @staticmethod
    def _check_cross(spec: Any) -> Any:
        name, options = split_spec(spec)
        if options.get("rope"):
            raise ValueError(
                f"Seq2Seq: cross_attention {name} has rope=True; rotary positions cannot relate decoder positions to "
                f"encoder positions (two different sequences), and cached generation runs cross attention for the new "
                f"position alone. Use rope=false for the cross attention (e.g. model.cross_attention={name}); the "
                f"learned positions and the self attention carry the order."
            )
        return spec

    def _init_own_weights(self) -> None:
        for module in (self.tok_emb, self.src_pos_emb, self.tgt_pos_emb):
            if module is not None:
                nn.init.normal_(module.weight, std=0.02)
        blocks = [*self.encoder, *self.decoder]
        for block in blocks:
            if block.mlp is None:
                continue
            for name, p in block.mlp.named_parameters():
                if p.dim() >= 2:
                    # GPT-2's residual scaling, over all residual branches of both stacks
                    std = 0.02 / math.sqrt(2 * len(blocks)) if name.startswith("fc2") else 0.02
                    nn.init.normal_(p, std=std)
                else:
                    nn.init.zeros_(p)

    @property
    def aux_loss(self) -> Tensor | None:
        """Sum of every attention layer's auxiliary loss from the last forward (None if no layer has one)."""
        layers = [b.attn for b in self.encoder] + [m for b in self.decoder for m in (b.attn, b.cross_attn)]
        losses = [layer.aux_loss for layer in layers if layer.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def _embed(self, idx: Tensor, pos_emb: nn.Embedding | None, offset: int, what: str) -> Tensor:
        if idx.dim() != 2:
            raise ValueError(f"Seq2Seq: {what} must be (B, T) token ids; got shape {tuple(idx.shape)}.")
        T = idx.shape[1]
        x = self.tok_emb(idx)  # (B, T, dim)
        if pos_emb is not None:
            if offset + T > self.max_seq_len:
                raise ValueError(
                    f"Seq2Seq: {what} of {offset + T} tokens is longer than max_seq_len={self.max_seq_len} of the "
                    f"learned positions; build the model with a larger max_seq_len (model.max_seq_len=...)."
                )
            x = x + pos_emb(torch.arange(offset, offset + T, device=idx.device))
        return self.drop(x)

    @staticmethod
    def _check_mask(mask: Tensor | None, idx: Tensor, what: str) -> None:
        if mask is not None and (mask.dtype != torch.bool or mask.shape != idx.shape):
            raise ValueError(
                f"Seq2Seq: {what} must be bool of shape {tuple(idx.shape)} (True = real token); got "
                f"{mask.dtype} {tuple(mask.shape)}."
            )

    def encode(self, src: Tensor, src_padding_mask: Tensor | None = None) -> Tensor:
        """Encoder output (B, S, dim) for source ids ``src`` (B, S); ``src_padding_mask`` (B, S) bool, True = real."""
        self._check_mask(src_padding_mask, src, "src_padding_mask")
        x = self._embed(src, self.src_pos_emb, 0, "src")
        for block in self.encoder:
            x = block(x, padding_mask=src_padding_mask)
        return self.encoder_norm(x)

    def new_caches(self, batch_size: int) -> list[Any]:
        """One decoding cache per decoder block (its self attention), for :meth:`decode` with ``caches=``."""
        return [block.attn.new_cache(batch_size) for block in self.decoder]

    def decode(
        self,
        tgt: Tensor,
        memory: Tensor,
        *,
        src_padding_mask: Tensor | None = None,
        tgt_padding_mask: Tensor | None = None,
        caches: list[Any] | None = None,
        offset: int = 0,
    ) -> Tensor:
        """Logits (B, T, vocab) for decoder inputs ``tgt`` (B, T) reading the encoder output ``memory`` (B, S, dim).

        With ``caches`` (from :meth:`new_caches`), ``tgt`` are the next T tokens after ``offset`` earlier ones.
        """
        self._check_mask(tgt_padding_mask, tgt, "tgt_padding_mask")
        if memory.dim() != 3 or memory.shape[0] != tgt.shape[0]:
            raise ValueError(
                f"Seq2Seq: memory must be the encoder output (B={tgt.shape[0]}, S, dim); got {tuple(memory.shape)}."
            )
        if src_padding_mask is not None and tuple(src_padding_mask.shape) != tuple(memory.shape[:2]):
            raise ValueError(
                f"Seq2Seq: src_padding_mask must have shape (B, S) = {tuple(memory.shape[:2])} like the encoder "
                f"output; got {tuple(src_padding_mask.shape)}."
            )
        if caches is not None and len(caches) != len(self.decoder):
            raise ValueError(
                f"Seq2Seq: expected {len(self.decoder)} caches (one per decoder block); got {len(caches)}."
            )
        x = self._embed(tgt, self.tgt_pos_emb, offset, "tgt")
        for i, block in enumerate(self.decoder):
            x = block(
                x,
                memory,
                memory_padding_mask=src_padding_mask,
                padding_mask=tgt_padding_mask,
                cache=None if caches is None else caches[i],
            )
        return self.head(self.norm(x))

    def forward(
        self,
        src: Tensor,
        tgt: Tensor,
        *,
        src_padding_mask: Tensor | None = None,
        tgt_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Teacher-forced logits (B, T, vocab): position t predicts target token t + 1 from ``tgt[:, : t + 1]``.

        Args:
            src: source ids (B, S).
            tgt: decoder inputs (B, T): the start token, then the target shifted right.
            src_padding_mask: (B, S) bool, True = real token; padded source positions change no output.
            tgt_padding_mask: (B, T) bool, True = real token, for the decoder's self-attention keys.
        """
        memory = self.encode(src, src_padding_mask)
        return self.decode(tgt, memory, src_padding_mask=src_padding_mask, tgt_padding_mask=tgt_padding_mask)

    @torch.no_grad()
    def generate(
        self,
        src: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        use_cache: bool = True,
        src_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Decode ``max_new_tokens`` tokens for source ids ``src`` (B, S); ``temperature=0`` is greedy decoding.

        Returns (B, 1 + n): the start token, then the n <= ``max_new_tokens`` generated tokens; after a sequence's
        end token the rest of its row is ``pad_token_id``, and decoding stops early once every row has ended.
        With ``use_cache`` each new token costs one step of every decoder layer's cache (see the module docstring);
        without it every step re-runs the decoder over the whole prefix (the same tokens, slower).
        """
        if temperature < 0:
            raise ValueError(f"generate: temperature must be >= 0; got {temperature}.")
        if max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens must be >= 1; got {max_new_tokens}.")
        was_training = self.training
        self.eval()
        B = src.shape[0]
        memory = self.encode(src, src_padding_mask)
        caches = self.new_caches(B) if use_cache else None
        out = torch.full((B, 1), self.bos_token_id, dtype=torch.long, device=src.device)
        finished = torch.zeros(B, dtype=torch.bool, device=src.device)
        for t in range(max_new_tokens):
            step_input = out[:, -1:] if use_cache else out
            logits = self.decode(
                step_input, memory, src_padding_mask=src_padding_mask, caches=caches, offset=t if use_cache else 0
            )[:, -1]
            next_token = _sample(logits, temperature, top_k)[:, 0]  # (B,)
            next_token = next_token.masked_fill(finished, self.pad_token_id)
            out = torch.cat([out, next_token[:, None]], dim=1)
            if self.eos_token_id is not None:
                finished |= next_token == self.eos_token_id
                if bool(finished.all()):
                    break
        self.train(was_training)
        return out
