"""The shared base of attnzoo's LightningModules: model from configs, AdamW groups, warmup + cosine, aux losses.

Tasks receive CONFIGS (plain dicts), never modules, and call ``save_hyperparameters()``, so
``Task.load_from_checkpoint(path)`` rebuilds the exact model. Subclasses
implement ``step(batch, stage) -> loss`` and log their own metrics; the base adds the model's auxiliary losses
(MoH's load balance, summed over layers as ``model.aux_loss``) and logs ``train/aux_loss`` and, when attention layers
expose ``head_usage`` (fraction of heads a token used in the last forward), ``train/head_usage`` (their mean).
"""

from __future__ import annotations

import functools
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from attnzoo.training.optim import build_optimizer, warmup_cosine

STAGES = ("train", "val", "test")  # the stages a task logs metrics for, as ``<stage>/<name>``
DEFAULT_OPTIMIZER = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1, "betas": (0.9, 0.95)}
DEFAULT_SCHEDULER = {"name": "warmup_cosine", "warmup_steps": 100, "min_lr_ratio": 0.1}


def build_model(model_cfg: dict[str, Any]) -> nn.Module:
    """Instantiate ``attnzoo.models.MODELS[model_cfg["name"]]`` (or the class named by ``_target_``) with the
    remaining keys."""
    from attnzoo.models import MODELS
    from attnzoo.targets import class_options, resolve_class

    return resolve_class(model_cfg, MODELS, "model")(**class_options(model_cfg))


class BaseTask(L.LightningModule):
    """Model + optimizer + schedule from configs; subclasses define ``step``."""

    # read by Lightning's ThroughputMonitor (FLOPs/s and MFU); not known for an arbitrary attention: not reported
    flops_per_batch: int | None = None

    def __init__(
        self,
        model: dict[str, Any],
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
    ) -> None:
        """
        Args:
            model: model config: ``name`` (a key of ``attnzoo.models.MODELS``) and the constructor kwargs, with the
                attention already resolved (a spec or one spec per layer).
            optimizer: ``{"name": "adamw", "lr", "weight_decay", "betas", "eps"}`` (defaults: lr 1e-3, wd 0.1,
                betas (0.9, 0.95) as in nanoGPT).
            scheduler: ``{"name": "warmup_cosine" | "constant", "warmup_steps", "min_lr_ratio"}``; the cosine runs
                over the trainer's estimated total steps.
        """
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(model)
        self.optimizer_cfg = {**DEFAULT_OPTIMIZER, **dict(optimizer or {})}
        self.scheduler_cfg = {**DEFAULT_SCHEDULER, **dict(scheduler or {})}

    def step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        raise NotImplementedError

    def add_aux_loss(self, loss: Tensor, stage: str, batch_size: int) -> Tensor:
        """``loss`` plus the model's auxiliary losses (training only), with their logging."""
        aux = getattr(self.model, "aux_loss", None)
        if stage == "train" and aux is not None:
            self.log("train/aux_loss", aux.detach(), batch_size=batch_size)
            loss = loss + aux
        usage = [float(m.head_usage) for m in self.model.modules() if getattr(m, "head_usage", None) is not None]
        if stage == "train" and usage:
            self.log("train/head_usage", sum(usage) / len(usage), batch_size=batch_size)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.step(batch, "test")

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.model, self.optimizer_cfg)
        cfg = dict(self.scheduler_cfg)
        name = cfg.pop("name")
        if name == "constant":
            return optimizer
        if name != "warmup_cosine":
            from attnzoo.errors import unknown

            raise ValueError(unknown("scheduler", name, ["constant", "warmup_cosine"]))
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 10_000
        schedule = functools.partial(
            warmup_cosine,
            warmup_steps=int(cfg.get("warmup_steps", 0)),
            total_steps=max(total, 1),
            min_lr_ratio=float(cfg.get("min_lr_ratio", 0.1)),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
