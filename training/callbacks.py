"""Callbacks: training throughput (Lightning) and the multirun comparison table (Hydra).

``ThroughputMonitor`` times every training batch (forward, backward, optimizer step) and counts its tokens, so
``summary.json`` reports train tokens/s without validation or checkpointing in the denominator.
``CompareRunsCallback`` is a Hydra callback (``hydra.callbacks`` in ``configs/train.yaml``): when a ``-m`` sweep
ends it reads every job's ``summary.json`` and prints ONE table comparing the runs (also saved as
``comparison.md`` in the sweep directory).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig

from attnzoo.training.summary import comparison_table

log = logging.getLogger(__name__)


class ThroughputMonitor(L.Callback):
    """Tokens (or samples) per second over the training steps, summed over all devices."""

    def __init__(self) -> None:
        self.tokens = 0
        self.seconds = 0.0
        self._start: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx):
        if self._start is None:
            return
        self.seconds += time.perf_counter() - self._start
        first = batch["input_ids"] if isinstance(batch, dict) and "input_ids" in batch else None
        if first is None and isinstance(batch, dict):
            first = next(iter(batch.values()))
        # tokens for token batches (B, T); samples for anything else (images)
        count = (
            first.numel() if first is not None and first.dim() == 2 and not first.is_floating_point() else len(first)
        )
        self.tokens += count * trainer.world_size

    @property
    def tokens_per_second(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None


class CompareRunsCallback(HydraCallback):
    """Print one table comparing every job of a multirun (from each job's ``summary.json``)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        summaries = []
        for path in sorted(sweep_dir.glob("*/summary.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
            try:
                summaries.append({"job": path.parent.name, **json.loads(path.read_text())})
            except (OSError, json.JSONDecodeError) as err:
                log.warning("skipping unreadable %s: %s", path, err)
        if not summaries:
            print(f"attnzoo: no summary.json under {sweep_dir}; no comparison table.")
            return
        table = comparison_table(summaries)
        (sweep_dir / "comparison.md").write_text(table + "\n")
        print(f"\nattnzoo multirun comparison ({len(summaries)} runs, {sweep_dir}):\n{table}")
