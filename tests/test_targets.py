"""A user's own model or DataModule class plugged in with Hydra's ``_target_`` (``model._target_=pkg.Class``)."""

from __future__ import annotations

import importlib
import json
import textwrap

import pytest
from conftest import compose_train, shrink

from attnzoo.training.validate import ConfigError, validate_config

run_module = importlib.import_module("attnzoo.training.run")  # the module, not the function

USER_MODULE = textwrap.dedent(
    '''
    import torch
    from attnzoo.data import MQARDataModule
    from attnzoo.models import GPT

    BUILT = []

    class ScaledGPT(GPT):
        """A user's backbone: the GPT with its logits scaled by a constructor argument of its own."""

        def __init__(self, *args, logit_scale: float = 1.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.logit_scale = logit_scale
            BUILT.append(("model", logit_scale))

        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs) * self.logit_scale

    class CountingMQAR(MQARDataModule):
        def __init__(self, *args, tag: str = "", **kwargs):
            super().__init__(*args, **kwargs)
            BUILT.append(("data", tag))
    '''
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_zoo_ext.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_zoo_ext

    importlib.reload(my_zoo_ext)
    return my_zoo_ext


def test_user_model_and_datamodule_train(user_module, tmp_path, data_dir):
    cfg = compose_train(
        [
            "model._target_=my_zoo_ext.ScaledGPT",
            "model.logit_scale=0.5",
            "data._target_=my_zoo_ext.CountingMQAR",
            "data.tag=mine",
            "trainer.fast_dev_run=true",
        ]
    )
    cfg = shrink(cfg, tmp_path, data_dir)
    validate_config(cfg)
    run_module.run(cfg)
    assert ("model", 0.5) in user_module.BUILT and ("data", "mine") in user_module.BUILT
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"] == "my_zoo_ext.ScaledGPT"


def test_user_model_options_are_checked_against_its_signature(user_module):
    cfg = compose_train(["model._target_=my_zoo_ext.ScaledGPT", "model.logit_scael=0.5"])
    with pytest.raises(ConfigError, match=r"model\.logit_scael.*logit_scale"):
        validate_config(cfg)
    cfg = compose_train(["model._target_=my_zoo_ext.ScaledGPT", "model.logit_scale=abc"])
    with pytest.raises(ConfigError, match=r"model\.logit_scale"):
        validate_config(cfg)


@pytest.mark.parametrize("group", ["model", "data"])
def test_unimportable_target_names_the_key(group):
    cfg = compose_train([f"{group}._target_=no_such_pkg.Thing"])
    with pytest.raises(ConfigError, match=rf"^{group}\._target_: expected an importable class.*no_such_pkg"):
        validate_config(cfg)


def test_build_model_resolves_target(user_module):
    from attnzoo.training import build_model

    model = build_model(
        {
            "_target_": "my_zoo_ext.ScaledGPT",
            "name": "gpt",
            "vocab_size": 16,
            "max_seq_len": 8,
            "dim": 16,
            "depth": 1,
            "num_heads": 2,
            "logit_scale": 2.0,
        }
    )
    assert type(model).__name__ == "ScaledGPT" and model.logit_scale == 2.0
    with pytest.raises(ValueError, match=r"model\._target_='nope\.Nope' is not an importable class"):
        build_model({"_target_": "nope.Nope"})
