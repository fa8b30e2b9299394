"""Multi-query associative recall (MQAR) — Arora, Eyuboglu et al. 2023, "Zoology: Measuring and Improving Recall in
Efficient Language Models", https://arxiv.org/abs/2312.04927

A sequence opens with ``num_kv_pairs`` key-value pairs, then every key is queried once somewhere in the rest of the
sequence; at each query position the model must predict the value bound to that key earlier::

    inputs:  k1 v1 k2 v2 | .  .  k2 .  .  .  k1 .  .
    labels:  -100 ...    | -100  v2 -100 ... v1 -100      (label at a query = its value; -100 is ignored)

Semantics of Zoology's ``zoology/data/associative_recall.py`` (``multiquery_ar``): keys are drawn without
replacement from the lower half of the vocabulary ``[1, vocab_size // 2)`` (0 is the filler token), values from the
upper half ``[vocab_size // 2, vocab_size)``; the query of pair i sits at an even offset ``2 * gap_i`` after the
key-value block, with the gaps drawn without replacement from a power law ``p(g) ∝ (g + 1) ** (power_a - 1)``
(small ``power_a`` = queries mostly close to the context, like repeated bigrams in text); with
``random_non_queries`` the filler zeros are replaced by uniform random tokens. Defaults: Zoology's power_a 0.01 and
random_non_queries True; vocabulary 256, length 64 and 8 pairs are the CPU-sized default of attnzoo's main run
(Zoology's 8192-token vocabulary is far too slow on a CPU).

Each split has its own seed stream (``SeedSequence(seed, spawn_key=(split,))``), so train, val and test never share
random numbers, and each generated split is cached by a hash of its config (:mod:`attnzoo.data.cache`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from attnzoo.data.cache import DEFAULT_DATA_DIR
from attnzoo.data.splits import SPLITS, GeneratedDataModule, split_seed  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


def _choose_without_replacement(rng: np.random.Generator, n_rows: int, n_choices: int, size: int, log_p=None):
    """Per row, ``size`` distinct indices from ``range(n_choices)``; weighted by ``exp(log_p)`` if given.

    Gumbel-top-k: the indices of the ``size`` largest ``log_p + Gumbel noise`` are distributed exactly like
    sequential weighted sampling without replacement (numpy's ``choice(replace=False, p=...)``), but vectorised.
    """
    scores = rng.gumbel(size=(n_rows, n_choices))
    if log_p is not None:
        scores = scores + log_p
    return np.argsort(-scores, axis=1, kind="stable")[:, :size]


def generate_mqar(
    *,
    vocab_size: int = 256,
    input_seq_len: int = 64,
    num_kv_pairs: int = 8,
    num_examples: int = 1000,
    power_a: float = 0.01,
    random_non_queries: bool = True,
    seed: int | np.random.SeedSequence = 0,
) -> dict[str, Tensor]:
    """Generate MQAR examples.

    Args:
        vocab_size: token ids are in ``[0, vocab_size)``; keys in ``[1, vocab_size // 2)``, values in the upper half.
        input_seq_len: sequence length (even, ``>= 4 * num_kv_pairs``, ``< vocab_size``, Zoology's constraints).
        num_kv_pairs: key-value pairs per sequence; each key is queried exactly once.
        num_examples: number of sequences.
        power_a: power-law exponent of the query gaps (1.0 = uniform gaps).
        random_non_queries: replace the filler zeros by uniform random tokens.
        seed: an int or a ``numpy.random.SeedSequence``.

    Returns:
        ``{"input_ids": (N, T) long, "labels": (N, T) long}``, labels -100 except at the query positions.
    """
    _check(vocab_size, input_seq_len, num_kv_pairs, num_examples, power_a)
    rng = np.random.default_rng(seed)
    N, T = num_examples, input_seq_len
    context_size = 2 * num_kv_pairs
    half = vocab_size // 2
    keys = 1 + _choose_without_replacement(rng, N, half - 1, num_kv_pairs)  # (N, P) in [1, half)
    values = half + _choose_without_replacement(rng, N, vocab_size - half, num_kv_pairs)  # (N, P) in [half, V)

    # query of pair i at position context_size + 2 * gap_i; gaps distinct, power-law distributed
    space = (T - context_size) // 2
    log_p = (power_a - 1.0) * np.log(np.arange(1, space + 1, dtype=np.float64))
    gaps = _choose_without_replacement(rng, N, space, num_kv_pairs, log_p)  # (N, P)

    input_ids = np.zeros((N, T), dtype=np.int64)
    input_ids[:, 0:context_size:2] = keys
    input_ids[:, 1:context_size:2] = values
    query_pos = context_size + 2 * gaps  # (N, P)
    np.put_along_axis(input_ids, query_pos, keys, axis=1)
    labels = np.full((N, T), -100, dtype=np.int64)
    np.put_along_axis(labels, query_pos, values, axis=1)  # predict the value while reading its key
    if random_non_queries:
        filler = input_ids == 0
        input_ids[filler] = rng.integers(0, vocab_size, size=int(filler.sum()))
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}


def _check(vocab_size: int, input_seq_len: int, num_kv_pairs: int, num_examples: int, power_a: float) -> None:
    fix = "set data.vocab_size / data.input_seq_len / data.num_kv_pairs accordingly"
    if input_seq_len % 2 != 0:
        raise ValueError(f"mqar: input_seq_len must be even (key-value pairs and query slots); got {input_seq_len}.")
    if num_kv_pairs < 1 or 4 * num_kv_pairs > input_seq_len:
        raise ValueError(
            f"mqar: num_kv_pairs={num_kv_pairs} needs 1 <= num_kv_pairs <= input_seq_len / 4 = {input_seq_len // 4} "
            f"(the pairs and their queries must fit); {fix}."
        )
    if vocab_size <= input_seq_len or vocab_size // 2 - 1 < num_kv_pairs:
        raise ValueError(
            f"mqar: vocab_size={vocab_size} must exceed input_seq_len={input_seq_len} and give at least "
            f"num_kv_pairs={num_kv_pairs} distinct keys in [1, vocab_size // 2); {fix}."
        )
    if num_examples < 1:
        raise ValueError(f"mqar: num_examples must be >= 1; got {num_examples}.")
    if power_a <= 0:
        raise ValueError(f"mqar: power_a must be > 0 (1.0 = uniform query gaps); got {power_a}.")


class TokenDataset(Dataset):
    """Rows of equally long tensors as LM examples (dicts of ``input_ids``, ``labels`` and optional masks)."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self.tensors = tensors
        self.length = len(next(iter(tensors.values())))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {k: v[index] for k, v in self.tensors.items()}


class MQARDataModule(GeneratedDataModule):
    """MQAR train/val/test splits for language modelling (batches: ``input_ids``, ``labels``)."""

    kind = "mqar"
    dataset = TokenDataset

    def __init__(
        self,
        *,
        vocab_size: int = 256,
        input_seq_len: int = 64,
        num_kv_pairs: int = 8,
        power_a: float = 0.01,
        random_non_queries: bool = True,
        num_examples: dict[str, int] | None = None,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        data_dir: str | os.PathLike = DEFAULT_DATA_DIR,
    ) -> None:
        """
        Args:
            vocab_size, input_seq_len, num_kv_pairs, power_a, random_non_queries: see :func:`generate_mqar`.
            num_examples: sequences per split, ``{"train": ..., "val": ..., "test": ...}``
                (default 20000 / 1000 / 1000).
            seed: base seed; each split derives its own disjoint stream from it.
            batch_size: sequences per batch (per device).
            num_workers: DataLoader workers (0: in the main process; the data is already in memory).
            data_dir: cache root for generated splits.
        """
        generator_kwargs = dict(
            vocab_size=vocab_size,
            input_seq_len=input_seq_len,
            num_kv_pairs=num_kv_pairs,
            power_a=power_a,
            random_non_queries=random_non_queries,
        )
        super().__init__(
            generator_kwargs,
            num_examples,
            seed=seed,
            batch_size=batch_size,
            num_workers=num_workers,
            data_dir=data_dir,
        )
        _check(vocab_size, input_seq_len, num_kv_pairs, min(self.num_examples.values()), power_a)

    def model_kwargs(self) -> dict[str, Any]:
        """What a GPT needs from this data: vocabulary and sequence length."""
        return {
            "vocab_size": self.generator_kwargs["vocab_size"],
            "max_seq_len": self.generator_kwargs["input_seq_len"],
        }

    def generate(self, num_examples: int, seed: np.random.SeedSequence) -> dict[str, Tensor]:
        return generate_mqar(**self.generator_kwargs, num_examples=num_examples, seed=seed)
