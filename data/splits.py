"""What every attnzoo DataModule shares: train/val/test splits held in memory and the loaders over them.

A subclass sets, in its constructor, ``self.batch_size``, ``self.num_workers`` and ``self.splits = {}``, and fills
``self.splits`` with one map-style dataset per split in ``setup()`` (which must be idempotent: the loaders call it, so
a DataModule also works outside a Trainer). Generated sets (MQAR, seq2seq) also share how a split is made and cached:
:class:`GeneratedDataModule`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from attnzoo.data.cache import cached_tensors

SPLITS = ("train", "val", "test")


def split_seed(seed: int, split: str) -> np.random.SeedSequence:
    """The seed stream of one split: independent of (disjoint from) every other split's for the same ``seed``."""
    return np.random.SeedSequence(seed, spawn_key=(SPLITS.index(split),))


class SplitDataModule(L.LightningDataModule):
    """Loaders over ``self.splits``: the training split shuffled, validation and test in order."""

    collate_fn: Callable[[list[Any]], Any] | None = None  # None: torch's default collation
    splits: dict[str, Dataset]
    batch_size: int
    num_workers: int

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        return DataLoader(
            self.splits[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            collate_fn=type(self).collate_fn,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class GeneratedDataModule(SplitDataModule):
    """A synthetic task: each split is a pure function of the generator options, its size and a per-split seed,
    generated once and cached on disk under ``<data_dir>/<kind>/`` (:func:`attnzoo.data.cache.cached_tensors`).

    Subclasses set ``kind`` and ``dataset`` (the Dataset class over the generated tensors) and implement
    :meth:`generate`.
    """

    kind = ""
    dataset: Callable[[dict[str, Tensor]], Dataset]

    def __init__(
        self,
        generator_kwargs: dict[str, Any],
        num_examples: dict[str, int] | None,
        *,
        seed: int,
        batch_size: int,
        num_workers: int,
        data_dir: str | os.PathLike,
        default_examples: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        counts = {**(default_examples or {"train": 20000, "val": 1000, "test": 1000}), **dict(num_examples or {})}
        unknown_splits = set(counts) - set(SPLITS)
        if unknown_splits:
            raise ValueError(f"{self.kind}: num_examples has unknown splits {sorted(unknown_splits)}; use {SPLITS}.")
        self.generator_kwargs = dict(generator_kwargs)
        self.num_examples = counts
        self.seed = seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.data_dir = data_dir
        self.splits: dict[str, Dataset] = {}

    def generate(self, num_examples: int, seed: np.random.SeedSequence) -> dict[str, Tensor]:
        """The tensors of one split of ``num_examples`` examples drawn from ``seed``."""
        raise NotImplementedError

    def _load(self, split: str) -> dict[str, Tensor]:
        count = self.num_examples[split]
        # the cache key: every generator option, the split's size, the base seed and the split name
        config = {**self.generator_kwargs, "num_examples": count, "seed": self.seed, "split": split}
        return cached_tensors(
            self.kind, config, lambda: self.generate(count, split_seed(self.seed, split)), self.data_dir
        )

    def prepare_data(self) -> None:
        # once per node (rank 0): generate and cache, so DDP ranks only read
        for split in SPLITS:
            self._load(split)

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            if split not in self.splits:
                self.splits[split] = type(self).dataset(self._load(split))
