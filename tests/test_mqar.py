"""MQAR generator and DataModule: Zoology's semantics (label positions, key/value ranges), determinism, disjoint
splits, and the config-hash cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnzoo.data import MQARDataModule, build_datamodule, cache_path, cached_tensors, generate_mqar
from attnzoo.data.mqar import SPLITS, split_seed

SMALL = dict(vocab_size=64, input_seq_len=32, num_kv_pairs=4, num_examples=200)


@pytest.mark.parametrize("random_non_queries", [True, False], ids=["random_fill", "zero_fill"])
def test_labels_sit_on_queries_and_name_the_bound_value(random_non_queries):
    V, T, P = 64, 32, 4
    d = generate_mqar(**SMALL, random_non_queries=random_non_queries, seed=3)
    x, y = d["input_ids"], d["labels"]
    assert x.shape == y.shape == (200, T) and x.dtype == y.dtype == torch.long
    context = x[:, : 2 * P]
    keys, values = context[:, 0::2], context[:, 1::2]
    assert ((keys >= 1) & (keys < V // 2)).all(), "keys come from [1, vocab/2)"
    assert ((values >= V // 2) & (values < V)).all(), "values come from [vocab/2, vocab)"
    assert all(len(set(row.tolist())) == P for row in keys), "keys are distinct within a sequence"
    assert ((x >= 0) & (x < V)).all()
    labelled = y != -100
    assert (labelled.sum(1) == P).all(), "every key is queried exactly once"
    assert not labelled[:, : 2 * P].any(), "no label inside the key-value block"
    for n in range(len(x)):
        binding = dict(zip(keys[n].tolist(), values[n].tolist()))
        positions = labelled[n].nonzero().flatten()
        assert ((positions - 2 * P) % 2 == 0).all(), "queries sit at even offsets after the context (Zoology)"
        queried = x[n, positions].tolist()
        assert sorted(queried) == sorted(binding), "the queried tokens are exactly the keys"
        assert y[n, positions].tolist() == [binding[k] for k in queried], "label = the value bound to the key"
    if not random_non_queries:  # the filler is 0 everywhere else
        filler = torch.ones_like(labelled)
        filler[:, : 2 * P] = False
        filler &= ~labelled
        assert (x[filler] == 0).all()


def test_power_law_puts_queries_near_the_context():
    near = generate_mqar(**SMALL, power_a=0.01, random_non_queries=False, seed=0)["labels"]
    uniform = generate_mqar(**SMALL, power_a=1.0, random_non_queries=False, seed=0)["labels"]

    def mean_query_pos(y):
        return (y != -100).nonzero()[:, 1].float().mean()

    assert mean_query_pos(near) < mean_query_pos(uniform) - 1.0


def test_determinism_and_seed_sensitivity():
    a = generate_mqar(**SMALL, seed=7)
    b = generate_mqar(**SMALL, seed=7)
    c = generate_mqar(**SMALL, seed=8)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["input_ids"], c["input_ids"])


def test_splits_are_disjoint(tmp_path):
    dm = MQARDataModule(
        vocab_size=64,
        input_seq_len=32,
        num_kv_pairs=4,
        num_examples={"train": 500, "val": 100, "test": 100},
        data_dir=tmp_path,
    )
    dm.setup()
    rows = {s: {tuple(r) for r in dm.splits[s].tensors["input_ids"].tolist()} for s in SPLITS}
    assert not rows["train"] & rows["test"] and not rows["train"] & rows["val"] and not rows["val"] & rows["test"]
    seeds = [split_seed(0, s).generate_state(4).tolist() for s in SPLITS]
    assert len({tuple(s) for s in seeds}) == 3, "each split has its own seed stream"


def test_cache_hit_skips_generation(tmp_path):
    config = {"kind": "test", "seed": 1}
    calls = []

    def make():
        calls.append(1)
        return {"x": torch.arange(5)}

    first = cached_tensors("mqar", config, make, tmp_path)
    second = cached_tensors("mqar", dict(reversed(list(config.items()))), make, tmp_path)  # key order is irrelevant
    assert calls == [1] and torch.equal(first["x"], second["x"])
    path = cache_path("mqar", config, tmp_path)
    assert path.is_file() and path.parent.parent == tmp_path, "cached under data_dir, not inside the package"
    other = cache_path("mqar", {**config, "seed": 2}, tmp_path)
    assert other != path


def test_datamodule_caches_and_batches(tmp_path):
    kw = dict(vocab_size=64, input_seq_len=32, num_kv_pairs=4, num_examples={"train": 64, "val": 16, "test": 16})
    dm = MQARDataModule(**kw, batch_size=8, data_dir=tmp_path)
    dm.prepare_data()
    assert len(list((tmp_path / "mqar").glob("*.pt"))) == 3
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == (8, 32)
    assert dm.model_kwargs() == {"vocab_size": 64, "max_seq_len": 32}
    again = MQARDataModule(**kw, batch_size=8, data_dir=tmp_path)
    again.setup()
    assert torch.equal(again.splits["test"].tensors["labels"], dm.splits["test"].tensors["labels"])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(input_seq_len=31), "even"),
        (dict(num_kv_pairs=9), "num_kv_pairs"),
        (dict(vocab_size=32), "vocab_size"),
        (dict(power_a=0.0), "power_a"),
    ],
)
def test_bad_generator_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_mqar(**{**SMALL, **kwargs})


def test_build_datamodule_errors():
    with pytest.raises(ValueError, match=r"unknown data set 'mqr'\. Did you mean 'mqar'\?"):
        build_datamodule({"name": "mqr"})
    with pytest.raises(TypeError, match=r"Did you mean 'num_kv_pairs'"):
        build_datamodule({"name": "mqar", "num_kv_pair": 4})


def test_gumbel_top_k_matches_sequential_sampling_marginals():
    """The vectorised weighted draw without replacement has numpy's first-draw distribution."""
    from attnzoo.data.mqar import _choose_without_replacement

    rng = np.random.default_rng(0)
    log_p = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    first = _choose_without_replacement(rng, 40000, 4, 2, log_p)[:, 0]
    freq = np.bincount(first, minlength=4) / len(first)
    np.testing.assert_allclose(freq, np.exp(log_p), atol=0.01)
