"""Epoch metrics of the training tasks against hand computations in float64: the LM's token-weighted accuracy and its
perplexity exp(total NLL / labelled tokens) over batches of different sizes, classification accuracy and top-k, and
the tokens/s that ``summary.json`` reports."""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import RunningStage
from torch.utils.data import DataLoader

from attnzoo.training import LanguageModelTask
from attnzoo.training.callbacks import ThroughputMonitor, batch_tokens
from attnzoo.training.classification import ClassificationTask

VOCAB = 11


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


def _lm_batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    batches = []
    for B, T, ignored in ((3, 9, 5), (1, 4, 1)):  # 22 and 3 labelled tokens: very different weights
        input_ids = torch.randint(0, VOCAB, (B, T), generator=gen)
        labels = torch.randint(0, VOCAB, (B, T), generator=gen)
        labels.view(-1)[torch.randperm(B * T, generator=gen)[:ignored]] = -100
        batches.append({"input_ids": input_ids, "labels": labels})
    return batches


def test_lm_perplexity_is_exp_of_the_token_weighted_mean_loss():
    torch.manual_seed(0)
    task = LanguageModelTask(
        model={"name": "gpt", "vocab_size": VOCAB, "max_seq_len": 16, "dim": 16, "depth": 1, "num_heads": 2}
        | {"attention": "softmax"}
    )
    batches = _lm_batches()
    (result,) = _trainer().validate(task, dataloaders=DataLoader(batches, batch_size=None), verbose=False)

    task.eval()
    nll, correct, tokens, batch_ppl = 0.0, 0, 0, []
    with torch.no_grad():
        for batch in batches:
            logits = task.model(batch["input_ids"]).double()
            labels = batch["labels"]
            keep = labels != -100
            losses = F.cross_entropy(logits[keep], labels[keep], reduction="none")
            nll += float(losses.sum())
            tokens += int(keep.sum())
            correct += int((logits[keep].argmax(-1) == labels[keep]).sum())
            batch_ppl.append(math.exp(float(losses.mean())))
    ppl = math.exp(nll / tokens)
    assert math.isclose(result["val/ppl"], ppl, rel_tol=1e-5)
    assert math.isclose(result["val/loss"], nll / tokens, rel_tol=1e-5)
    assert math.isclose(result["val/acc"], correct / tokens, rel_tol=1e-6)
    # the per-batch mean of exp(loss) is a different number on these batches, so the check above can fail
    assert abs(sum(batch_ppl) / len(batch_ppl) - ppl) > 1e-3 * ppl


def test_classification_accuracy_and_top_k_over_uneven_batches():
    torch.manual_seed(0)
    classes = 7
    task = ClassificationTask(
        model={"name": "encoder", "vocab_size": VOCAB, "num_classes": classes, "max_seq_len": 8, "dim": 16}
        | {"depth": 1, "num_heads": 2, "attention": "softmax"},
        top_k=3,
    )
    gen = torch.Generator().manual_seed(1)
    batches = [
        {
            "inputs": torch.randint(0, VOCAB, (B, 8), generator=gen),
            "labels": torch.randint(0, classes, (B,), generator=gen),
        }
        for B in (13, 2)
    ]
    (result,) = _trainer().test(task, dataloaders=DataLoader(batches, batch_size=None), verbose=False)

    task.eval()
    with torch.no_grad():
        logits = torch.cat([task(b["inputs"]) for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    top1 = float((logits.argmax(-1) == labels).double().mean())
    top3 = float((logits.topk(3, dim=-1).indices == labels[:, None]).any(-1).double().mean())
    assert math.isclose(result["test/acc"], top1, rel_tol=1e-6)
    assert math.isclose(result["test/top3_acc"], top3, rel_tol=1e-6)
    assert top3 > top1  # otherwise the two checks could not tell k apart


def test_throughput_counts_tokens_of_token_batches_and_examples_of_images():
    assert batch_tokens({"input_ids": torch.zeros(3, 5, dtype=torch.long), "labels": torch.zeros(3, 5)}) == 15
    assert batch_tokens({"inputs": torch.zeros(4, 1, 8, 8), "labels": torch.zeros(4, dtype=torch.long)}) == 4

    torch.manual_seed(0)
    task = LanguageModelTask(
        model={"name": "gpt", "vocab_size": VOCAB, "max_seq_len": 16, "dim": 16, "depth": 1, "num_heads": 2}
        | {"attention": "softmax"},
        scheduler={"name": "constant"},
    )
    monitor = ThroughputMonitor(window_size=2)
    batches = _lm_batches()
    _trainer(max_epochs=2, callbacks=[monitor], enable_checkpointing=False).fit(
        task, train_dataloaders=DataLoader(batches, batch_size=None)
    )
    totals = monitor._throughputs[RunningStage.TRAINING].compute()
    assert totals["lengths"] == 2 * (27 + 4)  # every token of both batches, twice
    assert monitor.tokens_per_second == totals["lengths"] / totals["time"] > 0
