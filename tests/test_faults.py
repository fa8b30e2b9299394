"""Faults during training: atomic checkpoint writes, SIGTERM/SIGINT checkpoint-and-exit, kill -9 resume,
corrupted/incompatible checkpoints, the NaN/inf guard, weights_only loading and the safetensors export.

The unit tests run in-process; the fault drills run ``python train.py`` in real subprocesses (slow-marked, each
well under 40 s on an idle machine) with a tiny model and ``num_threads=1``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from attnzoo.models import GPT, load_weights
from attnzoo.models.io import CheckpointError, atomic_torch_save, load_checkpoint
from attnzoo.training import faults, run

REPO = Path(__file__).resolve().parents[1]

# a tiny model and small, long-enough data: about 500 optimizer steps per epoch, so signals land mid-run
TINY = [
    "model.dim=32",
    "model.depth=1",
    "model.num_heads=2",
    "data.num_examples={train:4096,val:32,test:32}",
    "data.batch_size=8",
    "trainer.max_epochs=1",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
    "~callbacks.rich_progress_bar",
    "~callbacks.early_stopping",
    "num_threads=1",
    "scheduler.warmup_steps=2",
]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "ATTNZOO_DATA_DIR": str(tmp_path / "data"), "PYTHONUNBUFFERED": "1"}


def _cmd(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *TINY, f"hydra.run.dir={run_dir}", *overrides]


def _train(tmp_path: Path, run_dir: Path, *overrides: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        _cmd(run_dir, *overrides), cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout
    )


def _start(tmp_path: Path, run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        _cmd(run_dir, *overrides),
        cwd=tmp_path,
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_step(proc: subprocess.Popen, last: Path, min_step: int, timeout: float = 90) -> int:
    """Poll until ``last`` holds a checkpoint with global_step >= min_step; return that step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the fault (status {proc.returncode}):\n{proc.stdout.read()}")
        if last.is_file():
            step = load_checkpoint(last)["global_step"]  # atomic writes: never a partial file here
            if step >= min_step:
                return step
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no checkpoint with step >= {min_step} at {last} after {timeout} s")


def _step(path: Path) -> int:
    return int(load_checkpoint(path)["global_step"])


# ---------------------------------------------------------------------------------------------------------------
# unit tests (in-process)


def test_atomic_save_failure_leaves_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "checkpoints" / "last.ckpt"
    atomic_torch_save({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, target)

    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial bytes of a zip")  # what a process killed mid-write leaves behind
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="simulated"):
        atomic_torch_save({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, target)
    monkeypatch.setattr(torch, "save", real_save)

    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # no temp file left over
    assert load_checkpoint(target)["global_step"] == 1  # the previous checkpoint, intact


def test_checkpoint_io_is_atomic_and_weights_only(tmp_path, monkeypatch):
    io = faults.AtomicCheckpointIO()
    path = tmp_path / "a.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.arange(4.0)}, "hyper_parameters": {"model": {"dim": 8}}}, path)
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.arange(4.0))

    class Payload:  # an object whose unpickling would run code
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"state_dict": {}, "evil": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="would run code"):
        io.load_checkpoint(tmp_path / "evil.ckpt", weights_only=False)  # weights_only cannot be switched off


def test_truncated_and_foreign_files_give_clear_errors(tmp_path):
    good = tmp_path / "good.ckpt"
    atomic_torch_save({"state_dict": {"w": torch.randn(64, 64)}, "global_step": 3}, good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(truncated)
    message = str(err.value)
    assert str(truncated) in message and "truncated or corrupted" in message and "best-*.ckpt" in message

    weights = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, weights)
    with pytest.raises(CheckpointError, match="not a Lightning training checkpoint"):
        load_checkpoint(weights)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_run_resume_checks_and_safetensors_export(cfg_train, tmp_path):
    with open_dict(cfg_train):
        cfg_train.trainer.limit_train_batches = 2
        cfg_train.trainer.limit_val_batches = 1
        cfg_train.trainer.limit_test_batches = 1
        cfg_train.callbacks.pop("early_stopping", None)
    run(cfg_train)
    last = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)  # plain containers only
    assert checkpoint["global_step"] == 2 and isinstance(checkpoint["hyper_parameters"]["model"], dict)

    # the exported weights are the tested (best) checkpoint's, loadable into a fresh model
    model_cfg = {k: v for k, v in checkpoint["hyper_parameters"]["model"].items() if k != "name"}
    model = load_weights(GPT(**model_cfg), tmp_path / "model.safetensors")
    best = next((tmp_path / "checkpoints").glob("best-*.ckpt"))
    best_state = load_checkpoint(best)["state_dict"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, best_state[f"model.{name}"], rtol=0, atol=0)

    # resuming a different model from this checkpoint: one configuration message, before any training
    with open_dict(cfg_train):
        cfg_train.ckpt_path = str(last)
        cfg_train.model.dim = 32
        cfg_train.paths.output_dir = str(tmp_path / "other")
    with pytest.raises(SystemExit) as err:
        run(cfg_train)
    message = str(err.value)
    assert "does not fit this configuration's model" in message and str(last) in message and "config.yaml" in message

    # a truncated checkpoint: the same, naming the file
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(last.read_bytes()[:1000])
    with open_dict(cfg_train):
        cfg_train.ckpt_path = str(broken)
    with pytest.raises(SystemExit, match="truncated or corrupted"):
        run(cfg_train)


def test_nan_guard_stops_before_the_update(cfg_train, tmp_path):
    with open_dict(cfg_train):
        cfg_train.trainer.limit_train_batches = 6
        cfg_train.callbacks.pop("early_stopping", None)
        cfg_train.callbacks.last_checkpoint.every_n_train_steps = 2
        cfg_train.callbacks.fault = {"_target_": "attnzoo.training.faults.FaultInjection", "nan_at_step": 3}
    with pytest.raises(SystemExit) as err:
        run(cfg_train)
    message = str(err.value)
    assert "non-finite training loss nan at step 3" in message
    assert "learning rate is too high" in message and "precision=32-true, so not reduced precision" in message
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert str(last) in message
    checkpoint = load_checkpoint(last)
    assert checkpoint["global_step"] == 2  # the last good one, not overwritten after the NaN
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
    assert not (tmp_path / "summary.json").exists()


def test_huge_learning_rate_is_named_as_the_cause(cfg_train, tmp_path):
    with open_dict(cfg_train):
        cfg_train.optimizer.lr = 1e6
        cfg_train.trainer.limit_train_batches = 8
        cfg_train.callbacks.pop("early_stopping", None)
    with pytest.raises(SystemExit) as err:
        run(cfg_train)
    message = str(err.value)
    assert "non-finite training loss" in message and "learning rate is too high (current lr 1e+06" in message


# ---------------------------------------------------------------------------------------------------------------
# fault drills on the command line (real subprocesses)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_last_ckpt_exits_clean_and_resumes(tmp_path, signum):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = _start(tmp_path, run_dir, "callbacks.last_checkpoint.every_n_train_steps=3")
    _wait_for_step(proc, last, min_step=3)
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output[-3000:]
    assert f"received {signum.name}" in output and "resume with:" in output and f"ckpt_path={last}" in output
    stopped = _step(last)
    assert f"at step {stopped} and stopped" in output  # the checkpoint holds the exact step of the stop
    assert stopped < 512 and not (run_dir / "summary.json").exists()

    resumed = _train(tmp_path, tmp_path / "resumed", f"ckpt_path={last}", f"trainer.max_steps={stopped + 3}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["global_step"] == stopped + 3  # the step count continues from the checkpoint


@pytest.mark.slow
def test_kill_9_resume_loses_at_most_the_steps_since_the_checkpoint(tmp_path):
    every = 4
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = _start(tmp_path, run_dir, f"callbacks.last_checkpoint.every_n_train_steps={every}")
    _wait_for_step(proc, last, min_step=2 * every)
    time.sleep(0.3)
    proc.kill()  # SIGKILL: no handler runs
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    saved = _step(last)  # readable: atomic writes never leave a partial last.ckpt, even killed mid-save
    assert saved >= 2 * every and saved % every == 0  # at most `every` steps are lost

    resumed = _train(tmp_path, tmp_path / "resumed", f"ckpt_path={last}", f"trainer.max_steps={saved + 2}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "resumed" / "summary.json").read_text())["global_step"] == saved + 2


@pytest.mark.slow
def test_command_line_truncated_checkpoint_and_nan(tmp_path):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04" + os.urandom(2000))
    result = _train(tmp_path, tmp_path / "broken_run", f"ckpt_path={broken}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"cannot read checkpoint {broken}" in result.stderr and "truncated or corrupted" in result.stderr

    run_dir = tmp_path / "nan"
    result = _train(
        tmp_path,
        run_dir,
        "callbacks.last_checkpoint.every_n_train_steps=2",
        "+callbacks.fault._target_=attnzoo.training.faults.FaultInjection",
        "+callbacks.fault.nan_at_step=5",
    )
    assert result.returncode == 1
    assert "non-finite training loss nan at step 5" in result.stderr and "learning rate" in result.stderr
    assert _step(run_dir / "checkpoints" / "last.ckpt") == 4  # the last good checkpoint is kept
