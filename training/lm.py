"""Language modelling: next-token cross-entropy over the labelled positions, accuracy and perplexity.

Batches are dicts of ``input_ids`` (B, T), ``labels`` (B, T) with -100 = ignored, and an optional ``padding_mask``
(B, T) bool. Labels are already aligned with the inputs (label t is the target of the logits at t; MQAR and the text
data sets shift when they build the batch), so the task never shifts. Metrics are averaged over labelled tokens, not
batches, and logged as ``<stage>/<name>``: ``loss``, ``acc`` (argmax == label, torchmetrics' ``MulticlassAccuracy``,
micro-averaged over the epoch's labelled tokens) and, for validation and test, ``ppl`` = exp(the epoch's token-weighted
mean loss), i.e. exp(total negative log-likelihood / labelled tokens), the usual corpus perplexity (the mean of
per-batch exp(loss) would overweight bad batches and small ones).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from attnzoo.training.base import STAGES, BaseTask

IGNORE_INDEX = -100


class Perplexity(MeanMetric):
    """exp of the weighted mean of the values it is updated with: ``update(mean_loss, weight=tokens)`` per batch gives
    exp(total loss / total tokens) at ``compute()`` (summed across processes under DDP by torchmetrics)."""

    def compute(self) -> Tensor:
        return super().compute().exp()


class LanguageModelTask(BaseTask):
    """Causal LM on a GPT-style model (``model(input_ids, padding_mask=...) -> logits (B, T, vocab)``)."""

    def __init__(
        self,
        model: dict[str, Any],
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(model, optimizer, scheduler)
        # one metric object per stage: each accumulates over its epoch and is reset by Lightning after logging.
        # validate_args=False: F.cross_entropy has already checked the labels.
        self.stage_metrics = nn.ModuleDict()
        for stage in STAGES:
            self.stage_metrics[f"{stage}_acc"] = MulticlassAccuracy(
                average="micro", ignore_index=IGNORE_INDEX, validate_args=False
            )
            if stage != "train":
                self.stage_metrics[f"{stage}_ppl"] = Perplexity()

    def step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        input_ids, labels = batch["input_ids"], batch["labels"]
        logits = self.model(input_ids, padding_mask=batch.get("padding_mask"))  # (B, T, vocab)
        labelled = labels != IGNORE_INDEX
        n = int(labelled.sum())
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        accuracy = self.stage_metrics[f"{stage}_acc"]
        accuracy(logits.detach().argmax(-1).flatten(), labels.flatten())  # this batch's value, and the epoch's state
        on_step = stage == "train"
        kw = dict(batch_size=max(n, 1), on_step=on_step, on_epoch=True)
        self.log(f"{stage}/loss", loss.detach(), prog_bar=True, sync_dist=stage != "train", **kw)
        self.log(f"{stage}/acc", accuracy, prog_bar=stage != "train", **kw)
        if stage != "train":
            perplexity = self.stage_metrics[f"{stage}_ppl"]
            perplexity.update(loss.detach(), weight=n)
            self.log(f"{stage}/ppl", perplexity, **kw)
        return self.add_aux_loss(loss, stage, max(n, 1))
