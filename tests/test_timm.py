"""attnzoo_vit_* registered with timm: timm.create_model with zoo attention, timm's cfg and head/feature conventions."""

from __future__ import annotations

import pytest
import timm
import torch

import attnzoo.models  # noqa: F401  registers the models
from attnzoo.models import ViT

NAMES = ["attnzoo_vit_base_patch16_224", "attnzoo_vit_digits_patch2_8", "attnzoo_vit_small_patch16_224"]
NAMES.append("attnzoo_vit_tiny_patch16_224")


def test_all_variants_are_listed():
    assert sorted(timm.list_models("attnzoo_*")) == sorted(NAMES)


def test_create_model_with_zoo_attention_and_num_classes():
    model = timm.create_model("attnzoo_vit_tiny_patch16_224", attention="gla", num_classes=10, device="meta")
    assert isinstance(model, ViT) and model.num_classes == 10
    assert model.attention_names == ["gla"] * 12
    assert model.embed_dim == 192 and len(model.blocks) == 12
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["num_classes"] == 1000 and len(cfg["mean"]) == 3
    assert model.default_cfg is model.pretrained_cfg or model.default_cfg == model.pretrained_cfg


@pytest.mark.parametrize(("name", "width", "heads"), [("small", 384, 6), ("base", 768, 12)])
def test_widths_follow_timm(name, width, heads):
    model = timm.create_model(f"attnzoo_vit_{name}_patch16_224", attention="performer", device="meta")
    assert model.embed_dim == width and model.blocks[0].attn.num_heads == heads
    assert model.head.out_features == 1000


def test_digits_variant_forward_features_head_and_reset():
    torch.manual_seed(0)
    model = timm.create_model("attnzoo_vit_digits_patch2_8", attention=["gla", "softmax", "mamba", "agent"]).eval()
    assert model.pretrained_cfg["input_size"] == (1, 8, 8) and model.num_classes == 10
    x = torch.randn(2, 1, 8, 8)
    features = model.forward_features(x)
    assert features.shape == (2, 1 + 16, 64)  # class token + the 4x4 patch grid
    assert torch.equal(model.forward_head(features), model(x))
    assert model.forward_head(features, pre_logits=True).shape == (2, 64)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    assert {"pos_embed", "cls_token"} <= set(model.no_weight_decay())


def test_in_chans_override_and_features_only():
    model = timm.create_model("attnzoo_vit_digits_patch2_8", in_chans=3, attention="linear")
    assert model.patch_embed.proj.in_channels == 3
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 10)
    features = timm.create_model("attnzoo_vit_digits_patch2_8", features_only=True, out_indices=(1, 3))
    maps = features(torch.randn(2, 1, 8, 8))
    assert [tuple(m.shape) for m in maps] == [(2, 64, 4, 4)] * 2
    assert features.feature_info.channels() == [64, 64]


def test_pretrained_true_is_a_clear_error():
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("attnzoo_vit_digits_patch2_8", pretrained=True)


def test_unknown_attention_option_still_raises_through_timm():
    with pytest.raises(TypeError, match="nb_featurez"):
        timm.create_model("attnzoo_vit_digits_patch2_8", attention={"name": "performer", "nb_featurez": 8})
