"""The encoder-decoder (models/seq2seq.py), its generated tasks (data/seq2seq.py) and its training task
(training/seq2seq.py): an explicit float64 oracle of the whole model, padding and causality, cached generation against
recomputation, data determinism and correctness, the config, and a short training run that learns."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_train, shrink
from omegaconf import open_dict

from attnzoo.data import DATAMODULES, build_datamodule
from attnzoo.data.seq2seq import BOS, EOS, IGNORE_INDEX, PAD, Seq2SeqDataModule, generate_seq2seq
from attnzoo.models import MODELS, Seq2Seq
from attnzoo.training import TASKS, Seq2SeqTask, run

REPO = Path(__file__).resolve().parents[1]
VOCAB = 12


def _model(seed: int = 0, **kwargs) -> Seq2Seq:
    torch.manual_seed(seed)
    options = dict(dim=16, depth=2, encoder_depth=2, num_heads=2, max_seq_len=16, dtype=torch.float64)
    return Seq2Seq(VOCAB, **{**options, **kwargs}).eval()


def _tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------------------
# the model against an explicit float64 oracle


def _oracle_attention(x, keys, layer, *, causal, key_mask=None):
    """Multi-head softmax attention written out with the layer's weights: softmax(q k^T / sqrt(D) + mask) v."""
    H = layer.num_heads
    if layer.cross:
        q, (k, v) = layer.q(x), layer.kv(keys).chunk(2, dim=-1)
    else:
        q, k, v = layer.qkv(x).chunk(3, dim=-1)

    def heads(t):  # (B, T, dim) -> (B, H, T, D)
        return t.view(t.shape[0], t.shape[1], H, -1).transpose(1, 2)

    q, k, v = heads(q), heads(k), heads(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    allowed = torch.ones(scores.shape[-2:], dtype=torch.bool)
    if causal:
        allowed = torch.tril(allowed)
    allowed = allowed[None, None] if key_mask is None else allowed[None, None] & key_mask[:, None, None, :]
    o = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v  # (B, H, T, D)
    return layer.proj(o.transpose(1, 2).reshape(x.shape))


def _oracle_forward(model, src, tgt, src_mask):
    def norm(module, x):
        return F.layer_norm(x, x.shape[-1:], module.weight, module.bias, module.eps)

    def mlp(module, x):
        return module.fc2(F.gelu(module.fc1(x)))

    x = model.tok_emb.weight[src] + model.src_pos_emb.weight[: src.shape[1]]
    for block in model.encoder:
        x = x + _oracle_attention(norm(block.norm1, x), None, block.attn, causal=False, key_mask=src_mask)
        x = x + mlp(block.mlp, norm(block.norm2, x))
    memory = norm(model.encoder_norm, x)
    h = model.tok_emb.weight[tgt] + model.tgt_pos_emb.weight[: tgt.shape[1]]
    for block in model.decoder:
        h = h + _oracle_attention(norm(block.norm1, h), None, block.attn, causal=True)
        h = h + _oracle_attention(norm(block.norm2, h), memory, block.cross_attn, causal=False, key_mask=src_mask)
        h = h + mlp(block.mlp, norm(block.norm3, h))
    return norm(model.norm, h) @ model.tok_emb.weight.T  # the tied head


def test_forward_equals_explicit_oracle():
    model = _model(attention={"name": "softmax", "rope": False})
    src, tgt = _tokens(3, 7), _tokens(3, 5, seed=2)
    src_mask = torch.arange(7)[None] < torch.tensor([[7], [4], [1]])
    got = model(src, tgt, src_padding_mask=src_mask)
    with torch.no_grad():
        ref = _oracle_forward(model, src, tgt, src_mask)
    assert got.shape == (3, 5, VOCAB)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_backward_reaches_every_parameter_and_head_is_tied():
    model = _model(dtype=torch.float32).train()
    logits = model(_tokens(2, 6), _tokens(2, 4))
    logits.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert model.head.weight is model.tok_emb.weight


# ------------------------------------------------------------------------------------------------------------------
# padding, causality, cross attention


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"encoder_attention": "gla", "cross_attention": "linear"},
        {"encoder_attention": "mamba", "attention": "gla", "cross_attention": ["performer", "softmax"]},
    ],
    ids=["softmax", "gla-enc_linear-cross", "mamba-enc_performer-softmax-cross"],
)
def test_source_padding_changes_nothing(options):
    """Extra padded source positions (random tokens, masked out) leave every logit unchanged."""
    model = _model(**options)
    src, tgt = _tokens(2, 5), _tokens(2, 4, seed=2)
    ref = model(src, tgt)
    padded = torch.cat([src, _tokens(2, 3, seed=3)], dim=1)  # (2, 8): 3 junk positions at the end
    mask = torch.arange(8)[None].expand(2, -1) < 5
    torch.testing.assert_close(model(padded, tgt, src_padding_mask=mask), ref, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(model(padded, tgt), ref)  # the same junk without the mask does change them


def test_decoder_is_causal_and_target_padding_changes_nothing():
    model = _model(attention="gla")
    src, tgt = _tokens(2, 6), _tokens(2, 5, seed=2)
    ref = model(src, tgt)
    changed = tgt.clone()
    changed[:, 3:] = _tokens(2, 2, seed=4)
    torch.testing.assert_close(model(src, changed)[:, :3], ref[:, :3], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(model(src, changed)[:, 3:], ref[:, 3:])
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    torch.testing.assert_close(model(src, tgt, tgt_padding_mask=mask)[1, :3], ref[1, :3], rtol=1e-10, atol=1e-10)


def test_the_decoder_reads_the_source():
    model = _model()
    tgt = _tokens(2, 4, seed=2)
    assert not torch.allclose(model(_tokens(2, 6), tgt), model(_tokens(2, 6, seed=5), tgt))


# ------------------------------------------------------------------------------------------------------------------
# cached generation


@pytest.mark.parametrize(
    "attention",
    ["softmax", "gla", pytest.param("mamba", marks=pytest.mark.slow)],  # mamba: ~10 s in float64
)
def test_cached_decoding_equals_full_decoder(attention):
    """Step-by-step decoding with each layer's cache gives the logits of one full decoder pass, and greedy generation
    with the cache the tokens of generation that recomputes the whole decoder every step."""
    model = _model(attention=attention, cross_attention=["softmax", "linear"], eos_token_id=None)
    src = _tokens(3, 7)
    src_mask = torch.arange(7)[None] < torch.tensor([[7], [5], [2]])
    with_cache = model.generate(src, 8, temperature=0, src_padding_mask=src_mask)
    without = model.generate(src, 8, temperature=0, src_padding_mask=src_mask, use_cache=False)
    assert with_cache.shape == (3, 9) and (with_cache[:, 0] == BOS).all()
    torch.testing.assert_close(with_cache, without, rtol=0, atol=0)

    memory = model.encode(src, src_mask)
    full = model.decode(with_cache, memory, src_padding_mask=src_mask)
    caches = model.new_caches(3)
    steps = [model.decode(with_cache[:, :3], memory, src_padding_mask=src_mask, caches=caches)]  # a 3-token prefill
    steps += [
        model.decode(with_cache[:, t : t + 1], memory, src_padding_mask=src_mask, caches=caches, offset=t)
        for t in range(3, 9)
    ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-9, atol=1e-9)


def test_generation_stops_at_the_end_token_and_pads_after_it():
    model = _model(eos_token_id=None)
    src = _tokens(4, 6)
    free = model.generate(src, 10, temperature=0)  # (4, 11), no end token
    model.eos_token_id = int(free[0, 3])  # the token row 0 writes third becomes the end token
    out = model.generate(src, 10, temperature=0)
    for row, ref in zip(out.tolist(), free.tolist()):
        eos = model.eos_token_id
        end = ref.index(eos, 1) if eos in ref[1:] else len(ref) - 1
        assert row[: end + 1] == ref[: end + 1]  # identical up to and including the first end token
        assert all(t == model.pad_token_id for t in row[end + 1 :]), row
    ends = [r.index(model.eos_token_id, 1) if model.eos_token_id in r[1:] else 10 for r in free.tolist()]
    assert out.shape[1] == 1 + max(ends)  # stops once every row has ended


def test_sampling_options_and_errors():
    model = _model()
    torch.manual_seed(0)
    sampled = model.generate(_tokens(2, 5), 4, temperature=1.0, top_k=3)
    assert sampled.shape[0] == 2 and ((sampled >= 0) & (sampled < VOCAB)).all()
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        model.generate(_tokens(2, 5), 4, temperature=-1)
    with pytest.raises(ValueError, match="rope=True"):
        _model(cross_attention={"name": "softmax", "rope": True})
    with pytest.raises(ValueError, match=r"gla .*has no pattern 'noncausal_cross'"):
        _model(cross_attention="gla")
    with pytest.raises(ValueError, match="longer than max_seq_len=16"):
        model(_tokens(1, 17), _tokens(1, 3))
    with pytest.raises(ValueError, match="src_padding_mask must be bool of shape"):
        model(_tokens(1, 4), _tokens(1, 3), src_padding_mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="per-layer attention has 3 entries"):
        _model(attention=["softmax"] * 3)


def test_save_and_load_pretrained(tmp_path):
    model = _model(encoder_attention="gla", cross_attention=["linear", "softmax"], dtype=torch.float32)
    model.save_pretrained(tmp_path / "s2s")
    loaded = Seq2Seq.from_pretrained(tmp_path / "s2s")
    src, tgt = _tokens(2, 5), _tokens(2, 3)
    torch.testing.assert_close(loaded(src, tgt), model(src, tgt))


# ------------------------------------------------------------------------------------------------------------------
# data


def _reference_target(task: str, source: list[int], offset: int) -> list[int]:
    if task == "reverse":
        return source[::-1]
    if task == "sort":
        return sorted(source)
    return [source[(j + offset) % len(source)] for j in range(len(source))]


@pytest.mark.parametrize("task", ["reverse", "sort", "copy_offset"])
def test_generated_pairs_match_a_per_row_reference(task):
    data = generate_seq2seq(task=task, vocab_size=10, min_length=1, max_length=9, offset=3, num_examples=200, seed=7)
    lengths = data["src_padding_mask"].sum(1)
    assert lengths.min() >= 1 and lengths.max() <= 9 and len(set(lengths.tolist())) > 5  # variable lengths
    for i in range(200):
        L = int(lengths[i])
        source = data["src_ids"][i, :L].tolist()
        assert all(3 <= t < 10 for t in source) and (data["src_ids"][i, L:] == PAD).all()
        target = _reference_target(task, source, 3)
        assert data["input_ids"][i].tolist() == [BOS, *target] + [PAD] * (9 - L)
        assert data["labels"][i].tolist() == [*target, EOS] + [IGNORE_INDEX] * (9 - L)
        assert data["padding_mask"][i].tolist() == [True] * (L + 1) + [False] * (9 - L)


def test_data_is_deterministic_cached_and_splits_differ(tmp_path):
    def module(**kw):
        return Seq2SeqDataModule(num_examples={"train": 50, "val": 20, "test": 20}, data_dir=tmp_path, **kw)

    first, second = module(), module()
    first.setup(), second.setup()
    for split in ("train", "val", "test"):
        for key, value in first.splits[split].tensors.items():
            torch.testing.assert_close(second.splits[split].tensors[key], value)
    assert len(list((tmp_path / "seq2seq").glob("*.pt"))) == 3  # one cached file per split, reused by the second
    val, test = first.splits["val"].tensors["src_ids"], first.splits["test"].tensors["src_ids"]
    assert not torch.equal(val, test)
    other = module(seed=1)
    other.setup()
    assert not torch.equal(other.splits["val"].tensors["src_ids"], val)
    batch = next(iter(first.train_dataloader()))
    assert set(batch) == {"src_ids", "src_padding_mask", "input_ids", "padding_mask", "labels"}
    assert first.model_kwargs() == {
        "vocab_size": 16,
        "max_seq_len": 17,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
    }


def test_data_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"unknown task 'revers'\. Did you mean 'reverse'"):
        Seq2SeqDataModule(task="revers")
    with pytest.raises(ValueError, match="min_length <= max_length"):
        Seq2SeqDataModule(min_length=8, max_length=4)
    with pytest.raises(ValueError, match="vocab_size>=5"):
        Seq2SeqDataModule(vocab_size=4)


# ------------------------------------------------------------------------------------------------------------------
# registration, config and training


def test_registered_everywhere():
    assert MODELS["seq2seq"] is Seq2Seq and TASKS[Seq2Seq.task] is Seq2SeqTask
    assert DATAMODULES["seq2seq"] is Seq2SeqDataModule


def test_experiment_composes_and_validates(tmp_path, data_dir):
    from attnzoo.training.run import model_config
    from attnzoo.training.validate import validate_config

    cfg = shrink(
        compose_train(["experiment=seq2seq", "model.cross_attention=linear", "attention=gla"]), tmp_path, data_dir
    )
    validate_config(cfg)
    datamodule = build_datamodule(cfg.data)
    model_cfg = model_config(cfg, datamodule)
    model = Seq2SeqTask(model_cfg).model
    assert model.vocab_size == 16 and model.max_seq_len == 17 and model.eos_token_id == EOS
    assert [type(b.attn).name for b in model.encoder] == ["gla", "gla"]
    assert [type(b.attn).name for b in model.decoder] == ["gla", "gla"]
    assert [type(b.cross_attn).name for b in model.decoder] == ["linear", "linear"]


def test_short_training_run_lowers_the_loss(tmp_path, data_dir):
    """Three epochs on 512 reversal pairs: the test loss ends well below the uniform-guess loss log(16)."""
    cfg = shrink(compose_train(["experiment=seq2seq"]), tmp_path, data_dir)
    with open_dict(cfg):
        cfg.data.num_examples = {"train": 512, "val": 64, "test": 64}
        cfg.data.max_length = 8
        cfg.data.batch_size = 32
        cfg.trainer.max_epochs = 3
        cfg.callbacks = None
        cfg.logger = None
    run(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    metrics = summary["test_metrics"]
    assert metrics["test/loss"] < 0.8 * math.log(16), metrics
    assert {"test/acc", "test/seq_acc", "test/exact_match", "test/ppl"} <= set(metrics)


@pytest.mark.slow
def test_cli_fast_dev_run(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            "experiment=seq2seq",
            "debug=fast",
            "model.cross_attention=performer",
            f"paths.output_dir={tmp_path}",
            f"paths.data_dir={tmp_path / 'data'}",
            "data.num_examples={train:64,val:16,test:16}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["model"] == "seq2seq"
