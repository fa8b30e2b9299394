"""linearize (LoLCATs-style swap -> attention transfer -> fine-tune): which layers are swapped or kept, what moves
over from the teacher, what each stage trains, that transfer brings each swapped layer closer to its softmax layer,
the errors; and scripts/linearize.py on a tiny MQAR run (run directory, resume through train.py, generate.py)."""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_train, shrink
from omegaconf import open_dict
from torch import nn

import attnzoo.models
from attnzoo.layers.gla import GatedLinearAttention
from attnzoo.layers.softmax import SoftmaxAttention
from attnzoo.models import GPT, LinearizeReport, ViT, linearize

REPO = Path(__file__).resolve().parents[1]
linearize_module = importlib.import_module("attnzoo.models.linearize")


def tiny_gpt(depth: int = 4, attention="softmax") -> GPT:
    torch.manual_seed(0)
    return GPT(16, dim=32, depth=depth, num_heads=2, attention=attention, mlp_ratio=1.0)


def tiny_vit(depth: int = 2) -> ViT:
    torch.manual_seed(0)
    return ViT(img_size=8, patch_size=2, in_chans=1, num_classes=5, embed_dim=32, depth=depth, num_heads=2)


def lm_batches(count: int = 4, batch: int = 8, length: int = 12) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        ids = torch.randint(0, 16, (batch, length + 1), generator=generator)
        out.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    return out


def image_batches(count: int = 4, batch: int = 8) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        {"inputs": torch.randn(batch, 1, 8, 8, generator=generator), "labels": torch.randint(0, 5, (batch,))}
        for _ in range(count)
    ]


MODELS = {"gpt": (tiny_gpt, lm_batches), "vit": (tiny_vit, image_batches)}


def layer_errors(model: nn.Module, teacher: nn.Module, paths: list[str], batch: dict) -> dict[str, float]:
    """Per swapped layer: MSE(student(h), teacher(h)) / mean square of teacher(h), h = the teacher layer's input."""
    captured = {}
    handles = [
        teacher.get_submodule(p).register_forward_hook(
            lambda m, a, k, o, p=p: captured.__setitem__(p, (a, k, o)), with_kwargs=True
        )
        for p in paths
    ]
    with torch.no_grad():
        linearize_module.forward_batch(teacher.eval(), batch)
        errors = {}
        for path in paths:
            args, kwargs, target = captured[path]
            out = model.get_submodule(path)(*args, **kwargs)
            errors[path] = float((out - target).square().mean() / target.square().mean())
    for handle in handles:
        handle.remove()
    return errors


# ---------------------------------------------------------------------------------------------------------------
# the export


def test_exported_function_and_importable_module():
    assert inspect.isfunction(linearize) and attnzoo.models.linearize is linearize
    assert LinearizeReport is linearize_module.LinearizeReport and linearize is linearize_module.linearize
    from attnzoo.models.linearize import attention_transfer, evaluate, layer_specs  # the module's own names

    assert callable(attention_transfer) and callable(evaluate) and callable(layer_specs)
    assert inspect.ismodule(sys.modules["attnzoo.models.linearize"])
    # attnzoo.models stays importable without Lightning/Hydra (linearize imports attnzoo.training lazily)
    code = "import sys, attnzoo.models; print(sorted(m for m in ('lightning', 'hydra') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


# ---------------------------------------------------------------------------------------------------------------
# stage 0: which layers are swapped, what is copied


@pytest.mark.parametrize(
    "keep,kept",
    [(None, []), (2, [1, 3]), (4, [3]), (3, [2])],
    ids=["all", "every2", "every4", "every3"],
)
def test_swap_all_or_keep_every_kth(keep, kept):
    model, report = tiny_gpt(depth=4), LinearizeReport()
    linearize(model, "gla", keep_softmax_every=keep, transfer_steps=0, finetune_steps=0, report=report)
    swapped = [i for i in range(4) if i not in kept]
    assert report.kept == [f"blocks.{i}.attn" for i in kept]
    assert report.swapped == [f"blocks.{i}.attn" for i in swapped]
    gla_spec = {"name": "gla", "expand_k": 1.0, "expand_v": 1.0}  # teacher-shaped q/k/v (FLA's default is 0.5)
    assert report.specs == [None if i in kept else gla_spec for i in range(4)]
    for i, block in enumerate(model.blocks):
        expected = SoftmaxAttention if i in kept else GatedLinearAttention
        assert type(block.attn) is expected, (i, type(block.attn))
    assert all(p.startswith(tuple(report.swapped)) for p in report.copied + report.fresh)


def test_per_layer_list_and_explicit_options():
    model, report = tiny_gpt(depth=4), LinearizeReport()
    target = ["gla", None, {"name": "gla", "expand_k": 0.5}, None]
    linearize(model, target, transfer_steps=0, finetune_steps=0, report=report)
    assert report.kept == ["blocks.1.attn", "blocks.3.attn"]
    assert report.specs[2] == {"name": "gla", "expand_k": 0.5, "expand_v": 1.0}  # the user's value wins
    # half-width keys: q and k cannot take the teacher's rows, so they start fresh; v and o still move over
    assert "blocks.2.attn.q_proj.weight" in report.fresh and "blocks.2.attn.k_proj.weight" in report.fresh
    assert "blocks.2.attn.v_proj.weight" in report.copied and "blocks.0.attn.q_proj.weight" in report.copied


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_copied_parameters_equal_the_teachers_q_k_v_o(kind):
    make, _ = MODELS[kind]
    model = make()
    teacher = copy.deepcopy(model)
    report = LinearizeReport()
    linearize(model, "gla", transfer_steps=0, finetune_steps=0, report=report)
    assert report.swapped and not report.kept
    params = dict(model.named_parameters())
    for path in report.swapped:
        old = teacher.get_submodule(path)
        q, k, v = old.qkv.weight.chunk(3, dim=0)  # the teacher's fused rows [q | k | v]
        expected = {"q_proj.weight": q, "k_proj.weight": k, "v_proj.weight": v, "o_proj.weight": old.proj.weight}
        assert sorted(n for n in report.copied if n.startswith(path + ".")) == sorted(f"{path}.{n}" for n in expected)
        for name, value in expected.items():
            assert torch.equal(params[f"{path}.{name}"], value), f"{path}.{name}"
        # every parameter of the new layer is either copied or fresh
        local = {f"{path}.{n}" for n, _ in model.get_submodule(path).named_parameters()}
        assert local == {n for n in report.copied + report.fresh if n.startswith(path + ".")}
    # outside the swapped layers nothing changed
    for name, value in teacher.named_parameters():
        if not name.startswith(tuple(report.swapped)):
            assert torch.equal(params[name], value), name


# ---------------------------------------------------------------------------------------------------------------
# stage 1: attention transfer


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_attention_transfer_trains_only_fresh_parameters_and_lowers_the_layer_error(kind):
    make, batches_of = MODELS[kind]
    model = make()
    teacher = copy.deepcopy(model).requires_grad_(False)
    report = LinearizeReport()
    specs = linearize_module.layer_specs("gla", len(linearize_module.attention_layers(model)), 2)
    swapped = linearize_module.swap_layers(model, specs, report)
    assert report.kept  # a hybrid: the kept softmax layer must not train either
    batches = batches_of()
    fixed = batches_of(count=1, batch=16)[0]
    before_state = {n: p.detach().clone() for n, p in model.named_parameters()}
    before_errors = layer_errors(model, teacher, swapped, fixed)
    losses = linearize_module.attention_transfer(
        model, teacher, swapped, report.fresh, linearize_module._cycle(batches), steps=20, lr=2e-2, report=report
    )
    after_errors = layer_errors(model, teacher, swapped, fixed)
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    fresh = set(report.fresh)
    for name, p in model.named_parameters():
        if name in fresh:
            continue
        assert torch.equal(p, before_state[name]), f"{name} changed during transfer"
    assert any(not torch.equal(dict(model.named_parameters())[n], before_state[n]) for n in fresh)
    assert all(p.requires_grad for p in model.parameters())  # the flags are restored afterwards
    for path in swapped:  # a real drop on a batch transfer never saw
        assert after_errors[path] < 0.7 * before_errors[path], (path, before_errors[path], after_errors[path])
    assert set(report.transfer_layer_errors) == set(swapped)


def test_linearize_transfer_only_keeps_teacher_weights():
    model = tiny_gpt(depth=2)
    teacher = copy.deepcopy(model)
    report = LinearizeReport()
    linearize(model, "gla", data=lm_batches(), transfer_steps=5, finetune_steps=0, report=report)
    assert len(report.transfer_losses) == 5 and report.finetune_losses == []
    params = dict(model.named_parameters())
    for name, value in teacher.named_parameters():
        if name in params:  # the norms, MLPs, embeddings: frozen during transfer
            assert torch.equal(params[name], value), name


# ---------------------------------------------------------------------------------------------------------------
# stage 2: fine-tune


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_finetune_changes_every_parameter(kind):
    make, batches_of = MODELS[kind]
    model = make()
    batches = batches_of()
    report = LinearizeReport()
    linearize(model, "gla", keep_softmax_every=2, data=batches, transfer_steps=2, finetune_steps=0, report=report)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = linearize_module.finetune(model, linearize_module._cycle(batches), steps=3, lr=1e-3)
    assert len(losses) == 3
    for name, p in model.named_parameters():  # copied, fresh, kept softmax, norms, embeddings, head
        assert not torch.equal(p, before[name]), f"{name} did not train in the fine-tune"


def test_finetune_lowers_the_task_loss_on_a_fixed_batch():
    model = tiny_gpt(depth=2)
    batches = lm_batches(count=2)
    linearize(model, "gla", data=batches, transfer_steps=0, finetune_steps=0)
    before = linearize_module.evaluate(model, batches)["loss"]
    linearize_module.finetune(model, linearize_module._cycle(batches), steps=10, lr=1e-2)
    after = linearize_module.evaluate(model, batches)["loss"]
    assert after < before - 0.05, (before, after)


# ---------------------------------------------------------------------------------------------------------------
# errors


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="not softmax attention"):
        linearize(tiny_gpt(depth=2, attention="gla"), "gla", transfer_steps=0, finetune_steps=0)
    with pytest.raises(ValueError, match="has no attention layer"):
        linearize(nn.Sequential(nn.Linear(4, 4)), "gla", transfer_steps=0, finetune_steps=0)
    with pytest.raises(ValueError, match=re.escape("unknown attention 'glaa'. Did you mean 'gla'")):
        linearize(tiny_gpt(depth=2), "glaa", transfer_steps=0, finetune_steps=0)
    with pytest.raises(TypeError, match=re.escape("gla: unknown option 'expandk'. Did you mean 'expand_k'")):
        linearize(tiny_gpt(depth=2), {"name": "gla", "expandk": 1.0}, transfer_steps=0, finetune_steps=0)
    for bad in (0, -1, 2.5, "2"):
        with pytest.raises(ValueError, match="keep_softmax_every must be a positive int"):
            linearize(tiny_gpt(depth=2), "gla", keep_softmax_every=bad, transfer_steps=0, finetune_steps=0)
    with pytest.raises(ValueError, match="every one of the 2 layers is kept"):
        linearize(tiny_gpt(depth=2), "gla", keep_softmax_every=1, transfer_steps=0, finetune_steps=0)
    with pytest.raises(ValueError, match="not both"):
        linearize(tiny_gpt(depth=2), ["gla", None], keep_softmax_every=2, transfer_steps=0, finetune_steps=0)
    with pytest.raises(ValueError, match="has 3 entries but the model has 2"):
        linearize(tiny_gpt(depth=2), ["gla", "gla", None], transfer_steps=0, finetune_steps=0)
    with pytest.raises(ValueError, match="pass data="):
        linearize(tiny_gpt(depth=2), "gla")
    # a pattern the target lacks: sliding_window has no noncausal_self, which every ViT layer needs
    model = tiny_vit()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="sliding_window has no pattern 'noncausal_self'"):
        linearize(model, "sliding_window", transfer_steps=0, finetune_steps=0)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # checked before touching it


def test_keep_option_bool_is_rejected():
    with pytest.raises(ValueError, match="keep_softmax_every must be a positive int"):
        linearize(tiny_gpt(depth=2), "gla", keep_softmax_every=True, transfer_steps=0, finetune_steps=0)


# ---------------------------------------------------------------------------------------------------------------
# scripts/linearize.py on a real (tiny) MQAR run


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def teacher_run(run_dir: Path, data_dir: Path, overrides: list[str] | None = None) -> Path:
    """A 1-epoch tiny softmax run made with run(cfg); returns its best checkpoint."""
    from attnzoo.training import run

    cfg = shrink(compose_train(overrides), run_dir, data_dir)
    with open_dict(cfg):
        if cfg.data.name == "mqar":
            cfg.data.update(vocab_size=32, input_seq_len=16, num_kv_pairs=2)
        if cfg.model.name == "vit":
            cfg.model.update(embed_dim=32, depth=2, num_heads=2)
        else:
            cfg.model.update(dim=32, depth=2, num_heads=2)
        cfg.trainer.limit_train_batches = 4
        cfg.trainer.limit_val_batches = 1
        cfg.trainer.limit_test_batches = 1
    run(cfg)
    (best,) = (run_dir / "checkpoints").glob("best-*.ckpt")
    return best


def _python(args: list[str], cwd: Path, data_dir: Path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "ATTNZOO_DATA_DIR": str(data_dir)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def mqar_teacher(tmp_path, data_dir) -> Path:
    return teacher_run(tmp_path / "teacher", data_dir)


def test_script_writes_a_run_directory(mqar_teacher, tmp_path, capsys):
    script = load_script("linearize")
    out = tmp_path / "linearized"
    summary = script.main(
        [
            f"--checkpoint={mqar_teacher}",
            "--attention=gla",
            "--transfer-steps=3",
            "--finetune-steps=4",
            f"--out={out}",
            "--no-progress-bar",
            "--report",
        ]
    )
    for name in ("summary.json", "config.yaml", "metrics.csv", "model.safetensors", "checkpoints/last.ckpt"):
        assert (out / name).is_file(), name
    assert list((out / "checkpoints").glob("best-*.ckpt"))
    saved = json.loads((out / "summary.json").read_text())
    assert saved["attention"] == ["gla", "gla"] and saved["global_step"] == 4
    stages = [s["stage"] for s in saved["linearize"]["stages"]]
    assert stages == ["teacher", "swapped", "transferred", "finetuned"]
    assert saved["linearize"]["swapped"] == ["blocks.0.attn", "blocks.1.attn"]
    assert set(saved["test_metrics"]) >= {"test/loss", "test/acc"}
    printed = capsys.readouterr().out
    assert "| transferred |" in printed and f"resume with: {summary['linearize']['resume']}" in printed
    assert "decode (linearized):" in printed and saved["linearize"]["decode"]["linearized"]["state_numbers"] > 0
    # the safetensors hold the linearized model (gla parameter names)
    from safetensors.torch import load_file

    assert any(k.endswith("attn.gk_proj.0.weight") for k in load_file(out / "model.safetensors"))


def test_script_keeps_the_named_layers_softmax(mqar_teacher, tmp_path):
    script = load_script("linearize")
    out = tmp_path / "linearized"
    args = ["--attention=gla", "--keep-softmax-layers=0", "--transfer-steps=1", "--finetune-steps=1", f"--out={out}"]
    saved = script.main([f"--checkpoint={mqar_teacher}", *args])
    assert saved["attention"] == ["softmax", "gla"]
    assert saved["linearize"]["kept"] == ["blocks.0.attn"] and saved["linearize"]["keep_softmax_layers"] == [0]


def test_script_on_a_vit_digits_run(tmp_path, data_dir):
    teacher = teacher_run(tmp_path / "teacher", data_dir, ["experiment=vit_digits"])
    out = tmp_path / "linearized"
    script = load_script("linearize")
    saved = script.main(
        [f"--checkpoint={teacher}", "--attention=gla", "--transfer-steps=2", "--finetune-steps=2", f"--out={out}"]
    )
    assert saved["attention"] == ["gla", "gla"] and (out / "model.safetensors").is_file()
    assert saved["linearize"]["decode"] == {"teacher": {}, "linearized": {}}  # a classifier does not decode
    assert set(saved["test_metrics"]) >= {"test/acc"}


def test_script_rejects_bad_input(mqar_teacher, tmp_path):
    script = load_script("linearize")
    with pytest.raises(SystemExit, match="unknown attention 'glaa'"):
        script.main([f"--checkpoint={mqar_teacher}", "--attention=glaa", f"--out={tmp_path / 'x'}"])
    with pytest.raises(SystemExit, match="keep_softmax_every must be a positive int"):
        script.main([f"--checkpoint={mqar_teacher}", "--attention=gla", "--keep-softmax-every=0"])
    with pytest.raises(SystemExit, match=re.escape("--keep-softmax-layers [5] outside the model's 2 attention layers")):
        script.main([f"--checkpoint={mqar_teacher}", "--attention=gla", "--keep-softmax-layers", "0", "5"])
    with pytest.raises(SystemExit, match="either --keep-softmax-every or --keep-softmax-layers"):
        script.main(
            [f"--checkpoint={mqar_teacher}", "--attention=gla", "--keep-softmax-every=2", "--keep-softmax-layers=0"]
        )
    with pytest.raises(SystemExit, match="every one of the 2 layers is kept"):
        script.main([f"--checkpoint={mqar_teacher}", "--attention=gla", "--keep-softmax-layers", "0", "1"])
    with pytest.raises(SystemExit, match="--finetune-steps >= 1"):
        script.main([f"--checkpoint={mqar_teacher}", "--attention=gla", "--finetune-steps=0"])
    stray = tmp_path / "elsewhere" / "checkpoints" / "best.ckpt"  # a checkpoint outside its run directory
    stray.parent.mkdir(parents=True)
    stray.write_bytes(mqar_teacher.read_bytes())
    with pytest.raises(SystemExit, match=re.escape("config.yaml; --checkpoint must be inside a run directory")):
        script.main([f"--checkpoint={stray}", "--attention=gla"])


@pytest.mark.slow
def test_script_run_resumes_with_train_py_and_generates(tmp_path, data_dir):
    """The printed resume command continues the linearized run; generate.py samples from a linearized text run."""
    text_run = ["data=text", f"data.path={REPO / 'models'}", "data.max_bytes=null", "data.seq_len=32"]  # ~15 files
    text_run += ["data.val_fraction=0.2", "data.test_fraction=0.2"]
    teacher = teacher_run(tmp_path / "teacher", data_dir, text_run)
    out = tmp_path / "linearized"
    result = _python(
        [
            str(REPO / "scripts" / "linearize.py"),
            f"--checkpoint={teacher}",
            "--attention=gla",
            "--keep-softmax-every=2",
            "--transfer-steps=2",
            "--finetune-steps=2",
            f"--out={out}",
            "--no-progress-bar",
        ],
        tmp_path,
        data_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["attention"] == ["gla", "softmax"]
    resume = summary["linearize"]["resume"]
    assert f"resume with: {resume}" in result.stdout and resume.endswith("trainer.max_steps=4")
    args = shlex.split(resume)
    assert args[:2] == ["python", "train.py"]
    resumed_dir = tmp_path / "resumed"
    result = _python(
        [str(REPO / "train.py"), *args[2:], f"hydra.run.dir={resumed_dir}", "trainer.enable_progress_bar=false"],
        tmp_path,
        data_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = json.loads((resumed_dir / "summary.json").read_text())
    assert resumed["global_step"] == 4 and resumed["attention"] == ["gla", "softmax"]

    result = _python(
        [str(REPO / "scripts" / "generate.py"), f"--checkpoint={out / 'checkpoints' / 'last.ckpt'}", "--prompt=def "],
        tmp_path,
        data_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("def ")
