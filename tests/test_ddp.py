"""Scale-out (issue 8): DDP on 2 CPU processes (gloo) reproduces the one-process loss curve at the same global batch;
the ``trainer=fsdp`` config composes and builds an FSDP strategy whose wrap unit is the transformer block.

Data order: with a distributed strategy Lightning replaces the shuffling sampler with ``DistributedSampler(shuffle=True,
seed=0)``, which draws ONE permutation per epoch and gives rank r the positions r, r+W, r+2W, ...; rank batch k of every
rank therefore comes from permutation positions [k*W*b, (k+1)*W*b), exactly the one-process batch k of size W*b from the
same permutation. The one-process reference runs the same strategy with one device (so it uses that same sampler and
permutation; world size 1), and the per-token loss is a mean over an equal number of labelled tokens per example (MQAR
labels the same number of queries in every example), so the mean of the ranks' mean losses is the global-batch loss
and the averaged gradients are the global-batch gradients.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose_train
from hydra.utils import instantiate

from attnzoo.layers import Block

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
RTOL = 1e-4  # float32 all-reduce sums in another order than one process's batch mean: ~1e-6 observed


def _train(tmp_path: Path, name: str, devices: int, batch_size: int) -> list[dict]:
    run_dir = tmp_path / name
    args = [
        "trainer=ddp",
        f"trainer.devices={devices}",
        f"data.batch_size={batch_size}",
        "data.num_examples={train:256,val:32,test:32}",
        "model.dim=32",
        "model.depth=2",
        "model.num_heads=2",
        "trainer.max_epochs=1",
        f"trainer.limit_train_batches={STEPS}",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.enable_progress_bar=false",
        "~callbacks.rich_progress_bar",
        "~callbacks.early_stopping",
        "num_threads=1",
        "scheduler.warmup_steps=2",
        "+callbacks.loss_log._target_=attnzoo.training.faults.TrainLossLog",
        f"+callbacks.loss_log.path={run_dir / 'train_loss.jsonl'}",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "ATTNZOO_DATA_DIR": str(tmp_path / "data")}
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "train_loss.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_loss_curve(tmp_path):
    one = _train(tmp_path, "one", devices=1, batch_size=32)
    two = _train(tmp_path, "two", devices=2, batch_size=16)
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= RTOL * abs(a["loss"]), (a, b)
    assert one[-1]["loss"] < one[0]["loss"]  # it trains, so the later steps compare updated weights


def test_fsdp_config_builds_a_block_wrapped_strategy():
    from lightning.pytorch.strategies import FSDPStrategy
    from timm.models.vision_transformer import Block as TimmBlock

    cfg = compose_train(["trainer=fsdp"])
    assert cfg.trainer.num_nodes == 1 and cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert set(policy._module_classes) == {Block, TimmBlock}
