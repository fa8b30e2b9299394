"""Surviving faults during training: atomic checkpoints, checkpoint-and-exit on signals, a non-finite loss guard,
safe resume checks, and the safetensors export of a run.

Lightning does most of it; this module adds only what Lightning does not do (each class says why):

- ``AtomicCheckpointIO`` (always in the trainer ``run(cfg)`` builds): Lightning's ``TorchCheckpointIO`` writes through
  an fsspec transaction whose temporary file sits in the system temp directory and is moved over the target without
  an fsync (a copy, not a rename, when that directory is on another file system), so a crash can leave a partial or
  unwritten ``last.ckpt``. Here the temporary file is written next to the target, fsynced and ``os.replace``d
  (``attnzoo.models.io.atomic_torch_save``); reads are ``weights_only=True`` with clear errors
  (``attnzoo.models.io.load_checkpoint``).
- ``SignalCheckpoint``: Lightning records SIGTERM (and forwards it to DDP worker processes) and stops the loop with
  ``SIGTERMException``, calling every callback's ``on_exception``; this callback makes every rank stop at the same
  training batch end, writes ``checkpoints/last.ckpt`` there (Lightning saves nothing on SIGTERM outside SLURM
  auto-requeue) and routes the first SIGINT (Ctrl-C) into the same path. ``run`` then exits with status 0 and a
  message saying how to resume. A second SIGINT interrupts at once (Lightning's KeyboardInterrupt path, status 1).
- ``StepCheckpoint`` (``last_checkpoint`` in ``configs/callbacks/default.yaml``) writes ``last.ckpt`` every N optimizer
  steps, bounding what ``kill -9`` loses to the N steps since the last save.
- ``NonFiniteLossGuard``: a NaN/inf training loss is caught BEFORE its backward pass, so no non-finite gradient ever
  reaches the weights and no checkpoint is written afterwards (the last good ``last.ckpt`` is kept); the run ends
  with status 1 and a message naming the step, the loss, the learning rate and precision, and the likely causes.
- :func:`check_resume_checkpoint`: a ``ckpt_path=`` that is truncated, not a checkpoint, or from a different model is
  a configuration error with one message, before training starts.
- :func:`export_weights`: ``run`` writes the tested (best) model's weights to ``model.safetensors`` in the run
  directory, loadable with ``attnzoo.models.load_weights``.

``FaultInjection`` and ``TrainLossLog`` exist for drills and tests: the first poisons a weight with NaN at a chosen
step (a reproducible non-finite loss), the second writes the globally averaged training loss of every step (how
``tests/test_ddp.py`` compares one process with two).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor, nn

from attnzoo.models.io import CheckpointError, atomic_torch_save, load_checkpoint

log = logging.getLogger(__name__)

RESUME_HINT = "resume with: python train.py <the same overrides> ckpt_path={path}"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; raised before its backward pass so the weights stay finite."""


# ---------------------------------------------------------------------------------------------------------------
# checkpoint files


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O with attnzoo's one writer and reader (``attnzoo.models.io``): atomic, fsynced writes
    next to the target (Lightning's own moves an unsynced temp file from the system temp directory), and
    ``weights_only=True`` reads with clear errors."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"AtomicCheckpointIO does not take storage_options (got {storage_options!r}); drop the argument."
            )
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = True) -> dict[str, Any]:
        if weights_only is False:
            log.warning("AtomicCheckpointIO loads %s with weights_only=True regardless (no code execution)", path)
        return load_checkpoint(path, map_location=map_location or "cpu")


def trainer_plugins() -> list[Any]:
    """The plugins every trainer built by ``run(cfg)`` gets (the atomic, weights-only checkpoint I/O)."""
    return [AtomicCheckpointIO()]


def check_resume_checkpoint(path: str | os.PathLike, task: nn.Module) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a readable checkpoint whose weights fit ``task``.

    Args:
        path: the ``ckpt_path`` a run will resume from.
        task: the freshly built LightningModule of this configuration.
    """
    checkpoint = load_checkpoint(path)
    saved = checkpoint["state_dict"]
    own = task.state_dict()
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in saved and isinstance(saved[k], Tensor) and saved[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        details = "; ".join(
            part
            for part in (
                f"missing {missing[:4]}" if missing else "",
                f"unexpected {unexpected[:4]}" if unexpected else "",
                f"shape mismatches {shapes[:3]}" if shapes else "",
            )
            if part
        )
        saved_model = (checkpoint.get("hyper_parameters") or {}).get("model", {})
        brief = {k: saved_model.get(k) for k in ("name", "dim", "depth", "num_heads") if k in saved_model}
        raise CheckpointError(
            f"checkpoint {path} does not fit this configuration's model ({details}). It was saved from "
            f"{brief or 'another model'}; resume with the configuration it was trained with (its run directory's "
            f"config.yaml), or start a new run without ckpt_path."
        )


def export_weights(task: nn.Module, output_dir: str | os.PathLike) -> Path:
    """Write ``task.model`` to ``<output_dir>/model.safetensors`` (atomic); ``attnzoo.models.load_weights`` reads it."""
    from attnzoo.models import save_weights

    model = getattr(task, "model", task)
    return save_weights(model, Path(output_dir) / "model.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# callbacks


def _checkpoint_path(trainer: L.Trainer, dirpath: str | None, filename: str) -> Path:
    directory = dirpath or getattr(trainer.checkpoint_callback, "dirpath", None)
    return Path(directory or Path(trainer.default_root_dir) / "checkpoints") / filename


def _agree(trainer: L.Trainer, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (one collective; free on a single process)."""
    if trainer.world_size > 1:
        return bool(trainer.strategy.reduce_boolean_decision(flag, all=False))
    return flag


class SignalCheckpoint(L.Callback):
    """SIGTERM/SIGINT -> ``last.ckpt`` at the next training batch end, then the run stops (exit status 0).

    Lightning's own SIGTERM handler records the signal (and forwards it to DDP worker processes); Lightning then
    raises ``SIGTERMException`` and calls ``on_exception``, where this callback writes the checkpoint. Two additions:
    the first SIGINT is re-raised as SIGTERM (Lightning turns SIGINT into a ``KeyboardInterrupt`` wherever the process
    is, possibly inside an optimizer step, and exits with status 1 without a checkpoint); and at every training batch
    end the ranks agree (any rank signalled -> all stop), because Lightning's own check is per rank and ranks that
    receive the signal a moment apart would stop at different batches and leave the others waiting in a collective.
    Stopping at a batch end (not after validation) keeps the state consistent and the exact step in the checkpoint.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last.ckpt") -> None:
        """
        Args:
            dirpath: where to write; default: the trainer's ``checkpoint_callback.dirpath`` (``checkpoints/``), else
                ``<default_root_dir>/checkpoints``.
            filename: the checkpoint file name (``last.ckpt``, the one ``ckpt_path=`` resumes from).
        """
        self.dirpath = dirpath
        self.filename = filename
        self.interrupted = False  # a first SIGINT was received (re-raised as SIGTERM)
        self.saved_path: Path | None = None
        self.saved_step: int | None = None
        self._previous_sigint: Any = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.interrupted:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now (Lightning's path, status 1)
        self.interrupted = True
        signal.raise_signal(signal.SIGTERM)  # Lightning's handler records it

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.interrupted, self.saved_path, self.saved_step = False, None, None
        try:
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread (e.g. a notebook worker): keep the default
            log.warning("SignalCheckpoint: cannot install a SIGINT handler outside the main thread")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_sigint is not None:
            with contextlib.suppress(ValueError):  # not the main thread: nothing was installed
                signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int):
        if _agree(trainer, trainer.received_sigterm):
            raise SIGTERMException()  # every rank, at this same batch end; on_exception saves

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit" or self.saved_path is not None:
            return
        path = _checkpoint_path(trainer, self.dirpath, self.filename)
        trainer.save_checkpoint(path, weights_only=False)  # collective under DDP; rank 0 writes atomically
        self.saved_path, self.saved_step = path, trainer.global_step
        name = "SIGINT" if self.interrupted else "SIGTERM"
        if trainer.is_global_zero:
            print(
                f"attnzoo: received {name}; saved {path} at step {trainer.global_step} and stopped. "
                + RESUME_HINT.format(path=path),
                flush=True,
            )


class StepCheckpoint(L.Callback):
    """Write ``last.ckpt`` every ``every_n_train_steps`` optimizer steps, so ``kill -9`` loses at most that many.

    A callback of its own rather than a second ``ModelCheckpoint``: Lightning's ``ModelCheckpoint`` with
    ``every_n_train_steps`` stops saving at validation ends, and two of them writing ``last.ckpt`` version the name
    (``last-v1.ckpt``). The best-model ``ModelCheckpoint`` keeps writing ``last.ckpt`` at every validation end.
    """

    def __init__(self, every_n_train_steps: int = 50, dirpath: str | None = None, filename: str = "last.ckpt") -> None:
        """
        Args:
            every_n_train_steps: save period in optimizer steps (the most steps a hard kill can lose); 0 disables.
            dirpath: where to write; default: the trainer's ``checkpoint_callback.dirpath`` (``checkpoints/``), else
                ``<default_root_dir>/checkpoints``.
            filename: the checkpoint file name.
        """
        if every_n_train_steps < 0:
            raise ValueError(
                f"StepCheckpoint: every_n_train_steps={every_n_train_steps} is negative; use a positive period "
                f"or 0 to disable."
            )
        self.every_n_train_steps = every_n_train_steps
        self.dirpath = dirpath
        self.filename = filename

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int):
        step = trainer.global_step
        if self.every_n_train_steps <= 0 or trainer.sanity_checking or trainer.fast_dev_run:
            return
        if step > 0 and step % self.every_n_train_steps == 0:
            trainer.save_checkpoint(_checkpoint_path(trainer, self.dirpath, self.filename), weights_only=False)


class NonFiniteLossGuard(L.Callback):
    """Stop on a NaN/inf training loss before its backward pass (weights and checkpoints stay finite).

    Lightning has no per-step guard: ``EarlyStopping(check_finite=True)`` reacts to a monitored metric at validation,
    after the non-finite updates and step checkpoints, and ``Trainer(detect_anomaly=True)`` is autograd's anomaly mode
    (a slower backward that raises inside it, with no cause named).
    """

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if not _agree(trainer, bad):
            return
        lrs = [group["lr"] for opt in trainer.optimizers for group in opt.param_groups]
        lr = f"{max(lrs):.3g}" if lrs else "unknown"
        precision = str(trainer.precision)
        value = float(loss.detach().float().flatten()[0]) if bad else float("nan")
        where = (
            f"loss {value} at step {trainer.global_step}" if bad else f"another rank's loss at {trainer.global_step}"
        )
        causes = [
            f"the learning rate is too high (current lr {lr}; try optimizer.lr 3-10x smaller or a longer "
            f"scheduler.warmup_steps)"
        ]
        if "16" in precision:
            causes.append(
                f"reduced precision overflowed (precision={precision}; try trainer.precision=bf16-mixed or 32-true)"
            )
        else:
            causes.append(f"a numerical overflow in the model (precision={precision}, so not reduced precision)")
        causes.append("a data batch with extreme values, or trainer.gradient_clip_val=null")
        last = _checkpoint_path(trainer, None, "last.ckpt")
        last = last if last.is_file() else "none yet"
        raise NonFiniteLossError(
            f"non-finite training {where}. Likely causes: " + "; ".join(causes) + ". No weights were updated with it "
            f"and no checkpoint was written after it; the last good checkpoint is {last}."
        )


class FaultInjection(L.Callback):
    """Drill/test helper: make the loss non-finite from a chosen step on (poisons one weight with NaN).

    Use: ``+callbacks.fault._target_=attnzoo.training.faults.FaultInjection +callbacks.fault.nan_at_step=7``.
    """

    def __init__(self, nan_at_step: int | None = None) -> None:
        """
        Args:
            nan_at_step: the global step whose forward pass sees a NaN weight (None: do nothing).
        """
        self.nan_at_step = nan_at_step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        if self.nan_at_step is not None and trainer.global_step == self.nan_at_step:
            with torch.no_grad():
                next(p for p in pl_module.parameters() if p.requires_grad).view(-1)[0] = float("nan")


class TrainLossLog(L.Callback):
    """Write ``{"step", "loss"}`` per optimizer step to a JSON-lines file; the loss is averaged over all ranks."""

    def __init__(self, path: str) -> None:
        """
        Args:
            path: the ``.jsonl`` file (written by rank 0, appended per step).
        """
        self.path = Path(path)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        mean = trainer.strategy.reduce(loss.detach().float(), reduce_op="mean")
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({"step": trainer.global_step, "loss": float(mean)}) + "\n")
