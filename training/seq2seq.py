"""Sequence to sequence: teacher-forced cross-entropy of an encoder-decoder, token and whole-sequence accuracy, and the
exact match of greedy generation.

Batches are dicts of ``src_ids`` (B, S), ``src_padding_mask`` (B, S) bool, ``input_ids`` (B, T) = the start token and
the target shifted right, ``padding_mask`` (B, T) bool over the decoder inputs, and ``labels`` (B, T) = the target and
its end token, -100 = ignored (:mod:`attnzoo.data.seq2seq`). Logged per stage as ``<stage>/<name>``:

* ``loss``: mean cross-entropy over labelled tokens; ``acc``: argmax == label over labelled tokens (torchmetrics'
  ``MulticlassAccuracy``, micro-averaged over the epoch);
* ``seq_acc``: fraction of sequences whose every labelled token is the argmax under teacher forcing;
* validation and test only: ``ppl`` = exp(the epoch's token-weighted mean loss);
* test only: ``exact_match``, the fraction of sources for which greedy decoding (``model.generate(...,
  temperature=0)``, with the decoder caches) writes exactly the target and its end token. Greedy decoding follows
  the teacher-forced argmax as long as that is right, so this equals ``seq_acc`` up to argmax ties and rounding; it is
  the end-to-end check of the generation path, logged once per run rather than every validation epoch.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from attnzoo.training.base import STAGES, BaseTask
from attnzoo.training.lm import IGNORE_INDEX, Perplexity


class Seq2SeqTask(BaseTask):
    """Encoder-decoder training (``model(src, tgt, src_padding_mask=, tgt_padding_mask=) -> logits (B, T, vocab)``)."""

    def __init__(
        self,
        model: dict[str, Any],
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(model, optimizer, scheduler)
        # one metric object per stage: each accumulates over its epoch and is reset by Lightning after logging
        self.stage_metrics = nn.ModuleDict()
        for stage in STAGES:
            self.stage_metrics[f"{stage}_acc"] = MulticlassAccuracy(
                average="micro", ignore_index=IGNORE_INDEX, validate_args=False
            )
            self.stage_metrics[f"{stage}_seq_acc"] = MeanMetric()
            if stage != "train":
                self.stage_metrics[f"{stage}_ppl"] = Perplexity()
        self.stage_metrics["test_exact_match"] = MeanMetric()

    def forward(
        self, src: Tensor, tgt: Tensor, src_padding_mask: Tensor | None = None, tgt_padding_mask: Tensor | None = None
    ) -> Tensor:
        return self.model(src, tgt, src_padding_mask=src_padding_mask, tgt_padding_mask=tgt_padding_mask)

    def step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        src, src_mask, labels = batch["src_ids"], batch.get("src_padding_mask"), batch["labels"]
        logits = self(src, batch["input_ids"], src_mask, batch.get("padding_mask"))  # (B, T, vocab)
        labelled = labels != IGNORE_INDEX
        n = int(labelled.sum())
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        predicted = logits.detach().argmax(-1)  # (B, T)
        accuracy = self.stage_metrics[f"{stage}_acc"]
        accuracy(predicted.flatten(), labels.flatten())
        seq_acc = self.stage_metrics[f"{stage}_seq_acc"]
        seq_acc.update(((predicted == labels) | ~labelled).all(dim=1).float())
        on_step = stage == "train"
        kw = dict(on_step=on_step, on_epoch=True)
        self.log(f"{stage}/loss", loss.detach(), prog_bar=True, sync_dist=not on_step, batch_size=max(n, 1), **kw)
        self.log(f"{stage}/acc", accuracy, prog_bar=not on_step, batch_size=max(n, 1), **kw)
        self.log(f"{stage}/seq_acc", seq_acc, prog_bar=not on_step, batch_size=src.shape[0], **kw)
        if stage != "train":
            perplexity = self.stage_metrics[f"{stage}_ppl"]
            perplexity.update(loss.detach(), weight=n)
            self.log(f"{stage}/ppl", perplexity, batch_size=max(n, 1), **kw)
        if stage == "test" and hasattr(self.model, "generate"):
            exact = self.stage_metrics["test_exact_match"]
            exact.update(self.generated_exact_match(src, src_mask, labels).float())
            self.log("test/exact_match", exact, batch_size=src.shape[0], **kw)
        return self.add_aux_loss(loss, stage, max(n, 1))

    def generated_exact_match(self, src: Tensor, src_padding_mask: Tensor | None, labels: Tensor) -> Tensor:
        """(B,) bool: greedy decoding reproduces every labelled token (the target and its end token)."""
        T = labels.shape[1]
        generated = self.model.generate(src, T, temperature=0, src_padding_mask=src_padding_mask)[:, 1:]
        pad = getattr(self.model, "pad_token_id", 0)
        if generated.shape[1] < T:  # every row ended early: the rest is padding
            generated = F.pad(generated, (0, T - generated.shape[1]), value=pad)
        labelled = labels != IGNORE_INDEX
        return ((generated == labels) | ~labelled).all(dim=1)
