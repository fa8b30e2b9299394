"""Callbacks: training throughput (Lightning) and the multirun comparison table (Hydra).

``ThroughputMonitor`` is Lightning's, with attnzoo's batch layout: it logs samples/s and tokens/s while training and
gives ``summary.json`` its train tokens/s (validation time excluded).
``CompareRunsCallback`` is a Hydra callback (``hydra.callbacks`` in ``configs/train.yaml``): when a ``-m`` sweep
ends it reads every job's ``summary.json`` and prints ONE table comparing the runs (also saved as
``comparison.md`` in the sweep directory).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from lightning.pytorch.callbacks import ThroughputMonitor as LightningThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage
from omegaconf import DictConfig
from torch import Tensor

from attnzoo.training.summary import comparison_table

log = logging.getLogger(__name__)


def batch_size(batch: Any) -> int:
    """Examples in an attnzoo batch (a dict of ``input_ids`` or ``inputs`` first, ``labels``, ...)."""
    return len(_first(batch))


def batch_tokens(batch: Any) -> int:
    """Tokens in a batch of token ids (B, T); for anything else (images) the number of examples."""
    first = _first(batch)
    return first.numel() if first.dim() == 2 and not first.is_floating_point() else len(first)


def _first(batch: Any) -> Tensor:
    if isinstance(batch, dict):
        return batch["input_ids"] if "input_ids" in batch else next(iter(batch.values()))
    return batch[0] if isinstance(batch, (list, tuple)) else batch


class ThroughputMonitor(LightningThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` told what an attnzoo batch holds, plus the run's mean tokens/s.

    Lightning logs ``train|device/samples_per_sec``, ``train|device/batches_per_sec`` and ``train|device/items_per_sec``
    (tokens, :func:`batch_tokens`) to the run's loggers over a sliding window of ``window_size`` batches
    (``train|samples_per_sec`` etc. summed over devices under DDP). Its clock runs from the start of training and
    excludes validation, so data loading and step checkpoints count: the throughput a run really gets.
    """

    def __init__(self, window_size: int = 50, **kwargs: Any) -> None:
        """
        Args:
            window_size: batches per logged rate (Lightning's default is 100; 50 gives a first value sooner).
            **kwargs: passed to Lightning's ``Throughput`` (``separator``).
        """
        super().__init__(batch_size_fn=batch_size, length_fn=batch_tokens, window_size=window_size, **kwargs)

    @property
    def tokens_per_second(self) -> float | None:
        """Tokens (or samples) per second over all of training, summed over devices (``summary.json``)."""
        throughput = self._throughputs.get(RunningStage.TRAINING)  # Lightning keeps one Throughput per stage
        if throughput is None or not throughput._time:
            return None
        totals = throughput.compute()  # always holds the running totals "time" and "lengths"
        if not totals["time"] > 0:
            return None
        return totals["lengths"] * throughput.world_size / totals["time"]


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
