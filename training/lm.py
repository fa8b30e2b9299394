"""Language modelling: next-token cross-entropy over the labelled positions, accuracy and perplexity.

Batches are dicts of ``input_ids`` (B, T), ``labels`` (B, T) with -100 = ignored, and an optional ``padding_mask``
(B, T) bool. Labels are already aligned with the inputs (label t is the target of the logits at t; MQAR and the text
data sets shift when they build the batch), so the task never shifts. Metrics are averaged over labelled tokens, not
batches: ``loss``, ``acc`` (argmax == label) and ``ppl`` (exp of each batch's loss, averaged like the others),
logged as ``<stage>/<name>``.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from attnzoo.training.base import BaseTask

IGNORE_INDEX = -100


class LanguageModelTask(BaseTask):
    """Causal LM on a GPT-style model (``model(input_ids, padding_mask=...) -> logits (B, T, vocab)``)."""

    def __init__(
        self,
        model: dict[str, Any],
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(model, optimizer, scheduler)

    def step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        input_ids, labels = batch["input_ids"], batch["labels"]
        logits = self.model(input_ids, padding_mask=batch.get("padding_mask"))  # (B, T, vocab)
        labelled = labels != IGNORE_INDEX
        n = int(labelled.sum())
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        acc = (logits.argmax(-1)[labelled] == labels[labelled]).float().mean()
        on_step = stage == "train"
        kw = dict(batch_size=max(n, 1), on_step=on_step, on_epoch=True, sync_dist=stage != "train")
        self.log(f"{stage}/loss", loss.detach(), prog_bar=True, **kw)
        self.log(f"{stage}/acc", acc, prog_bar=stage != "train", **kw)
        if stage != "train":
            self.log(f"{stage}/ppl", loss.detach().exp(), **kw)
        return self.add_aux_loss(loss, stage, max(n, 1))
