"""Classification: cross-entropy on one label per example, accuracy and top-k accuracy (ViT on images, the encoder on
ListOps or other token sequences).

Batches are dicts of ``inputs`` (images (B, C, H, W) float, or token ids (B, T) long), ``labels`` (B,) long and an
optional ``padding_mask`` (B, T) bool (True = real token) that is passed to the model only when present. Metrics are
logged as ``<stage>/loss``, ``<stage>/acc`` and ``<stage>/top{k}_acc`` (torchmetrics' ``MulticlassAccuracy``,
micro-averaged over the epoch's examples); the base task adds auxiliary losses (MoH).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from attnzoo.training.base import STAGES, BaseTask


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
        self.label_smoothing = label_smoothing
        num_classes = model.get("num_classes") or getattr(self.model, "num_classes", None)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(
                f"ClassificationTask: the model config needs num_classes (a positive int; the data sets provide it "
                f"through model_kwargs()); got {num_classes!r}. Set model.num_classes=<classes>."
            )
        self.top_k = min(top_k, num_classes)
        # one metric object per stage: each accumulates over its epoch and is reset by Lightning after logging.
        # validate_args=False: F.cross_entropy has already checked the labels.
        self.stage_metrics = nn.ModuleDict()
        for stage in STAGES:
            self.stage_metrics[f"{stage}_acc"] = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
            self.stage_metrics[f"{stage}_topk_acc"] = MulticlassAccuracy(
                num_classes, top_k=self.top_k, average="micro", validate_args=False
            )

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
        accuracy, topk = self.stage_metrics[f"{stage}_acc"], self.stage_metrics[f"{stage}_topk_acc"]
        accuracy(logits.detach().argmax(-1), labels)  # this batch's value, and the epoch's state
        topk(logits.detach(), labels)
        B = labels.shape[0]
        kw = dict(batch_size=B, on_step=stage == "train", on_epoch=True)
        self.log(f"{stage}/loss", loss.detach(), prog_bar=True, sync_dist=stage != "train", **kw)
        self.log(f"{stage}/acc", accuracy, prog_bar=True, **kw)
        self.log(f"{stage}/top{self.top_k}_acc", topk, **kw)
        return self.add_aux_loss(loss, stage, B)
