"""ListOps data (LRA generator semantics): labels equal the expressions' values, lengths, splits, batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnzoo.data.listops import END, OPERATORS, VOCAB, ListOpsDataModule, decode, generate_listops


def evaluate_tokens(tokens: list[str]) -> int:
    """An independent evaluator: a stack machine over the prefix tokens (no use of the generator's trees)."""
    stack: list[list] = []
    result = None
    for tok in tokens:
        if tok in OPERATORS:
            stack.append([tok])
        elif tok == END:
            op, *args = stack.pop()
            value = {
                "[MIN": min(args),
                "[MAX": max(args),
                "[MED": int(np.median(args)),
                "[SM": sum(args) % 10,
            }[op]
            if stack:
                stack[-1].append(value)
            else:
                result = value
        else:
            assert stack or len(tokens) == 1, "a bare value inside a larger expression must have an operator"
            if stack:
                stack[-1].append(int(tok))
            else:
                result = int(tok)
    assert not stack, "unbalanced expression"
    return result


def test_labels_equal_evaluated_values_and_lengths_respected():
    examples = generate_listops(300, min_length=10, max_length=60, max_depth=5, max_args=4, seed=1)
    for tokens, label in examples:
        assert 10 < len(tokens) < 60
        assert label == evaluate_tokens(tokens)
        assert 0 <= label <= 9
        ops = [t for t in tokens if t in OPERATORS]
        assert ops and len(ops) == tokens.count(END)  # well-formed: one closing bracket per operator
    assert len({tuple(t) for t, _ in examples}) == len(examples)  # deduplicated
    # every operator and many labels occur
    assert {t for toks, _ in examples for t in toks if t in OPERATORS} == set(OPERATORS)
    assert len({y for _, y in examples}) >= 8


def test_median_truncates_like_lra():
    assert evaluate_tokens(["[MED", "1", "2", END]) == 1  # int(np.median([1, 2])) == int(1.5)
    assert evaluate_tokens(["[SM", "9", "8", END]) == 7


def test_generation_is_seeded():
    kw = dict(min_length=5, max_length=40, max_depth=4, max_args=4)
    assert generate_listops(20, seed=3, **kw) == generate_listops(20, seed=3, **kw)
    assert generate_listops(20, seed=3, **kw) != generate_listops(20, seed=4, **kw)


def test_datamodule_batches_splits_and_cache(tmp_path):
    kw = dict(min_length=8, max_length=48, max_depth=4, max_args=4, data_dir=tmp_path, batch_size=16)
    dm = ListOpsDataModule(num_examples={"train": 200, "val": 40, "test": 40}, **kw)
    dm.setup()
    assert dm.model_kwargs() == {"vocab_size": len(VOCAB), "num_classes": 10, "max_seq_len": 48}
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"].dtype == torch.long and batch["padding_mask"].dtype == torch.bool
    assert batch["inputs"].shape == batch["padding_mask"].shape
    assert batch["inputs"].shape[1] == int(batch["padding_mask"].sum(1).max())  # cut to the longest
    assert torch.all(batch["inputs"][~batch["padding_mask"]] == 0)
    for row, mask, label in zip(batch["inputs"], batch["padding_mask"], batch["labels"]):
        assert evaluate_tokens(decode(row[mask])) == int(label)
    rows = {s: {tuple(decode(r)) for r in dm.splits[s].tokens} for s in ("train", "val", "test")}
    assert not rows["train"] & rows["val"] and not rows["train"] & rows["test"] and not rows["val"] & rows["test"]
    assert list(tmp_path.glob("listops/*.pt"))  # cached under data_dir, not in the package
    again = ListOpsDataModule(num_examples={"train": 200, "val": 40, "test": 40}, **kw)
    again.setup()
    assert torch.equal(again.splits["test"].tokens, dm.splits["test"].tokens)
    assert 0 < dm.majority_baseline() < 0.5


def test_impossible_constraints_raise():
    with pytest.raises(ValueError, match="min_length"):
        ListOpsDataModule(min_length=50, max_length=40)
    with pytest.raises(ValueError, match="widen the length range"):
        generate_listops(5, min_length=100, max_length=200, max_depth=2, max_args=2, seed=0, max_tries=500)


def test_experiment_listops_fast_dev_run(tmp_path, data_dir):
    import json

    from conftest import compose_train, shrink
    from omegaconf import open_dict

    from attnzoo.training import run

    cfg = shrink(compose_train(["experiment=listops", "debug=fast"]), tmp_path, data_dir)
    with open_dict(cfg):
        cfg.data.num_examples = {"train": 64, "val": 16, "test": 16}
        cfg.data.max_length = 64
        cfg.data.batch_size = 16
    run(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"] == "encoder" and "test/acc" in summary["test_metrics"]
