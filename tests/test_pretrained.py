"""save_pretrained / from_pretrained (huggingface_hub's PyTorchModelHubMixin): config.json + model.safetensors, offline,
bit-exact round trips with per-layer attention lists and options."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from attnzoo.models import GPT, Encoder, ViT, load_weights, save_weights

HYBRID = [{"name": "gla", "expand_k": 0.5, "use_short_conv": True}, "softmax", {"name": "mamba", "d_state": 8}]


def _assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def test_gpt_round_trip_is_bit_exact_with_per_layer_attention(tmp_path):
    torch.manual_seed(0)
    model = GPT(61, dim=32, depth=3, num_heads=4, attention=HYBRID, positions="learned", max_seq_len=64).eval()
    model.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["attention"] == HYBRID and config["vocab_size"] == 61 and config["positions"] == "learned"
    assert "device" not in config and "dtype" not in config
    loaded = GPT.from_pretrained(tmp_path)
    assert not loaded.training
    _assert_same_model(model, loaded)
    assert loaded.head.weight is loaded.tok_emb.weight  # tying survives the single stored copy
    idx = torch.randint(0, 61, (2, 11))
    assert torch.equal(model(idx), loaded(idx))
    assert torch.equal(model.generate(idx[:, :3], 5, temperature=0), loaded.generate(idx[:, :3], 5, temperature=0))


def test_encoder_round_trip_from_an_omegaconf_spec(tmp_path):
    attention = OmegaConf.create([{"name": "performer", "nb_features": 16}, "softmax"])
    torch.manual_seed(0)
    model = Encoder(40, 3, dim=32, depth=2, num_heads=4, attention=attention, pool="mean", positions="rope").eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["attention"] == [{"name": "performer", "nb_features": 16}, "softmax"]
    loaded = Encoder.from_pretrained(str(tmp_path))
    _assert_same_model(model, loaded)
    idx = torch.randint(0, 40, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False
    assert torch.equal(model(idx, padding_mask=mask), loaded(idx, padding_mask=mask))


def test_vit_round_trip_keeps_timm_keywords(tmp_path):
    torch.manual_seed(0)
    model = ViT(16, 4, 1, 7, embed_dim=32, depth=2, num_heads=4, attention=["agent", "gla"], global_pool="avg").eval()
    model.save_pretrained(tmp_path)
    loaded = ViT.from_pretrained(tmp_path)
    _assert_same_model(model, loaded)
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(model(x), loaded(x))


def test_from_pretrained_builds_in_the_requested_dtype(tmp_path):
    torch.manual_seed(0)
    GPT(30, dim=32, depth=1, num_heads=4, attention="mamba").save_pretrained(tmp_path)
    loaded = GPT.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.tok_emb.weight.dtype == torch.bfloat16
    assert loaded.blocks[0].attn.A_log.dtype == torch.float32


def test_run_dir_weights_without_config_give_a_clear_error(tmp_path):
    model = GPT(30, dim=32, depth=1, num_heads=4)
    save_weights(model, tmp_path / "model.safetensors")  # what a training run writes
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        GPT.from_pretrained(tmp_path)
    # the same file format: it loads into a model built from the run's config
    other = load_weights(GPT(30, dim=32, depth=1, num_heads=4), tmp_path / "model.safetensors")
    _assert_same_model(model, other)


def test_wrong_config_weights_mismatch_raise(tmp_path):
    GPT(30, dim=32, depth=1, num_heads=4).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not match GPT"):
        GPT.from_pretrained(tmp_path, depth=2)


def test_unsavable_constructor_argument_is_an_error_not_a_silent_drop(tmp_path):
    model = ViT(16, 4, 3, 5, embed_dim=32, depth=1, num_heads=4, norm_layer=torch.nn.LayerNorm)
    with pytest.raises(ValueError, match="norm_layer"):
        model.save_pretrained(tmp_path)
