"""``attnzoo-train [overrides]``: the command-line training entry point, the same as ``python train.py [overrides]``.

The Hydra configs are read from the installed package (``pkg://attnzoo.configs``), so the command works from any
directory after ``pip install attnzoo``; the run directory (``outputs/<date>/<time>/``) is relative to the current
directory and generated data is cached under ``paths.data_dir`` (``~/.cache/attnzoo`` or ``$ATTNZOO_DATA_DIR``).
Add your own config groups or files with Hydra's ``--config-dir <folder>`` (or ``hydra.searchpath``).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="pkg://attnzoo.configs", config_name="train")
def train(cfg: DictConfig) -> float | None:
    """Train, test and summarise one run (``attnzoo.training.run``); returns ``optimized_metric`` for sweepers."""
    import attnzoo.training  # after Hydra parsed the command line, so ``--help`` does not wait for torch

    return attnzoo.training.run(cfg)
