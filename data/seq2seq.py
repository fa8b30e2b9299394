"""Generated sequence-to-sequence tasks for the encoder-decoder (``model=seq2seq``): reverse, sort, or rotate a
random sequence of symbols. Each needs the decoder to read the source through cross attention; none can be solved
from the target prefix alone.

    task         source (length L, uniform in [min_length, max_length])   target (length L)
    reverse      a b c d e                                                 e d c b a
    sort         c a e b a                                                 a a b c e   (ascending token ids)
    copy_offset  a b c d e   (offset 2)                                    c d e a b   (j-th = source (j+offset) mod L)

Token ids: 0 = padding, 1 = start (BOS), 2 = end (EOS), symbols ``[3, vocab_size)`` drawn uniformly with
replacement. A batch holds, padded to ``max_length`` (source) and ``max_length + 1`` (decoder)::

    src_ids           a b c 0 0          src_padding_mask  T T T F F
    input_ids         1 c b a 0 0        padding_mask      T T T T F F     (decoder inputs: BOS + target)
    labels            c b a 2 -100 -100                                    (target + EOS; -100 is ignored)

so the decoder learns to end a sequence. Reversal of variable-length sequences is the classic encoder-decoder test
(Sutskever et al. 2014 reverse the source to ease optimisation); sorting is Vinyals et al. 2016's "Order Matters"
task. Seeding follows MQAR (:mod:`attnzoo.data.mqar`): each split has its own seed stream, and each generated split is
cached by a hash of its config (:mod:`attnzoo.data.cache`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from attnzoo.data.cache import DEFAULT_DATA_DIR
from attnzoo.data.mqar import TokenDataset
from attnzoo.data.splits import GeneratedDataModule
from attnzoo.errors import unknown

PAD, BOS, EOS = 0, 1, 2
NUM_SPECIAL = 3  # symbols start after the padding, start and end tokens
IGNORE_INDEX = -100
TASKS = ("reverse", "sort", "copy_offset")


def _check(task: str, vocab_size: int, min_length: int, max_length: int, offset: int, num_examples: int) -> None:
    if task not in TASKS:
        raise ValueError(f"seq2seq: {unknown('task', task, TASKS)} Set data.task=reverse (or sort, copy_offset).")
    if vocab_size < NUM_SPECIAL + 2:
        raise ValueError(
            f"seq2seq: vocab_size={vocab_size} leaves fewer than 2 symbols after the {NUM_SPECIAL} special tokens "
            f"(padding, start, end); set data.vocab_size>={NUM_SPECIAL + 2}."
        )
    if not 1 <= min_length <= max_length:
        raise ValueError(
            f"seq2seq: lengths need 1 <= min_length <= max_length; got min_length={min_length}, "
            f"max_length={max_length}; e.g. data.min_length=4 data.max_length=16."
        )
    if offset < 0:
        raise ValueError(f"seq2seq: offset (copy_offset's rotation) must be >= 0; got {offset}.")
    if num_examples < 1:
        raise ValueError(f"seq2seq: num_examples must be >= 1; got {num_examples}.")


def generate_seq2seq(
    *,
    task: str = "reverse",
    vocab_size: int = 16,
    min_length: int = 4,
    max_length: int = 16,
    offset: int = 1,
    num_examples: int = 1000,
    seed: int | np.random.SeedSequence = 0,
) -> dict[str, Tensor]:
    """Generate examples of one task (see the module docstring for the layout).

    Args:
        task: ``reverse``, ``sort`` or ``copy_offset``.
        vocab_size: token ids in ``[0, vocab_size)``: 3 special tokens, then ``vocab_size - 3`` symbols.
        min_length: shortest source (= target) length.
        max_length: longest source length; tensors are padded to it.
        offset: ``copy_offset``'s rotation (target j = source (j + offset) mod L); unused by the other tasks.
        num_examples: number of pairs.
        seed: an int or a ``numpy.random.SeedSequence``.

    Returns:
        ``src_ids`` (N, max_length), ``src_padding_mask`` (N, max_length) bool, ``input_ids`` (N, max_length + 1),
        ``padding_mask`` (N, max_length + 1) bool, ``labels`` (N, max_length + 1) with -100 after the end token.
    """
    _check(task, vocab_size, min_length, max_length, offset, num_examples)
    rng = np.random.default_rng(seed)
    N, S = num_examples, max_length
    lengths = rng.integers(min_length, max_length + 1, size=N)  # (N,)
    positions = np.arange(S)  # (S,)
    real = positions[None, :] < lengths[:, None]  # (N, S)
    symbols = rng.integers(NUM_SPECIAL, vocab_size, size=(N, S))
    src = np.where(real, symbols, PAD)

    if task == "reverse":
        source_index = np.clip(lengths[:, None] - 1 - positions[None, :], 0, S - 1)  # (N, S)
        target = np.take_along_axis(src, source_index, axis=1)
    elif task == "copy_offset":
        source_index = (positions[None, :] + offset) % lengths[:, None]
        target = np.take_along_axis(src, source_index, axis=1)
    else:  # sort: padding goes last as the largest value, then back to PAD
        target = np.sort(np.where(real, src, vocab_size), axis=1)
    target = np.where(real, target, PAD)  # (N, S)

    rows = np.arange(N)
    input_ids = np.full((N, S + 1), PAD, dtype=np.int64)
    input_ids[:, 0] = BOS
    input_ids[:, 1:] = target
    labels = np.full((N, S + 1), IGNORE_INDEX, dtype=np.int64)
    labels[:, :S] = np.where(real, target, IGNORE_INDEX)
    labels[rows, lengths] = EOS
    decoder_real = np.arange(S + 1)[None, :] <= lengths[:, None]  # BOS + L target tokens
    return {
        "src_ids": torch.from_numpy(src.astype(np.int64)),
        "src_padding_mask": torch.from_numpy(real),
        "input_ids": torch.from_numpy(input_ids),
        "padding_mask": torch.from_numpy(decoder_real),
        "labels": torch.from_numpy(labels),
    }


class Seq2SeqDataModule(GeneratedDataModule):
    """Reverse / sort / copy_offset train, val and test splits for the encoder-decoder (see the module docstring)."""

    kind = "seq2seq"
    dataset = TokenDataset

    def __init__(
        self,
        *,
        task: str = "reverse",
        vocab_size: int = 16,
        min_length: int = 4,
        max_length: int = 16,
        offset: int = 1,
        num_examples: dict[str, int] | None = None,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        data_dir: str | os.PathLike = DEFAULT_DATA_DIR,
    ) -> None:
        """
        Args:
            task, vocab_size, min_length, max_length, offset: see :func:`generate_seq2seq`.
            num_examples: pairs per split, ``{"train": ..., "val": ..., "test": ...}`` (default 20000 / 1000 / 1000).
            seed: base seed; each split derives its own disjoint stream from it.
            batch_size: pairs per batch (per device).
            num_workers: DataLoader workers (0: in the main process; the data is already in memory).
            data_dir: cache root for generated splits.
        """
        super().__init__(
            dict(task=task, vocab_size=vocab_size, min_length=min_length, max_length=max_length, offset=offset),
            num_examples,
            seed=seed,
            batch_size=batch_size,
            num_workers=num_workers,
            data_dir=data_dir,
        )
        _check(task, vocab_size, min_length, max_length, offset, min(self.num_examples.values()))

    def model_kwargs(self) -> dict[str, Any]:
        """What a Seq2Seq needs from this data: vocabulary, longest sequence and the special token ids."""
        return {
            "vocab_size": self.generator_kwargs["vocab_size"],
            "max_seq_len": self.generator_kwargs["max_length"] + 1,  # the decoder's inputs carry the start token
            "bos_token_id": BOS,
            "eos_token_id": EOS,
            "pad_token_id": PAD,
        }

    def generate(self, num_examples: int, seed: np.random.SeedSequence) -> dict[str, Tensor]:
        return generate_seq2seq(**self.generator_kwargs, num_examples=num_examples, seed=seed)
