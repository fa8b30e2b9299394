"""Image classification data: ``digits`` (offline, the ViT default), ``cifar10`` and ``mnist`` (local folder).

* ``digits``: scikit-learn's bundled UCI handwritten digits (Alpaydin & Kaynak 1998; 1797 grey 8x8 images, 10
  classes, pixel values 0..16). Shipped inside scikit-learn, so it works on a machine with no network. Split by a
  seeded stratified shuffle into train/val/test.
* ``cifar10`` (Krizhevsky 2009) and ``mnist`` (LeCun et al. 1998) through ``torchvision.datasets`` from a local folder
  (``root``, default ``<data_dir>/<name>``). When the files are missing the error names the expected layout;
  ``download=true`` fetches them on a machine with a network. The official test split is the test set; the validation
  set is a seeded slice of the official training set.

Batches are dicts of ``inputs`` (B, C, H, W) float, normalised per channel with the training-set statistics, and
``labels`` (B,) long. Training batches may be augmented by random translations (``augment``; pad-and-crop as in the
ResNet CIFAR recipe, He et al. 2016) and, for CIFAR-10, horizontal flips. Images are kept as uint8 in memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from attnzoo.data.cache import DEFAULT_DATA_DIR, cached_tensors
from attnzoo.data.splits import SPLITS, SplitDataModule
from attnzoo.extras import require


class ImageDataset(Dataset):
    """uint8 images (N, C, H, W) and labels (N,); normalises and optionally augments each sample."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        mean: Tensor,
        std: Tensor,
        *,
        max_value: float,
        shift: int = 0,
        flip: bool = False,
        seed: int = 0,
    ) -> None:
        self.images, self.labels = images, labels
        self.mean, self.std = mean.view(-1, 1, 1), std.view(-1, 1, 1)
        self.max_value = max_value
        self.shift, self.flip = shift, flip
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        image = self.images[i].float() / self.max_value  # (C, H, W) in [0, 1]
        if self.shift:
            # pad-and-crop: a random translation by up to `shift` pixels, zeros (black) coming in
            H, W = image.shape[-2:]
            dy, dx = torch.randint(0, 2 * self.shift + 1, (2,), generator=self.generator).tolist()
            image = F.pad(image, (self.shift,) * 4)[:, dy : dy + H, dx : dx + W]
        if self.flip and bool(torch.rand((), generator=self.generator) < 0.5):
            image = image.flip(-1)
        return {"inputs": (image - self.mean) / self.std, "labels": self.labels[i]}


def _stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Indices per split, each class divided in the same proportions (seeded)."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in fractions}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for k, (split, frac) in enumerate(fractions.items()):
            stop = len(idx) if k == len(fractions) - 1 else start + round(frac * len(idx))
            parts[split].append(idx[start:stop])
            start = stop
    return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}


class _ImageDataModule(SplitDataModule):
    """Shared loaders, statistics and ``model_kwargs`` of the image DataModules."""

    name = ""
    max_value = 255.0
    max_shift = 2  # pixels of random translation when augmenting
    flip = False

    def __init__(self, *, batch_size: int, num_workers: int, augment: bool, seed: int, data_dir: Any) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.seed = seed
        self.data_dir = data_dir
        self.splits: dict[str, ImageDataset] = {}
        self.shape: tuple[int, int, int] | None = None
        self.num_classes = 10

    def _tensors(self) -> dict[str, Tensor]:
        """``{split}_images`` uint8 (N, C, H, W) and ``{split}_labels`` long (N,) for train/val/test."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        t = self._tensors()
        train = t["train_images"].float() / self.max_value
        mean, std = train.mean(dim=(0, 2, 3)), train.std(dim=(0, 2, 3)).clamp_min(1e-6)
        self.shape = tuple(t["train_images"].shape[1:])
        for split in SPLITS:
            augment = self.augment and split == "train"
            self.splits[split] = ImageDataset(
                t[f"{split}_images"],
                t[f"{split}_labels"],
                mean,
                std,
                max_value=self.max_value,
                shift=self.max_shift if augment else 0,
                flip=self.flip and augment,
                seed=self.seed,
            )

    def model_kwargs(self) -> dict[str, Any]:
        """What a ViT needs from this data: ``img_size``, ``in_chans``, ``num_classes``."""
        self.setup()
        C, H, W = self.shape
        return {"img_size": [H, W] if H != W else H, "in_chans": C, "num_classes": self.num_classes}


class DigitsDataModule(_ImageDataModule):
    """scikit-learn's 8x8 handwritten digits as 1-channel images; works offline (the ViT default)."""

    name = "digits"
    max_value = 16.0  # the UCI digits count pixels in a 4x4 block: values 0..16
    max_shift = 1

    def __init__(
        self,
        *,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        augment: bool = True,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        data_dir: str | os.PathLike = DEFAULT_DATA_DIR,
    ) -> None:
        """
        Args:
            val_fraction: share of each class used for validation.
            test_fraction: share of each class used for testing.
            augment: random 1-pixel translations of training images.
            seed: seed of the split and of the augmentation.
            batch_size: images per batch (per device).
            num_workers: DataLoader workers.
            data_dir: cache root for the prepared split.
        """
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"digits: val_fraction={val_fraction} and test_fraction={test_fraction} must be in (0, 1) and sum "
                f"to less than 1."
            )
        super().__init__(batch_size=batch_size, num_workers=num_workers, augment=augment, seed=seed, data_dir=data_dir)
        self.fractions = {"train": 1 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}

    def _tensors(self) -> dict[str, Tensor]:
        def make() -> dict[str, Tensor]:
            digits = require("sklearn.datasets", "data=digits").load_digits()
            images = torch.from_numpy(digits.images.astype(np.uint8))[:, None]  # (1797, 1, 8, 8)
            labels = torch.from_numpy(digits.target.astype(np.int64))
            parts = _stratified_split(digits.target, self.fractions, self.seed)
            out = {}
            for split, idx in parts.items():
                out[f"{split}_images"], out[f"{split}_labels"] = images[idx], labels[idx]
            return out

        config = {"fractions": self.fractions, "seed": self.seed, "version": 1}
        return cached_tensors("digits", config, make, self.data_dir)


_LAYOUTS = {
    "cifar10": "<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} (the python version of "
    "CIFAR-10, cifar-10-python.tar.gz extracted)",
    "mnist": "<root>/MNIST/raw/{train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte} (optionally .gz)",
}


class _TorchvisionDataModule(_ImageDataModule):
    """A torchvision data set from a local folder; validation is a seeded slice of the official training set."""

    def __init__(
        self,
        *,
        root: str | os.PathLike | None = None,
        download: bool = False,
        val_size: int = 5000,
        augment: bool = True,
        seed: int = 0,
        batch_size: int = 128,
        num_workers: int = 0,
        data_dir: str | os.PathLike = DEFAULT_DATA_DIR,
    ) -> None:
        """
        Args:
            root: folder holding the data set (default ``<data_dir>/<name>``); see the layout in the error message.
            download: fetch the files into ``root`` if missing (needs a network).
            val_size: training images held out for validation.
            augment: random translations (and flips for CIFAR-10) of training images.
            seed: seed of the validation slice and the augmentation.
            batch_size: images per batch (per device).
            num_workers: DataLoader workers.
            data_dir: default parent of ``root``.
        """
        super().__init__(batch_size=batch_size, num_workers=num_workers, augment=augment, seed=seed, data_dir=data_dir)
        self.root = Path(os.path.expanduser(str(root))) if root else Path(os.path.expanduser(str(data_dir))) / self.name
        self.download = download
        self.val_size = val_size

    def _dataset(self, train: bool) -> Any:
        raise NotImplementedError

    def prepare_data(self) -> None:
        self._checked_dataset(train=True)  # downloads once per node when download=true
        self._checked_dataset(train=False)

    def _checked_dataset(self, train: bool) -> Any:
        try:
            return self._dataset(train)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
            raise FileNotFoundError(
                f"{self.name}: no data set found in {self.root}. Expected layout: {_LAYOUTS[self.name]}. Put the "
                f"files there, point data.root=<folder> at them, or pass data.download=true on a machine with a "
                f"network. (torchvision said: {err})"
            ) from None

    def _load(self, train: bool) -> tuple[Tensor, Tensor]:
        ds = self._checked_dataset(train)
        images = torch.as_tensor(np.asarray(ds.data))
        images = images[:, None] if images.dim() == 3 else images.permute(0, 3, 1, 2)  # (N, C, H, W)
        return images.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)

    def _tensors(self) -> dict[str, Tensor]:
        train_images, train_labels = self._load(train=True)
        test_images, test_labels = self._load(train=False)
        if not 0 < self.val_size < len(train_labels):
            raise ValueError(f"{self.name}: val_size={self.val_size} must be in (0, {len(train_labels)}).")
        perm = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(self.seed))
        val, train = perm[: self.val_size], perm[self.val_size :]
        return {
            "train_images": train_images[train],
            "train_labels": train_labels[train],
            "val_images": train_images[val],
            "val_labels": train_labels[val],
            "test_images": test_images,
            "test_labels": test_labels,
        }


class CIFAR10DataModule(_TorchvisionDataModule):
    """CIFAR-10 (32x32 RGB, 10 classes) from ``root`` via ``torchvision.datasets.CIFAR10``."""

    name = "cifar10"
    max_shift = 4  # pad 4 and crop 32, the ResNet CIFAR recipe
    flip = True

    def _dataset(self, train: bool) -> Any:
        datasets = require("torchvision.datasets", "data=cifar10")
        return datasets.CIFAR10(str(self.root), train=train, download=self.download)


class MNISTDataModule(_TorchvisionDataModule):
    """MNIST (28x28 grey, 10 classes) from ``root`` via ``torchvision.datasets.MNIST``."""

    name = "mnist"

    def _dataset(self, train: bool) -> Any:
        datasets = require("torchvision.datasets", "data=mnist")
        return datasets.MNIST(str(self.root), train=train, download=self.download)
