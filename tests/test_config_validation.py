"""Every config value is checked against the callable it feeds before anything is built (attnzoo.training.validate).

Bad overrides go through Hydra's composition (the nodes the validation covers accept any key without ``+``) and
``run()``, whose build step is replaced by a failure: each must stop with exit status 1 and one message naming the
key, and the override the message suggests must fix that key. A handful run the real ``python train.py`` (slow).
"""

from __future__ import annotations

import importlib
import inspect
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Literal

import lightning
import pytest
import torch
from conftest import CONFIG_DIR, shrink
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf, open_dict

from attnzoo.data import DATAMODULES
from attnzoo.layers import attention_class, list_attention
from attnzoo.layers.registry import CONTRACT_ARGS
from attnzoo.models import MODELS
from attnzoo.training import build_optimizer
from attnzoo.training.base import BaseTask
from attnzoo.training.validate import (
    OPTIMIZERS,
    RANGES,
    SCHEDULERS,
    SET_BY_TASK,
    TRAINER_RANGES,
    ConfigError,
    Param,
    Range,
    check_value,
    describe,
    matches,
    range_for,
    signature_params,
    validate_config,
)

REPO = Path(__file__).resolve().parents[1]
run_module = importlib.import_module("attnzoo.training.run")  # the module; attnzoo.training.run is the function
PREFIX = "attnzoo: configuration error: "


@pytest.fixture(scope="module")
def composer():
    """``compose(overrides)`` of train.yaml inside one Hydra initialisation (composing is the slow part)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):

        def compose_train(overrides: list[str]) -> DictConfig:
            cfg = compose(config_name="train", overrides=overrides)
            with open_dict(cfg):  # ${hydra:runtime.output_dir} resolves only inside a Hydra app
                cfg.paths.output_dir = "outputs/test"
            return cfg

        yield compose_train
    GlobalHydra.instance().clear()


# (overrides, the key the message names, words it must contain); ckpt_path's example is a template, not a fix
BAD = [
    pytest.param(["model.depth=abc"], "model.depth", "expected an integer > 0, got 'abc'", id="depth-string"),
    pytest.param(["model.depth=0"], "model.depth", "an integer > 0", id="depth-zero"),
    pytest.param(["model.depth=true"], "model.depth", "got true (a boolean)", id="depth-bool-is-not-int"),
    pytest.param(["model.depth=4.5"], "model.depth", "got 4.5", id="depth-float"),
    pytest.param(["model.num_heads=5"], "model.num_heads", "divisor of model.dim=64", id="dim-not-divisible"),
    pytest.param(["model.dropout=1.5"], "model.dropout", "in [0, 1]", id="dropout-above-one"),
    pytest.param(["model.drop_path=-0.1"], "model.drop_path", "in [0, 1]", id="drop-path-negative"),
    pytest.param(["model.dpth=3"], "model.dpth", "Did you mean 'depth'?", id="model-unknown-key"),
    pytest.param(["model.positions=1"], "model.positions", "expected a string", id="model-str-gets-int"),
    pytest.param(["attention=gla", "attention.expand_k=abc"], "attention.expand_k", "a number > 0", id="gla-type"),
    pytest.param(
        ["attention=performer", "attention.nb_feature=64"],
        "attention.nb_feature",
        "Did you mean 'nb_features'?",
        id="attention-unknown-option",
    ),
    pytest.param(["attention.attn_drop=2"], "attention.attn_drop", "in [0, 1]", id="attn-drop-above-one"),
    pytest.param(["attention.dim=32"], "attention.dim", "set by the model", id="attention-contract-arg"),
    pytest.param(
        ["attention=mamba", "attention.dt_min=0.5"], "attention.dt_min", "at most attention.dt_max", id="min-above-max"
    ),
    pytest.param(
        ["model.depth=2", "model.attention=[softmax,{name:gla,expand_k:0}]"],
        "model.attention[1].expand_k",
        "a number > 0",
        id="per-layer-option",
    ),
    pytest.param(
        ["model.depth=2", "model.attention=[softmax,glaa]"],
        "model.attention[1]",
        "Did you mean 'gla'?",
        id="per-layer-name",
    ),
    pytest.param(
        ["model.depth=3", "model.attention=[softmax,gla]"],
        "model.attention",
        "one entry per layer",
        id="per-layer-count",
    ),
    pytest.param(["optimizer.lr=fast"], "optimizer.lr", "a number > 0, got 'fast' (a string)", id="lr-string"),
    pytest.param(['optimizer.lr="1e-3"'], "optimizer.lr", "quoted numbers stay strings", id="lr-quoted-number"),
    pytest.param(["optimizer.betas=[0.9,1.5]"], "optimizer.betas", "in [0, 1)", id="betas-range"),
    pytest.param(["optimizer.betas=[0.9]"], "optimizer.betas", "a list of 2 numbers", id="betas-length"),
    pytest.param(["optimizer.name=sgd"], "optimizer.name", "unknown optimizer 'sgd'", id="optimizer-name"),
    pytest.param(["scheduler.warmup_steps=-3"], "scheduler.warmup_steps", "an integer >= 0", id="warmup-negative"),
    pytest.param(["scheduler.min_lr_ratio=2"], "scheduler.min_lr_ratio", "in [0, 1]", id="min-lr-ratio"),
    pytest.param(["data.batch_size=0"], "data.batch_size", "an integer > 0", id="batch-size-zero"),
    pytest.param(["data.bach_size=32"], "data.bach_size", "Did you mean 'batch_size'?", id="data-unknown-key"),
    pytest.param(["data.num_examples.train=-5"], "data.num_examples", "each number > 0", id="data-mapping-values"),
    pytest.param(["data=text", "data.path=/no/such/corpus"], "data.path", "existing file or folder", id="data-path"),
    pytest.param(
        ["data=text", "data.val_fraction=0.6", "data.test_fraction=0.5"],
        "data.val_fraction",
        "< 1 (the rest is training data)",
        id="fractions-sum",
    ),
    pytest.param(["data=listops", "data.min_length=300"], "data.min_length", "at most data.max_length", id="lengths"),
    pytest.param(["data=cifar10", "data.root=/no/such/cifar"], "data.root", "existing folder", id="image-root"),
    pytest.param(["model=vit", "data=digits", "model.embed_dim=30"], "model.num_heads", "divisor", id="vit-width"),
    pytest.param(["seed=abc"], "seed", "an integer >= 0 or null", id="seed-string"),
    pytest.param(["trainer.max_epoch=3"], "trainer.max_epoch", "Did you mean 'max_epochs'?", id="trainer-unknown"),
    pytest.param(["trainer.max_epochs=abc"], "trainer.max_epochs", "an integer >= -1", id="trainer-type"),
    pytest.param(["trainer.precision=31"], "trainer.precision", "one of 64, 32, 16", id="trainer-literal"),
    pytest.param(["trainer.limit_train_batches=1.5"], "trainer.limit_train_batches", "a fraction", id="limit-float"),
    pytest.param(["trainer.min_epochs=20"], "trainer.min_epochs", "at most trainer.max_epochs=10", id="trainer-min"),
    pytest.param(["trainer.callbacks=[]"], "trainer.callbacks", "callbacks group", id="trainer-set-by-run"),
]


def _fix_of(message: str) -> list[str]:
    """The overrides after '; e.g. ' in a message, as the shell would split them."""
    assert "; e.g. " in message, f"no example override in: {message}"
    return shlex.split(message.rsplit("; e.g. ", 1)[1])


@pytest.mark.parametrize("overrides,key,words", BAD)
def test_bad_override_stops_before_build_with_one_message(composer, monkeypatch, overrides, key, words):
    def built(*args, **kwargs):
        raise AssertionError("validation let the config through to the build")

    monkeypatch.setattr(run_module, "_setup", built)
    cfg = composer(overrides)
    with pytest.raises(SystemExit) as stopped:
        run_module.run(cfg)
    message = stopped.value.code  # a string code: Python prints it to stderr and exits with status 1
    assert isinstance(message, str) and message.startswith(f"{PREFIX}{key}: "), message
    assert words in message and "\n" not in message, message

    # the suggested override, in place of the bad one, fixes that key (the run may then stop at another, later key)
    kept = [o for o in overrides if o.split("=")[0].lstrip("+~") != key]
    try:
        validate_config(composer([*kept, *_fix_of(message)]))
    except ConfigError as err:
        assert not str(err).startswith(f"{key}: "), f"the example in {message!r} does not fix {key}: {err}"


def test_missing_checkpoint_is_named(composer):
    with pytest.raises(ConfigError, match=r"^ckpt_path: expected an existing checkpoint file .*; e\.g\. ckpt_path="):
        validate_config(composer(["ckpt_path=/no/such/last.ckpt"]))


# ------------------------------------------------------------------------------------------------------------------
# good inputs: everything the repository ships validates clean


def _shipped(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


GOOD = (
    [[f"experiment={e}"] for e in _shipped("experiment")]
    + [[f"model={m}"] for m in _shipped("model")]
    + [[f"data={d}"] for d in _shipped("data")]
    + [[f"trainer={t}"] for t in _shipped("trainer")]
    + [["debug=fast"], ["scheduler.name=constant"], ["model=vit", "data=digits", "model.img_size=[8,8]"]]
)


@pytest.mark.parametrize("overrides", GOOD, ids=lambda o: " ".join(o))
def test_shipped_configs_validate(composer, overrides):
    validate_config(composer(overrides))


def test_every_attention_yaml_validates(composer):
    """The attention group holds its yaml's content: each one in place of the default (one composition for all)."""
    cfg = composer([])
    names = _shipped("attention")
    for name in names:
        with open_dict(cfg):
            cfg.attention = OmegaConf.load(Path(CONFIG_DIR) / "attention" / f"{name}.yaml")
        validate_config(cfg)
    with open_dict(cfg):  # and all of them as one per-layer hybrid
        cfg.model.depth, cfg.model.attention = len(names), names
    validate_config(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["none", *_shipped("experiment")])
def test_every_experiment_with_every_attention_validates(composer, experiment):
    for attention in _shipped("attention"):
        overrides = [f"attention={attention}"] + ([] if experiment == "none" else [f"experiment={experiment}"])
        validate_config(composer(overrides))


def _defaults_pass(params: dict[str, Param], table, where: str) -> None:
    for name, param in params.items():
        if param.default in (None, inspect.Parameter.empty) or not isinstance(param.default, (int, float, tuple)):
            continue
        default = list(param.default) if isinstance(param.default, tuple) else param.default
        check_value(f"{where}.{name}", default, param, range_for(name, table), str)


@pytest.mark.parametrize("name", list_attention())
def test_range_table_accepts_every_layer_default(name):
    """A new layer whose defaults the name-based ranges reject needs a row in RANGES (this test says which)."""
    _defaults_pass(signature_params(attention_class(name), skip=CONTRACT_ARGS), RANGES, name)


@pytest.mark.parametrize("name", [*MODELS, *DATAMODULES])
def test_range_table_accepts_model_and_data_defaults(name):
    _defaults_pass(signature_params({**MODELS, **DATAMODULES}[name]), RANGES, name)


def test_range_table_accepts_trainer_and_optimizer_defaults():
    _defaults_pass(signature_params(lightning.Trainer), TRAINER_RANGES, "trainer")
    for builder in [*OPTIMIZERS.values(), *filter(None, SCHEDULERS.values())]:
        _defaults_pass(signature_params(builder, skip=SET_BY_TASK), RANGES, builder.__name__)


def test_optimizer_and_scheduler_tables_match_what_the_task_builds():
    model = torch.nn.Linear(4, 4)
    for name in OPTIMIZERS:
        assert isinstance(build_optimizer(model, {"name": name, "lr": 1e-3}), OPTIMIZERS[name])
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(model, {"name": "not_in_the_table"})
    task = BaseTask(model={"name": "gpt", "vocab_size": 16, "dim": 16, "depth": 1, "num_heads": 2})
    for name in SCHEDULERS:
        task.scheduler_cfg = {"name": name}
        task.configure_optimizers()
    task.scheduler_cfg = {"name": "not_in_the_table"}
    with pytest.raises(ValueError, match="unknown scheduler"):
        task.configure_optimizers()


# ------------------------------------------------------------------------------------------------------------------
# the type rules


@pytest.mark.parametrize(
    "value,hint,ok",
    [
        (3, float, True),  # ints are fine for floats
        (True, int, False),  # bools are not ints
        (True, float, False),
        (3.0, int, False),
        ([1, 2], tuple[int, int], True),  # a list of the right length for a tuple
        ([1, 2, 3], tuple[int, int], False),
        ([1, "a"], tuple[int, ...], False),
        (None, int | None, True),
        (None, int, False),
        ("x", str | os.PathLike, True),
        (1, Literal["1", 2], False),  # Literal compares the type too
        ("1", Literal["1", 2], True),
        ({"_target_": "lightning.pytorch.strategies.DDPStrategy"}, str | lightning.pytorch.strategies.Strategy, True),
        ({"a": 1}, str | lightning.pytorch.strategies.Strategy, False),
        ({"train": 1}, dict[str, int], True),
        ({"train": "x"}, dict[str, int], False),
    ],
)
def test_matches(value, hint, ok):
    assert matches(value, hint) is ok


def test_descriptions_read_like_config_values():
    assert describe(int | None) == "an integer or null"
    assert describe(tuple[float, float]) == "a list of 2 numbers"
    assert describe(int | float | None) == "a number or null"
    assert describe(torch.Tensor | float) == "a number"  # no config value is a Tensor
    assert str(Range(gt=0)) == "> 0" and str(Range(ge=0, le=1)) == "in [0, 1]" and str(Range(ge=0, lt=1)) == "in [0, 1)"


# ------------------------------------------------------------------------------------------------------------------
# Hydra: the validated nodes take any key without +, the rest stays strict


def test_every_trainer_argument_overrides_without_plus(composer):
    cfg = composer(["trainer.fast_dev_run=true", "trainer.detect_anomaly=true", "trainer.max_time=00:00:10:00"])
    assert cfg.trainer.fast_dev_run is True and cfg.trainer.detect_anomaly is True
    validate_config(cfg)


def test_other_nodes_stay_strict(composer):
    with pytest.raises(ConfigCompositionException, match="nosuchsetting"):
        composer(["nosuchsetting=1"])


def test_fast_dev_run_override_trains(composer, tmp_path, data_dir):
    cfg = shrink(composer(["trainer.fast_dev_run=true"]), tmp_path, data_dir)
    run_module.run(cfg)
    assert (tmp_path / "summary.json").is_file()


# ------------------------------------------------------------------------------------------------------------------
# the real entry point: exit status 1, one message, no traceback


def _train(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *overrides, f"hydra.run.dir={cwd / 'run'}"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "ATTNZOO_DATA_DIR": str(cwd / "data")},
    )


@pytest.mark.slow  # a fresh interpreter importing torch, Lightning and Hydra: 5-30 s each on this machine
@pytest.mark.parametrize(
    "overrides,key",
    [
        (["model.depth=abc", "debug=fast"], "model.depth"),  # the message of issue 24
        (["trainer.max_epoch=3"], "trainer.max_epoch"),
    ],
    ids=["depth", "trainer-flag"],
)
def test_train_py_exits_1_with_one_message(tmp_path, overrides, key):
    done = _train(*overrides, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert f"{PREFIX}{key}: " in done.stderr and "; e.g. " in done.stderr, done.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()  # stopped before the run wrote anything


@pytest.mark.slow
def test_train_py_fast_dev_run(tmp_path):
    done = _train("trainer.fast_dev_run=true", "data.num_examples={train:64,val:32,test:32}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "summary.json").is_file()
