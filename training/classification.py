"""Classification: cross-entropy on one label per example, accuracy and top-k accuracy (ViT on images, the encoder on
ListOps or other token sequences).

Batches are dicts of ``inputs`` (images (B, C, H, W) float, or token ids (B, T) long), ``labels`` (B,) long and an
optional ``padding_mask`` (B, T) bool (True = real token) that is passed to the model only when present. Metrics are
logged as ``<stage>/loss``, ``<stage>/acc`` and ``<stage>/top{k}_acc``; the base task adds auxiliary losses (MoH).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnzoo.training.base import BaseTask


class ClassificationTask(BaseTask):
    """Sequence/image classification on a model ``model(inputs[, padding_mask=...]) -> logits (B, num_classes)``."""

    def __init__(
        self,
        model: dict[str, Any],
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        top_k: int = 5,
        label_smoothing: float = 0.0,
    ) -> None:
        """
        Args:
            model: model config (``name`` + constructor kwargs), see :class:`BaseTask`.
            optimizer: optimizer config, see :class:`BaseTask`.
            scheduler: scheduler config, see :class:`BaseTask`.
            top_k: k of the logged top-k accuracy (capped at the number of classes).
            label_smoothing: cross-entropy label smoothing (Szegedy et al. 2016); 0 = plain cross-entropy.
        """
        super().__init__(model, optimizer, scheduler)
        if top_k < 1:
            raise ValueError(f"ClassificationTask: top_k must be >= 1; got {top_k}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"ClassificationTask: label_smoothing must be in [0, 1); got {label_smoothing}.")
        self.top_k = top_k
        self.label_smoothing = label_smoothing

    def forward(self, inputs: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        if padding_mask is None:
            return self.model(inputs)
        return self.model(inputs, padding_mask=padding_mask)

    def step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        labels = batch["labels"]
        logits = self(batch["inputs"], batch.get("padding_mask"))  # (B, num_classes)
        if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
            raise ValueError(
                f"ClassificationTask: the model must return logits (B, num_classes) for labels (B,) = "
                f"{tuple(labels.shape)}; got {tuple(logits.shape)}."
            )
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        k = min(self.top_k, logits.shape[-1])
        with torch.no_grad():
            acc = (logits.argmax(-1) == labels).float().mean()
            topk = (logits.topk(k, dim=-1).indices == labels[:, None]).any(-1).float().mean()
        B = labels.shape[0]
        kw = dict(batch_size=B, on_step=stage == "train", on_epoch=True, sync_dist=stage != "train")
        self.log(f"{stage}/loss", loss.detach(), prog_bar=True, **kw)
        self.log(f"{stage}/acc", acc, prog_bar=True, **kw)
        self.log(f"{stage}/top{k}_acc", topk, **kw)
        return self.add_aux_loss(loss, stage, B)
