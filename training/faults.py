"""Surviving faults during training: atomic checkpoints, checkpoint-and-exit on signals, a non-finite loss guard,
safe resume checks, and the safetensors export of a run (issue 8).

What each piece guarantees (README.md, "Reliability", lists the tests):

- ``AtomicCheckpointIO`` (always in the trainer ``run(cfg)`` builds): a checkpoint is written to a temporary file in the
  target directory, fsynced, then ``os.replace``d over the target, so a crash or ``kill -9`` during a save leaves the
  previous ``last.ckpt`` intact, never a truncated one. Loading is always ``torch.load(weights_only=True)`` (no code
  runs from the file) and an unreadable file raises :class:`CheckpointError` naming the file, the problem and the fix.
- ``SignalCheckpoint``: SIGTERM (cluster pre-emption, ``kill``) or SIGINT (Ctrl-C) is recorded; at the next training
  batch end the run writes ``checkpoints/last.ckpt`` with the exact step and stops at once (no validation, no test),
  and ``run`` exits with status 0 and a message saying how to resume. A second SIGINT interrupts at once
  (Lightning's KeyboardInterrupt path, status 1).
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
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import Tensor, nn

log = logging.getLogger(__name__)

RESUME_HINT = "resume with: python train.py <the same overrides> ckpt_path={path}"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: the message names the file, what is wrong and what to do."""


class StoppedBySignal(Exception):
    """Raised by :class:`SignalCheckpoint` after ``last.ckpt`` is written; ``run`` returns normally (exit status 0).

    An exception rather than ``trainer.should_stop``: a requested stop makes Lightning run validation and finish the
    epoch first, which costs time a pre-empted job may not have and marks the epoch done in the saved loop state.
    """


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; raised before its backward pass so the weights stay finite."""


# ---------------------------------------------------------------------------------------------------------------
# atomic checkpoint files


def _fsync_dir(directory: Path) -> None:
    # the rename itself is only durable once the directory entry is on disk (POSIX); not possible on Windows
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` that never leaves a partial ``path``: temp file in the same directory, fsync, replace.

    Args:
        obj: anything ``torch.save`` accepts (a checkpoint dict).
        path: the target file; its directory is created if missing.

    The temporary file lives in the target's directory so ``os.replace`` is a rename within one file system (atomic
    on POSIX and Windows); on any failure it is removed and the previous ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a Lightning checkpoint with ``weights_only=True``; bad files raise :class:`CheckpointError`.

    Args:
        path: the ``.ckpt`` file.
        map_location: passed to ``torch.load`` (default: CPU).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; runs write checkpoints/last.ckpt and best-*.ckpt.")
    size = path.stat().st_size
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, random bytes, or a pickle that needs arbitrary code to load
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            what = "it contains Python objects that are not plain tensors/containers, so loading it would run code"
            fix = "re-save it from trusted code as a state dict, or load only trusted files with torch.load yourself"
        else:
            what = f"the file ({size} bytes) is truncated or corrupted"
            fix = (
                "resume from another checkpoint (checkpoints/best-*.ckpt, or an older copy); attnzoo writes "
                "checkpoints atomically, so a partial file comes from a copy or a disk that failed"
            )
        raise CheckpointError(
            f"cannot read checkpoint {path}: {what} ({type(err).__name__}: {first}). Fix: {fix}."
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        got = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(
            f"{path} is not a Lightning training checkpoint (no 'state_dict'; got {got}). A weights file "
            f"(model.safetensors) loads with attnzoo.models.load_weights, not with ckpt_path=."
        )
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O: atomic writes (:func:`atomic_torch_save`), ``weights_only=True`` reads with clear
    errors (:func:`read_checkpoint`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"AtomicCheckpointIO does not take storage_options (got {storage_options!r}); drop the argument."
            )
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = True) -> dict[str, Any]:
        if weights_only is False:
            log.warning("AtomicCheckpointIO loads %s with weights_only=True regardless (no code execution)", path)
        return read_checkpoint(path, map_location=map_location or "cpu")


def trainer_plugins() -> list[Any]:
    """The plugins every trainer built by ``run(cfg)`` gets (the atomic, weights-only checkpoint I/O)."""
    return [AtomicCheckpointIO()]


def check_resume_checkpoint(path: str | os.PathLike, task: nn.Module) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a readable checkpoint whose weights fit ``task``.

    Args:
        path: the ``ckpt_path`` a run will resume from.
        task: the freshly built LightningModule of this configuration.
    """
    checkpoint = read_checkpoint(path)
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
    """SIGTERM/SIGINT -> ``last.ckpt`` at the next training batch end, then :class:`StoppedBySignal`.

    The handler only records the signal (saving inside a signal handler could interleave with a running optimizer
    step); ``on_train_batch_end`` acts on it, so the checkpoint holds a consistent state with the exact step count.
    Under DDP the ranks agree first (any rank signalled -> all save and stop together).
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
        self.received: int | None = None
        self.saved_path: Path | None = None
        self.saved_step: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signum

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # installed after Lightning's own SIGTERM connector, so this recorder is the one that runs
        self.received = None
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): keep the defaults
                log.warning("SignalCheckpoint: cannot install a %s handler outside the main thread", signum)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            with contextlib.suppress(ValueError):  # not the main thread: nothing was installed
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int):
        if not _agree(trainer, self.received is not None) or self.saved_path is not None:
            return
        path = _checkpoint_path(trainer, self.dirpath, self.filename)
        trainer.save_checkpoint(path)  # collective under DDP; rank 0 writes (atomically, AtomicCheckpointIO)
        self.saved_path, self.saved_step = path, trainer.global_step
        name = signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
        if trainer.is_global_zero:
            print(
                f"attnzoo: received {name}; saved {path} at step {trainer.global_step} and stopped. "
                + RESUME_HINT.format(path=path),
                flush=True,
            )
        raise StoppedBySignal(f"stopped by {name} at step {trainer.global_step}; {RESUME_HINT.format(path=path)}")


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
            trainer.save_checkpoint(_checkpoint_path(trainer, self.dirpath, self.filename))


class NonFiniteLossGuard(L.Callback):
    """Stop on a NaN/inf training loss before its backward pass (weights and checkpoints stay finite)."""

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
