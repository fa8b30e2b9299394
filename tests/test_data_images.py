"""Image data: digits (offline), MNIST from a local folder, clear errors for missing CIFAR-10/MNIST folders."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from attnzoo.data import DATAMODULES, build_datamodule
from attnzoo.data.images import CIFAR10DataModule, DigitsDataModule, MNISTDataModule


def test_digits_splits_batches_and_kwargs(tmp_path):
    dm = DigitsDataModule(data_dir=tmp_path, batch_size=32)
    dm.setup()
    sizes = {s: len(d) for s, d in dm.splits.items()}
    assert sum(sizes.values()) == 1797
    assert abs(sizes["test"] - 0.2 * 1797) < 15 and abs(sizes["val"] - 0.1 * 1797) < 15
    for split in ("val", "test"):  # stratified: every class present in every split
        assert len(torch.unique(dm.splits[split].labels)) == 10
    # disjoint: no image appears in two splits (digits has a few exact duplicates, so compare index-free content
    # counts instead of identity: the multiset union equals the whole set)
    from sklearn.datasets import load_digits

    whole = sorted(map(bytes, load_digits().images.astype(np.uint8).reshape(1797, -1)))
    parts = sorted(bytes(img.numpy().reshape(-1)) for d in dm.splits.values() for img in d.images)
    assert parts == whole
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"].shape == (32, 1, 8, 8) and batch["inputs"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long
    assert dm.model_kwargs() == {"img_size": 8, "in_chans": 1, "num_classes": 10}
    # normalised with training statistics; evaluation images are not augmented
    test = torch.stack([dm.splits["test"][i]["inputs"] for i in range(len(dm.splits["test"]))])
    assert abs(float(test.mean())) < 0.15 and 0.8 < float(test.std()) < 1.2
    torch.testing.assert_close(dm.splits["test"][0]["inputs"], dm.splits["test"][0]["inputs"])
    assert list(tmp_path.glob("digits/*.pt"))


def test_digits_augmentation_shifts_train_images_only(tmp_path):
    dm = DigitsDataModule(data_dir=tmp_path, augment=True, seed=1)
    dm.setup()
    draws = [dm.splits["train"][0]["inputs"] for _ in range(8)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    plain = DigitsDataModule(data_dir=tmp_path, augment=False, seed=1)
    plain.setup()
    assert torch.equal(plain.splits["train"][0]["inputs"], plain.splits["train"][0]["inputs"])


def _write_idx(path, array: np.ndarray) -> None:
    magic = 2051 if array.ndim == 3 else 2049
    with open(path, "wb") as f:
        f.write(struct.pack(">II", magic, array.shape[0]))
        if array.ndim == 3:
            f.write(struct.pack(">II", *array.shape[1:]))
        f.write(array.astype(np.uint8).tobytes())


def test_mnist_from_local_folder(tmp_path):
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 20)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,)))
    dm = MNISTDataModule(data_dir=tmp_path, val_size=10, batch_size=8)
    dm.setup()
    assert {s: len(d) for s, d in dm.splits.items()} == {"train": 50, "val": 10, "test": 20}
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"].shape == (8, 1, 28, 28)
    assert dm.model_kwargs() == {"img_size": 28, "in_chans": 1, "num_classes": 10}


@pytest.mark.parametrize("cls,layout", [(CIFAR10DataModule, "cifar-10-batches-py"), (MNISTDataModule, "MNIST/raw")])
def test_missing_folder_names_the_layout_and_download(cls, layout, tmp_path):
    dm = cls(root=tmp_path / "nothing")
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(FileNotFoundError, match="Expected layout") as err:
            step()
        assert layout in str(err.value) and "download=true" in str(err.value)


def test_registered_and_built_by_name(tmp_path):
    for name in ("digits", "cifar10", "mnist"):
        assert name in DATAMODULES
    dm = build_datamodule({"name": "digits", "data_dir": str(tmp_path), "batch_size": 16})
    assert isinstance(dm, DigitsDataModule) and dm.batch_size == 16
    with pytest.raises(ValueError, match="Did you mean 'digits'"):
        build_datamodule({"name": "digit"})
