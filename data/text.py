"""Byte-level language modelling over any text file or folder; by default the Python standard library's own source.

* Corpus: ``path`` = a file or a folder (every file under it whose name matches ``pattern``, default ``*.py``). With no
  path, the ``.py`` files of the running interpreter's standard library (``sysconfig.get_paths()["stdlib"]``,
  without ``site-packages``), so the default works offline on any machine with Python.
* Split by file (no file is in two splits): the sorted file list is shuffled with ``seed`` and cut into train/val/test
  by ``val_fraction``/``test_fraction`` of the files (at least one file each). ``max_bytes`` caps the corpus for CPU
  runs: whole files are taken in the shuffled order until the cap.
* Tokens are raw bytes (vocabulary 256, ``encode``/``decode`` round-trip any UTF-8 text); each split's files are joined
  with a newline and cut into non-overlapping windows of ``seq_len + 1`` bytes: ``input_ids`` = window[:-1],
  ``labels`` = window[1:] (the LM task does not shift). Bits per byte = loss / ln 2.
* The byte streams are cached under ``data_dir`` by a hash of the file list (paths, sizes, mtimes) and the options.
"""

from __future__ import annotations

import fnmatch
import math
import os
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from attnzoo.data.cache import DEFAULT_DATA_DIR, cached_tensors
from attnzoo.data.splits import SPLITS, SplitDataModule

VOCAB_SIZE = 256


def encode(text: str) -> Tensor:
    """UTF-8 bytes of ``text`` as a long tensor of ids 0..255."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids: Tensor | list[int]) -> str:
    """Text from byte ids (invalid UTF-8, e.g. a cut multi-byte character, becomes U+FFFD)."""
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def stdlib_dir() -> Path:
    """The standard library folder of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(path: str | os.PathLike | None = None, pattern: str = "*.py") -> list[Path]:
    """The sorted files of the corpus (see the module docstring)."""
    if path is None:
        root = stdlib_dir()
        files = []
        for folder, subfolders, names in os.walk(root):
            # third-party packages live inside the stdlib folder; prune them instead of walking them
            subfolders[:] = sorted(d for d in subfolders if d not in ("site-packages", "dist-packages", "__pycache__"))
            files += [Path(folder) / n for n in names if fnmatch.fnmatch(n, pattern)]
    else:
        root = Path(os.path.expanduser(str(path)))
        if root.is_file():
            return [root]
        if not root.is_dir():
            raise FileNotFoundError(f"text: data.path={path} is neither a file nor a folder.")
        files = list(root.rglob(pattern))
    files = sorted(p for p in files if p.is_file())
    if not files:
        raise FileNotFoundError(f"text: no file matching {pattern!r} under {root}; set data.pattern= or data.path=.")
    return files


def split_files(files: list[Path], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[Path]]:
    """Shuffle the files (seeded) and cut them into train/val/test; a single file is split by bytes instead."""
    order = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
    n_val = max(1, round(val_fraction * len(files)))
    n_test = max(1, round(test_fraction * len(files)))
    if n_val + n_test >= len(order):
        return {s: order for s in SPLITS}  # too few files: TextDataModule splits the bytes of each instead
    return {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}


class WindowDataset(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` bytes of one stream."""

    def __init__(self, stream: Tensor, seq_len: int) -> None:
        self.stream, self.seq_len = stream, seq_len
        self.count = max(0, (len(stream) - 1) // seq_len)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        window = self.stream[i * self.seq_len : (i + 1) * self.seq_len + 1].long()
        return {"input_ids": window[:-1], "labels": window[1:]}


class TextDataModule(SplitDataModule):
    """Byte-level LM data (batches: ``input_ids`` (B, T), ``labels`` (B, T)), vocabulary 256."""

    def __init__(
        self,
        *,
        path: str | os.PathLike | None = None,
        pattern: str = "*.py",
        seq_len: int = 256,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        max_bytes: int | None = None,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
        data_dir: str | os.PathLike = DEFAULT_DATA_DIR,
    ) -> None:
        """
        Args:
            path: a text file or folder (default: the Python standard library's source).
            pattern: file name glob inside a folder.
            seq_len: bytes per training sequence.
            val_fraction: share of the files for validation.
            test_fraction: share of the files for testing.
            max_bytes: cap on the corpus size (whole files, in the shuffled order), None = everything.
            seed: seed of the file split.
            batch_size: sequences per batch (per device).
            num_workers: DataLoader workers.
            data_dir: cache root for the byte streams.
        """
        super().__init__()
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"text: val_fraction={val_fraction}, test_fraction={test_fraction} must be in (0, 1), sum < 1."
            )
        if seq_len < 1:
            raise ValueError(f"text: seq_len must be >= 1; got {seq_len}.")
        self.path, self.pattern, self.seq_len = path, pattern, seq_len
        self.fractions = (val_fraction, test_fraction)
        self.max_bytes, self.seed = max_bytes, seed
        self.batch_size, self.num_workers, self.data_dir = batch_size, num_workers, data_dir
        self.split_paths: dict[str, list[Path]] = {}
        self.splits: dict[str, WindowDataset] = {}

    def model_kwargs(self) -> dict[str, Any]:
        """What a GPT needs from this data: 256 byte ids and the sequence length."""
        return {"vocab_size": VOCAB_SIZE, "max_seq_len": self.seq_len}

    def _streams(self) -> dict[str, Tensor]:
        files = corpus_files(self.path, self.pattern)
        if self.max_bytes is not None:  # whole files in a seeded order until the cap
            order = [files[i] for i in np.random.default_rng(self.seed).permutation(len(files))]
            kept, total = [], 0
            for f in order:
                if kept and total + f.stat().st_size > self.max_bytes:
                    continue
                kept.append(f)
                total += f.stat().st_size
            files = sorted(kept)
        parts = split_files(files, *self.fractions, self.seed)
        self.split_paths = parts
        fingerprint = [(str(f), f.stat().st_size, int(f.stat().st_mtime)) for f in files]
        config = {"files": fingerprint, "fractions": self.fractions, "seed": self.seed, "version": 1}

        def make() -> dict[str, Tensor]:
            streams = {s: b"\n".join(f.read_bytes() for f in parts[s]) for s in SPLITS}
            if parts["train"] is parts["val"]:  # one or two files: split the bytes 90/5/5 instead
                data = streams["train"]
                a = int(len(data) * (1 - sum(self.fractions)))
                b = a + int(len(data) * self.fractions[0])
                streams = {"train": data[:a], "val": data[a:b], "test": data[b:]}
            return {s: torch.frombuffer(bytearray(v), dtype=torch.uint8).clone() for s, v in streams.items()}

        return cached_tensors("text", config, make, self.data_dir)

    def prepare_data(self) -> None:
        self._streams()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        for split, stream in self._streams().items():
            self.splits[split] = WindowDataset(stream, self.seq_len)
            if len(self.splits[split]) == 0:
                raise ValueError(
                    f"text: the {split} split has {len(stream)} bytes, fewer than seq_len + 1 = {self.seq_len + 1}; "
                    f"use a larger corpus or a smaller data.seq_len."
                )

    @staticmethod
    def bits_per_byte(loss_nats: float) -> float:
        """Cross-entropy per byte in bits."""
        return loss_nats / math.log(2)
