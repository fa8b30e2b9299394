"""ViT: timm's VisionTransformer with zoo attention (issue 6, item 1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from attnzoo.data.images import DigitsDataModule
from attnzoo.layers import attention_info, list_attention
from attnzoo.models.vit import ViT, timm_attention_class

SMALL = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=4)


@pytest.fixture(scope="module")
def digits_batch(tmp_path_factory):
    dm = DigitsDataModule(batch_size=8, data_dir=tmp_path_factory.mktemp("data"))
    return next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("name", list_attention("noncausal_self"))
def test_every_noncausal_attention_trains_one_step_on_digits(name, digits_batch):
    torch.manual_seed(0)
    model = ViT(**{**SMALL, "depth": 1}, attention=name)  # one block: the registry is long and the CPU shared
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logits = model(digits_batch["inputs"])
    assert logits.shape == (8, 10)
    loss = F.cross_entropy(logits, digits_batch["labels"])
    if model.aux_loss is not None:
        loss = loss + model.aux_loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    attn_changed = [n for n in changed if ".attn." in n]
    assert attn_changed, f"{name}: no attention parameter was updated"


def test_softmax_vit_loads_timm_weights_and_matches_exactly():
    torch.manual_seed(0)
    ref = VisionTransformer(**SMALL).double().eval()
    got = ViT(**SMALL, attention="softmax").double().eval()
    assert set(ref.state_dict()) == set(got.state_dict())  # timm's names: blocks.i.attn.qkv, .proj, ...
    got.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(got(x), ref(x), atol=1e-12, rtol=0)


def test_init_matches_timm_statistics():
    """timm's init runs on the zoo layers too (trunc-normal 0.02 Linear weights, zero biases)."""
    torch.manual_seed(0)
    model = ViT(**SMALL, attention="softmax")
    qkv = model.blocks[0].attn.qkv
    assert torch.all(qkv.bias == 0)
    assert 0.015 < qkv.weight.std().item() < 0.025


def test_hybrid_per_layer_attention():
    names = list_attention("noncausal_self")
    other = next((n for n in names if n != "softmax"), "softmax")
    model = ViT(**{**SMALL, "depth": 3}, attention=[other, {"name": "softmax", "qk_norm": True}, "softmax"])
    assert [type(b.attn).zoo_base.name for b in model.blocks] == [other, "softmax", "softmax"]
    assert model.attention_names == [other, "softmax", "softmax"]
    assert not isinstance(model.blocks[1].attn.q_norm, torch.nn.Identity)
    assert isinstance(model.blocks[2].attn.q_norm, torch.nn.Identity)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_wrong_number_of_layers_and_causal_only_layers_raise():
    with pytest.raises(ValueError, match="depth=2"):
        ViT(**SMALL, attention=["softmax"] * 3)
    with pytest.raises(TypeError, match="qkv_bia"):
        ViT(**SMALL, attention={"name": "softmax", "qkv_bia": True})
    with pytest.raises(ValueError, match="unknown attention"):
        ViT(**SMALL, attention="sofmax")


@pytest.mark.parametrize(
    "name", [n for n in list_attention("noncausal_self") if "grid_size" in attention_info(n).options] or ["none"]
)
def test_grid_layers_receive_grid_and_prefix(name):
    if name == "none":
        pytest.skip("no registered attention takes grid_size")
    model = ViT(
        img_size=(8, 12), patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=1, num_heads=4, attention=name
    )
    spec = type(model.blocks[0].attn).zoo_spec
    assert tuple(spec["grid_size"]) == (4, 6)
    if "num_prefix_tokens" in attention_info(name).options:
        assert spec["num_prefix_tokens"] == 1
    assert model(torch.randn(2, 1, 8, 12)).shape == (2, 10)


POSITIONED = sorted(
    n
    for n in list_attention("noncausal_self")
    if {"grid_size", "num_prefix_tokens", "layer_index"} & set(attention_info(n).options)
)


@pytest.mark.parametrize("name", POSITIONED)
def test_configs_leave_grid_prefix_and_index_to_the_vit(name):
    """From the command line (``experiment=vit_digits attention=<name>``), the ViT fills in the options the attention
    config leaves unset (null): the 4x4 patch grid, the class token, and each block's index (swin then alternates
    W-MSA and SW-MSA), exactly as when the model is built from Python."""
    from conftest import compose_train
    from omegaconf import OmegaConf

    from attnzoo.training.base import build_model
    from attnzoo.training.run import resolve_attention

    cfg = compose_train(["experiment=vit_digits", f"attention={name}"])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.update(attention=resolve_attention(cfg), img_size=8, in_chans=1, num_classes=10)  # the 8x8 digits
    layers = build_model(model_cfg).attention_layers()
    options = attention_info(name).options
    for index, layer in enumerate(layers):
        if "grid_size" in options:
            assert layer.grid_size == (4, 4)
        if "num_prefix_tokens" in options:
            assert layer.num_prefix_tokens == 1
        if "layer_index" in options:
            assert layer.layer_index == index
    if name == "swin":  # window_size // 2 on odd blocks (the grid clamps the window; timm then skips the shift)
        assert [layer.shift_size for layer in layers] == [0, 3, 0, 3]


def test_adapter_accepts_timm_call_and_key_padding_mask():
    cls = timm_attention_class("softmax")
    layer = cls(32, num_heads=4, qkv_bias=True).double().eval()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    torch.testing.assert_close(layer(x, attn_mask=mask), layer(x, padding_mask=mask))
    torch.testing.assert_close(layer(x, attn_mask=mask[:, None, None]), layer(x, padding_mask=mask))
    with pytest.raises(ValueError, match="key padding mask"):
        layer(x, attn_mask=torch.zeros(5, 5))
    with pytest.raises(ValueError, match="non-causal"):
        layer(x, is_causal=True)


def test_experiment_vit_digits_runs_and_checkpoint_reloads(tmp_path, data_dir):
    """``experiment=vit_digits`` composes, trains a few batches through run(cfg), and its checkpoint rebuilds the
    ClassificationTask (configs, not modules, are saved)."""
    import json

    from conftest import compose_train, shrink
    from omegaconf import open_dict

    from attnzoo.training import ClassificationTask, run

    cfg = shrink(compose_train(["experiment=vit_digits"]), tmp_path, data_dir)
    with open_dict(cfg):
        cfg.trainer.limit_train_batches = 2
        cfg.trainer.limit_val_batches = 1
        cfg.trainer.limit_test_batches = 1
    run(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"] == "vit" and summary["attention"] == ["softmax"] * 4
    assert {"test/acc", "test/loss", "test/top5_acc"} <= set(summary["test_metrics"])
    task = ClassificationTask.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu")
    assert isinstance(task.model, ViT) and task.model.patch_embed.grid_size == (4, 4)
    batch = torch.randn(2, 1, 8, 8)
    assert task.eval()(batch).shape == (2, 10)


def test_pickle_and_deepcopy_rebuild_the_runtime_adapter_classes():
    """Adapter classes are made at run time; pickling (ddp_spawn, torch.save of a whole model) must still work."""
    import copy
    import pickle

    model = ViT(**SMALL, attention=["softmax", {"name": "softmax", "qk_norm": True}]).eval()
    x = torch.randn(2, 1, 8, 8)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        torch.testing.assert_close(clone(x), model(x), atol=0, rtol=0)
        assert type(clone.blocks[1].attn) is type(model.blocks[1].attn)


def test_experiment_vit_digits_runs_with_neighborhood(tmp_path, data_dir):
    """``experiment=vit_digits attention=neighborhood`` trains through run(cfg): every block's neighborhood layer gets
    the 4x4 patch grid and the class token, and the 2-D relative position bias is on (NAT)."""
    import json

    from conftest import compose_train, shrink
    from omegaconf import open_dict

    from attnzoo.training import run

    cfg = shrink(
        compose_train(["experiment=vit_digits", "attention=neighborhood", "attention.kernel_size=3"]),
        tmp_path,
        data_dir,
    )
    with open_dict(cfg):
        cfg.trainer.limit_train_batches = 2
        cfg.trainer.limit_val_batches = 1
        cfg.trainer.limit_test_batches = 1
    run(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["attention"] == ["neighborhood"] * 4 and "test/acc" in summary["test_metrics"]
    model = ViT(**SMALL, attention={"name": "neighborhood", "kernel_size": 3})
    spec = type(model.blocks[0].attn).zoo_spec
    assert tuple(spec["grid_size"]) == (4, 4) and spec["num_prefix_tokens"] == 1
    assert model.blocks[0].attn.rpb.shape == (4, 5, 5)
