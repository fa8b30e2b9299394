"""Test-session setup shared by every test file."""

import os
import sys
from pathlib import Path

# `python -m pytest` puts the checkout's root first on sys.path, where its kernels/ folder (the sources of
# attnzoo.kernels) would shadow Hugging Face's `kernels` package, which transformers imports. The tests import attnzoo
# from its installation, so the root goes.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _ROOT]

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# Triton kernels run on this CPU-only machine through the interpreter; it must be on before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# two cores: more threads than cores only adds contention in small-tensor tests
torch.set_num_threads(min(2, os.cpu_count() or 1))


# ---------------------------------------------------------------------------------------------------------------
# Composed training configs (the lightning-hydra-template's conftest): train.yaml composed once, shrunk to a CPU-fast
# size, and given a fresh output directory per test.

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

import attnzoo.configs  # noqa: E402

CONFIG_DIR = os.path.dirname(attnzoo.configs.__file__)


def compose_train(overrides: list[str] | None = None) -> DictConfig:
    """``configs/train.yaml`` composed with ``overrides`` (outside any Hydra app, as tests need)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        return compose(config_name="train", overrides=list(overrides or []))


def shrink(cfg: DictConfig, output_dir, data_dir) -> DictConfig:
    """Small data, one epoch, no progress bar, output and data cache under pytest's tmp dirs."""
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.data_dir = str(data_dir)
        if cfg.data.get("name") == "mqar":
            cfg.data.num_examples = {"train": 256, "val": 64, "test": 64}
            cfg.data.batch_size = 32
        cfg.trainer.max_epochs = 1
        cfg.trainer.enable_model_summary = False
        cfg.trainer.log_every_n_steps = 1
        if cfg.get("callbacks"):
            cfg.callbacks.pop("rich_progress_bar", None)
        cfg.trainer.enable_progress_bar = False
        cfg.scheduler.warmup_steps = 2
    return cfg


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One generated-data cache for the whole session, never the user's ~/.cache."""
    return tmp_path_factory.mktemp("attnzoo_data")


@pytest.fixture
def cfg_train(tmp_path, data_dir) -> DictConfig:
    """The default training config, shrunk, writing into this test's tmp_path."""
    return shrink(compose_train(), tmp_path, data_dir)


class LargestTensor(TorchDispatchMode):
    """Records the numel of the largest tensor any aten op produces while active (memory-shape tests: a banded
    pattern must never build a T x T intermediate)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out
