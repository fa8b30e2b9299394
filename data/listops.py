"""ListOps (Nangia & Bowman 2018, https://arxiv.org/abs/1804.06028) with the generator semantics of the Long Range
Arena (Tay et al. 2021, https://arxiv.org/abs/2011.04006; google-research/long-range-arena
``lra_benchmarks/data/listops.py``).

A tree is a value 0..9 or an operator applied to 2..``max_args`` subtrees:

    [MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]   ->   5

Operators: ``[MIN``, ``[MAX``, ``[MED`` (median, truncated to int: ``int(np.median)``), ``[SM`` (sum modulo 10); the
label is the value of the whole expression, so there are 10 classes. LRA's generator, reproduced here: a node at
depth < ``max_depth`` becomes an operator with probability 0.25 (``VALUE_P``) and a value otherwise, a node at
``max_depth`` is a value; the root is at depth 1. The length counts operators, values and closing brackets; a tree
is kept when ``min_length < length < max_length`` (strict, as LRA), trees are deduplicated, and the train/val/test
splits are consecutive slices of one seeded deduplicated stream, so they never share an example.

Tokens: LRA's strings carry the tree's binary-nesting parentheses; like the common LRA loaders (S4's), the model sees
them without parentheses, so a sequence has exactly ``length`` tokens. Ids: 0 = padding, 1..10 = values 0..9,
11..14 = MIN, MAX, MED, SM, 15 = ``]``.

Defaults are CPU-sized (lengths 32..256, depth 6, 5 arguments per operator); LRA's benchmark is
``min_length=500, max_length=2000, max_depth=10, max_args=10`` with 96000/2000/2000 examples
(``configs/data/listops.yaml`` says how to ask for it).
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from attnzoo.data.cache import DEFAULT_DATA_DIR, cached_tensors
from attnzoo.data.splits import SPLITS, SplitDataModule

MIN, MAX, MED, SUM_MOD, END = "[MIN", "[MAX", "[MED", "[SM", "]"
OPERATORS = (MIN, MAX, MED, SUM_MOD)
VALUE_P = 0.25  # LRA: probability that a node above max_depth is an operator
PAD_ID = 0
VOCAB = ("<pad>", *(str(v) for v in range(10)), *OPERATORS, END)
TOKEN_ID = {token: i for i, token in enumerate(VOCAB)}


def generate_tree(rng: random.Random, depth: int, max_depth: int, max_args: int) -> tuple[Any, int]:
    """One random tree as ``(op, [children])`` or an int, and its token length (LRA's ``generate_tree``)."""
    r = rng.random() if depth < max_depth else 1.0
    if r > VALUE_P:
        return rng.choice(range(10)), 1
    length = 2  # the operator and its closing bracket
    children = []
    for _ in range(rng.randint(2, max_args)):
        child, child_length = generate_tree(rng, depth + 1, max_depth, max_args)
        children.append(child)
        length += child_length
    return (rng.choice(OPERATORS), children), length


def evaluate(tree: Any) -> int:
    """The value of a tree (LRA's ``to_value``): MIN, MAX, MED = int(median), SM = sum % 10."""
    if isinstance(tree, int):
        return tree
    op, children = tree
    values = [evaluate(c) for c in children]
    if op == MIN:
        return min(values)
    if op == MAX:
        return max(values)
    if op == MED:
        return int(np.median(values))
    return sum(values) % 10


def to_tokens(tree: Any) -> list[str]:
    """Prefix tokens without parentheses: ``[MAX 4 [MIN 2 3 ] ]``."""
    if isinstance(tree, int):
        return [str(tree)]
    op, children = tree
    return [op, *(t for c in children for t in to_tokens(c)), END]


def _key(tree: Any) -> Any:
    return tree if isinstance(tree, int) else (tree[0], tuple(_key(c) for c in tree[1]))


def generate_listops(
    num_examples: int,
    *,
    min_length: int,
    max_length: int,
    max_depth: int,
    max_args: int,
    seed: int,
    max_tries: int | None = None,
) -> list[tuple[list[str], int]]:
    """``num_examples`` distinct (tokens, label) pairs with ``min_length < len(tokens) < max_length``.

    Raises:
        ValueError: the constraints admit (almost) no tree within ``max_tries`` draws.
    """
    rng = random.Random(seed)
    seen: set[Any] = set()
    out: list[tuple[list[str], int]] = []
    tries = 0
    limit = max_tries if max_tries is not None else 2000 * num_examples + 100_000
    while len(out) < num_examples:
        tries += 1
        if tries > limit:
            raise ValueError(
                f"listops: only {len(out)} of {num_examples} distinct trees with {min_length} < length < {max_length} "
                f"after {limit} draws (max_depth={max_depth}, max_args={max_args}); widen the length range or raise "
                f"max_depth/max_args."
            )
        tree, length = generate_tree(rng, 1, max_depth, max_args)
        if not min_length < length < max_length:
            continue
        key = _key(tree)
        if key in seen:
            continue
        seen.add(key)
        out.append((to_tokens(tree), evaluate(tree)))
    return out


def encode(tokens: list[str]) -> list[int]:
    return [TOKEN_ID[t] for t in tokens]


def decode(ids: list[int] | Tensor) -> list[str]:
    return [VOCAB[int(i)] for i in ids if int(i) != PAD_ID]


class ListOpsDataset(Dataset):
    def __init__(self, tokens: Tensor, lengths: Tensor, labels: Tensor) -> None:
        self.tokens, self.lengths, self.labels = tokens, lengths, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"inputs": self.tokens[i], "lengths": self.lengths[i], "labels": self.labels[i]}


def collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack, then cut the padding to the longest sequence of the batch; ``padding_mask`` True = real token."""
    lengths = torch.stack([it["lengths"] for it in items])
    T = int(lengths.max())
    inputs = torch.stack([it["inputs"][:T] for it in items])
    return {
        "inputs": inputs,
        "labels": torch.stack([it["labels"] for it in items]),
        "padding_mask": torch.arange(T)[None, :] < lengths[:, None],
    }


class ListOpsDataModule(SplitDataModule):
    """ListOps classification (batches: ``inputs`` (B, T) token ids, ``labels`` (B,), ``padding_mask`` (B, T))."""

    collate_fn = collate  # pads each batch to its longest sequence

    def __init__(
        self,
        *,
        min_length: int = 32,
        max_length: int = 256,
        max_depth: int = 6,
        max_args: int = 5,
        num_examples: dict[str, int] | None = None,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        data_dir: str | os.PathLike = DEFAULT_DATA_DIR,
    ) -> None:
        """
        Args:
            min_length: keep trees with more tokens than this (LRA: 500).
            max_length: keep trees with fewer tokens than this (LRA: 2000); also the model's max_seq_len.
            max_depth: deepest operator nesting (LRA: 10).
            max_args: most arguments per operator (LRA: 10).
            num_examples: ``{"train", "val", "test"}`` counts (default 20000 / 1000 / 1000; LRA 96000/2000/2000).
            seed: generator seed.
            batch_size: sequences per batch (per device).
            num_workers: DataLoader workers.
            data_dir: cache root for the generated set.
        """
        super().__init__()
        counts = {"train": 20000, "val": 1000, "test": 1000, **dict(num_examples or {})}
        if set(counts) - set(SPLITS) or min(counts.values()) < 1:
            raise ValueError(f"listops: num_examples needs positive counts for {SPLITS}; got {counts}.")
        if not (0 <= min_length < max_length - 1) or max_depth < 1 or max_args < 2:
            raise ValueError(
                f"listops: need 0 <= min_length < max_length - 1, max_depth >= 1, max_args >= 2; got "
                f"min_length={min_length}, max_length={max_length}, max_depth={max_depth}, max_args={max_args}."
            )
        self.config = dict(
            min_length=min_length, max_length=max_length, max_depth=max_depth, max_args=max_args, seed=seed
        )
        self.num_examples = counts
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.data_dir = data_dir
        self.splits: dict[str, ListOpsDataset] = {}

    def model_kwargs(self) -> dict[str, Any]:
        """What an encoder needs from this data: vocabulary, classes and longest sequence."""
        return {"vocab_size": len(VOCAB), "num_classes": 10, "max_seq_len": self.config["max_length"]}

    def _tensors(self) -> dict[str, Tensor]:
        def make() -> dict[str, Tensor]:
            total = sum(self.num_examples[s] for s in SPLITS)
            examples = generate_listops(total, **self.config)
            width = self.config["max_length"]
            tokens = torch.zeros(total, width, dtype=torch.uint8)
            for i, (toks, _) in enumerate(examples):
                tokens[i, : len(toks)] = torch.tensor(encode(toks), dtype=torch.uint8)
            lengths = torch.tensor([len(t) for t, _ in examples])
            labels = torch.tensor([y for _, y in examples])
            out, start = {}, 0
            for split in SPLITS:  # consecutive slices of one deduplicated stream: disjoint, as LRA's splits
                stop = start + self.num_examples[split]
                out |= {f"{split}_tokens": tokens[start:stop], f"{split}_lengths": lengths[start:stop]}
                out[f"{split}_labels"] = labels[start:stop]
                start = stop
            return out

        return cached_tensors("listops", {**self.config, "num_examples": self.num_examples}, make, self.data_dir)

    def prepare_data(self) -> None:
        self._tensors()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        t = self._tensors()
        for split in SPLITS:
            self.splits[split] = ListOpsDataset(
                t[f"{split}_tokens"].long(), t[f"{split}_lengths"], t[f"{split}_labels"]
            )

    def majority_baseline(self, split: str = "test") -> float:
        """Accuracy of always predicting the most frequent training label on ``split``."""
        self.setup()
        majority = int(torch.bincount(self.splits["train"].labels, minlength=10).argmax())
        return float((self.splits[split].labels == majority).float().mean())
