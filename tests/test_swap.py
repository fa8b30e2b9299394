"""swap_attention on randomly initialised timm models (no hub downloads): exactness for softmax, transfer report for
every other noncausal_self layer (issue 6, item 2)."""

from __future__ import annotations

import pytest
import timm
import torch

from attnzoo.layers import Attention, list_attention
from attnzoo.models.swap import swap_attention

SMALL = dict(img_size=16, patch_size=4, in_chans=3, num_classes=7, embed_dim=32, depth=2, num_heads=4)


def timm_vit(**kw):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**SMALL, **kw}).double().eval()
    # non-zero biases and norms, so that a transfer that misses them shows
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
def test_swap_to_softmax_reproduces_outputs(qk_norm):
    model = timm_vit(qk_norm=qk_norm)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ref = model(x)
    report = swap_attention(model, "softmax")
    assert report.modules == ["blocks.0.attn", "blocks.1.attn"]
    assert report.new == [] and report.dropped == []
    assert all(isinstance(b.attn, Attention) for b in model.blocks)
    torch.testing.assert_close(model(x), ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", list_attention("noncausal_self"))
def test_swap_reports_transferred_and_new(name):
    model = timm_vit(depth=1)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    report = swap_attention(model, name)
    params = dict(model.named_parameters())
    assert set(report.transferred) | set(report.new) == {n for n in params if ".attn." in n}
    assert not set(report.transferred) & set(report.new)
    # everything outside the attention keeps its values (norms, MLPs, embeddings, head)
    for key, value in model.state_dict().items():
        if ".attn." not in key:
            torch.testing.assert_close(value, original[key], atol=0, rtol=0)
    # a transferred q projection equals the first third of timm's fused qkv ([q | k | v] rows)
    for n in report.transferred:
        block, local = n.split(".attn.")
        module, param = local.rsplit(".", 1)
        if module in ("q", "q_proj", "to_q"):
            torch.testing.assert_close(params[n].detach(), original[f"{block}.attn.qkv.{param}"].chunk(3)[0])
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    assert torch.isfinite(model(x)).all()


def test_swap_q_k_v_split_layers_receive_slices():
    """A layer with separate q/k/v projections gets timm's fused qkv split in [q | k | v] order."""
    names = [n for n in list_attention("noncausal_self") if n == "linear"]
    if not names:
        pytest.skip("no registered layer with q_proj/k_proj/v_proj")
    model = timm_vit()
    qkv_w = model.blocks[0].attn.qkv.weight.detach().clone()
    proj_w = model.blocks[0].attn.proj.weight.detach().clone()
    report = swap_attention(model, names[0])
    attn = model.blocks[0].attn
    torch.testing.assert_close(attn.q_proj.weight.detach(), qkv_w[:32])
    torch.testing.assert_close(attn.k_proj.weight.detach(), qkv_w[32:64])
    torch.testing.assert_close(attn.v_proj.weight.detach(), qkv_w[64:])
    torch.testing.assert_close(attn.o_proj.weight.detach(), proj_w)
    assert "blocks.0.attn.q_proj.weight" in report.transferred


def test_swap_errors():
    with pytest.raises(ValueError, match="no timm Attention"):
        swap_attention(torch.nn.Sequential(torch.nn.Linear(2, 2)), "softmax")
    with pytest.raises(ValueError, match="unknown attention"):
        swap_attention(timm_vit(), "sofmax")
    with pytest.raises(TypeError, match="Did you mean 'qk_norm'"):
        swap_attention(timm_vit(), "softmax", qk_nrm=True)
