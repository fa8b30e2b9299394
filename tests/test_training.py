"""run(cfg) end to end: fast_dev_run, artifacts, resume, checkpoint reload, a small MQAR run that learns, the
configuration errors, the optimizer groups and schedule, the multirun table; DDP on 2 CPU processes (slow)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_train, shrink
from omegaconf import OmegaConf, open_dict

from attnzoo.layers import attention_info, list_attention
from attnzoo.models import GPT
from attnzoo.training import LanguageModelTask, param_groups, resolve_attention, run, warmup_cosine
from attnzoo.training.callbacks import CompareRunsCallback

REPO = Path(__file__).resolve().parents[1]


def test_fast_dev_run(cfg_train, tmp_path):
    with open_dict(cfg_train):
        cfg_train.trainer.fast_dev_run = True
    run(cfg_train)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["attention"] == ["softmax", "softmax"]
    assert set(summary["test_metrics"]) >= {"test/loss", "test/acc", "test/ppl"}
    assert summary["params"] > 0 and summary["train_tokens_per_s"] > 0


def test_progress_bar_off_from_the_command_line(cfg_train, tmp_path):
    """``trainer.enable_progress_bar=false`` with the default callbacks (which configure a RichProgressBar) trains
    instead of Lightning's "found RichProgressBar in callbacks" error: the run drops the configured bar."""
    with open_dict(cfg_train):
        cfg_train.trainer.fast_dev_run = True
        cfg_train.trainer.enable_progress_bar = False
        cfg_train.callbacks.rich_progress_bar = {"_target_": "lightning.pytorch.callbacks.RichProgressBar"}
    run(cfg_train)
    assert (tmp_path / "summary.json").is_file()


def test_artifacts_resume_and_reload(cfg_train, tmp_path):
    with open_dict(cfg_train):
        cfg_train.trainer.limit_train_batches = 3
        cfg_train.trainer.limit_val_batches = 1
    run(cfg_train)
    last = tmp_path / "checkpoints" / "last.ckpt"
    for name in ("config.yaml", "metrics.csv", "summary.json"):
        assert (tmp_path / name).is_file(), name
    assert last.is_file() and list((tmp_path / "checkpoints").glob("best-*.ckpt"))
    first = torch.load(last, map_location="cpu", weights_only=False)
    assert first["global_step"] == 3
    saved = OmegaConf.load(tmp_path / "config.yaml")
    assert saved.model.vocab_size == 256 and saved.model.attention.name == "softmax"  # data kwargs merged in

    # resume: the step count continues from the checkpoint
    resumed_dir = tmp_path / "resumed"
    with open_dict(cfg_train):
        cfg_train.ckpt_path = str(last)
        cfg_train.trainer.max_epochs = 2
        cfg_train.paths.output_dir = str(resumed_dir)
    run(cfg_train)
    second = torch.load(resumed_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert second["global_step"] == 6 and second["epoch"] == 1
    assert json.loads((resumed_dir / "summary.json").read_text())["global_step"] == 6

    # the checkpoint rebuilds the same model from its configs
    task = LanguageModelTask.load_from_checkpoint(resumed_dir / "checkpoints" / "last.ckpt", map_location="cpu")
    assert isinstance(task.model, GPT)
    state = {k.removeprefix("model."): v for k, v in second["state_dict"].items()}
    for key, value in task.model.state_dict().items():
        torch.testing.assert_close(value, state[key])


def test_small_mqar_run_learns(tmp_path, data_dir):
    """A tiny MQAR (vocab 32, length 16, 2 pairs, width 64) must reach >= 0.9 test accuracy.

    Measured: ~300 steps to 0.9 validation accuracy at lr 3e-3; the run stops once validation reaches 0.95.
    """
    cfg = shrink(compose_train(), tmp_path, data_dir)
    with open_dict(cfg):
        cfg.data.update(vocab_size=32, input_seq_len=16, num_kv_pairs=2, batch_size=64)
        cfg.data.num_examples = {"train": 2048, "val": 256, "test": 256}
        cfg.model.update(dim=64, depth=2, num_heads=2)
        cfg.optimizer.lr = 3e-3
        cfg.scheduler.update(warmup_steps=10, min_lr_ratio=1.0)  # warmup, then constant
        cfg.trainer.max_epochs = 25
        cfg.callbacks = {
            "early_stopping": {
                "_target_": "lightning.pytorch.callbacks.EarlyStopping",
                "monitor": "val/acc",
                "mode": "max",
                "stopping_threshold": 0.95,
                "patience": 100,
            }
        }
        cfg.logger = None
    run(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["test_metrics"]["test/acc"] >= 0.9, summary["test_metrics"]


# ----------------------------------------------------------------------------------------------------------------
# configuration errors: one message naming the problem and the valid choices, as SystemExit (no traceback)


def _expect_exit(cfg, *fragments):
    with pytest.raises(SystemExit) as info:
        run(cfg)
    message = str(info.value)
    assert message.startswith("attnzoo: configuration error:")
    for fragment in fragments:
        assert fragment in message, message


def test_unknown_attention_in_hybrid_list(cfg_train):
    with open_dict(cfg_train):
        cfg_train.model.attention = ["softmax", "sofmax"]
    _expect_exit(cfg_train, "unknown attention 'sofmax'", "Did you mean 'softmax'?", "Valid:")


def test_unknown_attention_option(cfg_train):
    with open_dict(cfg_train):
        cfg_train.attention.rop = True
    _expect_exit(cfg_train, "unknown option 'rop'", "Did you mean 'rope'?")
    with open_dict(cfg_train):
        del cfg_train.attention.rop
        cfg_train.model.attention = [{"name": "softmax", "qk_nrom": True}, "softmax"]
    _expect_exit(cfg_train, "unknown option 'qk_nrom'", "Did you mean 'qk_norm'?")


def test_unknown_data_and_model(cfg_train):
    with open_dict(cfg_train):
        cfg_train.data.name = "mqra"
    _expect_exit(cfg_train, "unknown data set 'mqra'", "Did you mean 'mqar'?")
    with open_dict(cfg_train):
        cfg_train.data.name = "mqar"
        cfg_train.model.name = "gtp"
    _expect_exit(cfg_train, "unknown model 'gtp'", "Did you mean 'gpt'?")


def test_missing_checkpoint_and_too_short_model(cfg_train, tmp_path):
    with open_dict(cfg_train):
        cfg_train.ckpt_path = str(tmp_path / "nope.ckpt")
    _expect_exit(cfg_train, "nope.ckpt does not exist")
    with open_dict(cfg_train):
        cfg_train.ckpt_path = None
        cfg_train.model.max_seq_len = 32
    _expect_exit(cfg_train, "model.max_seq_len=32 is smaller than the data's max_seq_len=64")


def test_hybrid_list_length_must_match_depth(cfg_train):
    with open_dict(cfg_train):
        cfg_train.model.attention = ["softmax", "softmax", "softmax"]
    _expect_exit(cfg_train, "model.attention: expected one entry per layer (model.depth=2), got 3 entries")


def test_hybrid_entries_take_yaml_defaults_and_overrides():
    cfg = compose_train(["model.depth=3", "model.attention=[softmax,{name:softmax,rope:false},softmax]"])
    specs = resolve_attention(cfg)
    yaml_defaults = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "attention" / "softmax.yaml"))
    assert specs[0] == yaml_defaults and specs[2] == yaml_defaults
    assert specs[1] == {**yaml_defaults, "rope": False}
    assert set(specs[1]) - {"name"} <= set(attention_info("softmax").options)


def test_attention_group_overrides_reach_the_model():
    cfg = compose_train(["attention.rope=false", "attention.qk_norm=true"])
    spec = resolve_attention(cfg)
    assert spec["name"] == "softmax" and spec["rope"] is False and spec["qk_norm"] is True


# ----------------------------------------------------------------------------------------------------------------
# optimizer and schedule


def test_no_weight_decay_groups():
    model = GPT(32, dim=16, depth=1, num_heads=2)
    flagged = torch.nn.Parameter(torch.zeros(4, 4))
    flagged._no_weight_decay = True
    model.register_parameter("flagged", flagged)
    decay, no_decay = param_groups(model, 0.1)
    decay_ids = {id(p) for p in decay["params"]}
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert id(model.tok_emb.weight) in no_decay_ids, "embeddings (and the tied head) are not decayed"
    assert id(flagged) in no_decay_ids
    assert all(p.ndim >= 2 for p in decay["params"])
    assert id(model.blocks[0].mlp.fc1.weight) in decay_ids
    n_unique = len({id(p) for p in model.parameters()})
    assert len(decay_ids) + len(no_decay_ids) == n_unique and not decay_ids & no_decay_ids


def test_warmup_cosine_schedule():
    f = lambda s: warmup_cosine(s, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values)), "cosine decays monotonically after warmup"


# ----------------------------------------------------------------------------------------------------------------
# multirun table


def test_compare_runs_table(tmp_path, capsys):
    for job, (name, acc) in enumerate([("softmax", 0.99), ("other", 0.5)]):
        (tmp_path / str(job)).mkdir()
        summary = {
            "attention": [name, name],
            "params": 1000 + job,
            "test_metrics": {"test/acc": acc},
            "train_tokens_per_s": 1234.5,
            "wall_time_s": 10.0,
            "overrides": [f"attention={name}"],
        }
        (tmp_path / str(job) / "summary.json").write_text(json.dumps(summary))
    CompareRunsCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(rows) == 3 and "test/acc" in rows[0]
    assert "softmax" in rows[1] and "0.99" in rows[1] and "other" in rows[2] and "0.5" in rows[2]
    assert (tmp_path / "comparison.md").is_file()


# ----------------------------------------------------------------------------------------------------------------
# the command line (subprocesses; slow)


def _train_py(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "ATTNZOO_DATA_DIR": str(cwd / "data")}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


SMALL_RUN = [
    "data.num_examples={train:256,val:64,test:64}",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
    "~callbacks.rich_progress_bar",
]


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    run_dir = tmp_path / "run"
    result = _train_py(
        ["trainer=ddp", "trainer.devices=2", "data.batch_size=32", f"hydra.run.dir={run_dir}", *SMALL_RUN], tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    # 256 examples / 2 ranks / batch 32 = 4 batches per rank, all of them within limit_train_batches=4
    assert summary["global_step"] == 4 and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert "gloo" in result.stderr + result.stdout, "DDP on CPU runs on the gloo backend"


@pytest.mark.slow
def test_multirun_prints_one_table(tmp_path):
    other = next((n for n in list_attention("causal_self") if n != "softmax"), None)
    choices = f"softmax,{other}" if other else "softmax"
    result = _train_py(["-m", f"attention={choices}", f"hydra.sweep.dir={tmp_path / 'sweep'}", *SMALL_RUN], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("attnzoo multirun comparison") == 1
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(choices.split(",")), result.stdout[-2000:]


@pytest.mark.slow
def test_command_line_typos_give_one_message(tmp_path):
    result = _train_py(["model.attention=[softmax,sofmax]", *SMALL_RUN], tmp_path)
    assert result.returncode == 1
    assert "unknown attention 'sofmax'. Did you mean 'softmax'?" in result.stderr
    assert "Traceback" not in result.stderr
    result = _train_py(["attention=sofmax"], tmp_path)
    assert result.returncode == 1 and "softmax" in result.stderr and "Traceback" not in result.stderr
