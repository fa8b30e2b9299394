"""Configs and code do not drift: every config group option composes, every attention yaml names a registered layer
and only its options with defaults of the right kind, every registered layer has a yaml, and the composed default
config builds its data, model and trainer (the lightning-hydra-template's test_configs)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CONFIG_DIR, compose_train, shrink
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from attnzoo.layers import attention_class, attention_info, list_attention
from attnzoo.training.run import _setup

CONFIGS = Path(CONFIG_DIR)
GROUPS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir() and not p.name.startswith("_") and p.name != "local")
OPTIONS = [
    pytest.param(group, path.stem, id=f"{group}={path.stem}")
    for group in GROUPS
    for path in sorted((CONFIGS / group).glob("*.yaml"))
]
ATTENTION_YAMLS = sorted((CONFIGS / "attention").glob("*.yaml"))


@pytest.mark.parametrize("group,option", OPTIONS)
def test_every_group_option_composes(group, option):
    cfg = compose_train([f"{group}={option}"])
    assert cfg.model is not None and cfg.data is not None and cfg.trainer is not None
    OmegaConf.to_container(cfg.trainer, resolve=False)  # well formed


@pytest.mark.parametrize("path", ATTENTION_YAMLS, ids=lambda p: p.stem)
def test_attention_yaml_matches_layer(path):
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    name = cfg.pop("name")
    assert name == path.stem, f"{path.name} must say name: {path.stem}"
    options = attention_info(name).options
    assert set(cfg) <= set(options), f"{path.name}: not options of {name}: {sorted(set(cfg) - set(options))}"
    for key, value in cfg.items():
        default = options[key]
        if isinstance(default, bool) or isinstance(value, bool):
            assert isinstance(value, bool) == isinstance(default, bool) or default is None, key
        elif isinstance(default, (int, float)) and value is not None:
            assert isinstance(value, (int, float)), f"{path.name}: {key}={value!r} but the default is {default!r}"


@pytest.mark.parametrize("name", list_attention())
def test_every_registered_layer_has_a_yaml(name):
    assert (CONFIGS / "attention" / f"{name}.yaml").is_file(), f"add configs/attention/{name}.yaml"


CAUSAL_YAMLS = [
    p for p in ATTENTION_YAMLS if p.stem in list_attention() and "causal_self" in attention_class(p.stem).patterns
]


@pytest.mark.parametrize("path", CAUSAL_YAMLS, ids=lambda p: p.stem)
def test_gpt_builds_with_every_causal_attention(path, tmp_path, data_dir):
    name = path.stem
    cfg = shrink(compose_train([f"attention={name}"]), tmp_path, data_dir)
    _datamodule, model_cfg, task, _ = _setup(cfg)
    assert model_cfg["attention"]["name"] == name
    assert all(block.attn.name == name for block in task.model.blocks)


def test_default_config_instantiates(cfg_train):
    _datamodule, model_cfg, _task, ckpt = _setup(cfg_train)
    assert model_cfg["vocab_size"] == cfg_train.data.vocab_size and ckpt is None
    trainer = instantiate(cfg_train.trainer)
    assert trainer.max_epochs == 1
    callbacks = [instantiate(c) for c in cfg_train.callbacks.values()]
    assert any(type(c).__name__ == "ModelCheckpoint" for c in callbacks)
    loggers = [instantiate(c) for c in cfg_train.logger.values()]
    assert type(loggers[0]).__name__ == "CSVLogger"


def test_ddp_config_uses_ddp_strategy():
    cfg = compose_train(["trainer=ddp", "trainer.devices=2"])
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 2 and cfg.trainer.accelerator in ("auto", "cpu")


def test_debug_fast_and_experiments_compose():
    assert compose_train(["debug=fast"]).trainer.fast_dev_run is True
    for path in sorted((CONFIGS / "experiment").glob("*.yaml")):
        cfg = compose_train([f"experiment={path.stem}"])
        with open_dict(cfg):
            cfg.paths.output_dir = "unused"
        OmegaConf.to_container(cfg.model, resolve=True)


def test_unknown_group_option_lists_the_choices():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as info:
        compose_train(["attention=sofmax"])
    assert "softmax" in str(info.value)


@pytest.mark.parametrize("path", sorted((CONFIGS / "experiment").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_experiment_runs_fast_dev_run(path, tmp_path, data_dir):
    """Every named experiment trains one batch, validates and tests (the template's test_sweeps), on small data."""
    from attnzoo.training import run

    cfg = shrink(compose_train([f"experiment={path.stem}", "debug=fast"]), tmp_path, data_dir)
    with open_dict(cfg):
        if cfg.data.name == "text":  # a small corpus instead of the standard library's sources
            corpus = tmp_path / "corpus.txt"
            corpus.write_text("def f(x):\n    return x + 1\n" * 200)
            cfg.data.path = str(corpus)
        if "num_examples" in cfg.data:
            cfg.data.num_examples = {"train": 64, "val": 16, "test": 16}
    run(cfg)
    assert (tmp_path / "summary.json").is_file()
