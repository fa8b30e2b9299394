"""``run(cfg)``: everything ``python train.py`` does, importable and testable (the lightning-hydra-template's
``train(cfg)``).

1. Resolve the attention: the ``attention`` config group gives every layer's attention unless ``model.attention`` is
   set; ``model.attention`` may be one entry or a list with one entry per layer (a hybrid). A string entry takes its
   options from ``configs/attention/<name>.yaml``; a mapping entry ``{name: x, opt: v}`` overrides those defaults.
2. Build the DataModule (``data.name``), merge its ``model_kwargs()`` under the explicit model config, pick the task
   from the model class's ``task`` and build it (which builds the model, so option typos surface here).
3. A configuration error (unknown attention/option/data/model, missing ``ckpt_path``, sequence longer than the model
   allows) ends the run with ONE message naming the problem and the valid choices (``SystemExit``), not a traceback.
   Before anything else, every key and value is checked against the callable it feeds (``training/validate.py``).
4. Fit (resuming from ``ckpt_path`` if given), test on the best checkpoint, write ``config.yaml`` (resolved) and
   ``summary.json`` into the run directory, and return the metric named by ``optimized_metric`` (for sweeps).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, ListConfig, OmegaConf

import attnzoo.configs
from attnzoo.allocator import tune_malloc
from attnzoo.data import build_datamodule
from attnzoo.errors import unknown
from attnzoo.layers import attention_info, list_attention
from attnzoo.targets import resolve_class
from attnzoo.training import faults
from attnzoo.training.callbacks import ThroughputMonitor
from attnzoo.training.summary import attention_names, write_summary
from attnzoo.training.validate import ConfigError, validate_config

log = logging.getLogger(__name__)

CONFIG_DIR = Path(attnzoo.configs.__file__).parent


def _container(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def attention_defaults(name: str) -> dict[str, Any]:
    """``configs/attention/<name>.yaml`` as a dict; every registered attention must have one (an error otherwise)."""
    if name not in list_attention():
        raise ConfigError(unknown("attention", name, list_attention()))
    path = CONFIG_DIR / "attention" / f"{name}.yaml"
    if not path.is_file():
        # never fall back to no options: the run would silently train with other defaults than the command line's
        raise ConfigError(
            f"attention {name!r} is registered but its defaults file {path} does not exist. Add it (its layer's "
            f"options, as in the other files of {path.parent}); if attnzoo is installed, reinstall it: the package "
            f"ships one yaml per registered attention."
        )
    return {"name": name, **{k: v for k, v in _container(OmegaConf.load(path)).items() if k != "name"}}


def _resolve_entry(entry: Any, defaults_from_yaml: bool) -> dict[str, Any]:
    entry = _container(entry)
    if isinstance(entry, str):
        return attention_defaults(entry)
    if isinstance(entry, dict):
        if "name" not in entry:
            raise ConfigError(
                f"an attention entry given as a mapping needs a 'name' key, e.g. {{name: softmax, rope: false}}; "
                f"got {entry}. Registered: {', '.join(list_attention())}."
            )
        base = attention_defaults(entry["name"]) if defaults_from_yaml else {"name": entry["name"]}
        spec = {**base, **entry}
        options = attention_info(spec["name"]).options
        for key in spec:
            if key != "name" and key not in options:
                raise ConfigError(f"attention {spec['name']}: " + unknown("option", key, options))
        return spec
    raise ConfigError(
        f"model.attention entries are names or mappings with a 'name' key; got {type(entry).__name__}: {entry!r}."
    )


def resolve_attention(cfg: DictConfig) -> Any:
    """The model's attention: one spec dict, or a list with one spec dict per layer (see the module docstring)."""
    explicit = cfg.model.get("attention")
    if explicit is None:
        group = _container(cfg.get("attention"))
        if not group:
            raise ConfigError("no attention: choose one with attention=<name> or model.attention=[...].")
        # the attention group already holds the yaml's options plus command-line overrides
        return _resolve_entry(group, defaults_from_yaml=False)
    explicit = _container(explicit)
    if isinstance(explicit, list):
        depth = int(cfg.model.get("depth", len(explicit)))
        if len(explicit) != depth:
            raise ConfigError(
                f"model.attention has {len(explicit)} entries but model.depth={depth}; give one entry per layer, "
                f"e.g. model.depth={len(explicit)}."
            )
        return [_resolve_entry(e, defaults_from_yaml=True) for e in explicit]
    return _resolve_entry(explicit, defaults_from_yaml=True)


def model_config(cfg: DictConfig, datamodule: Any) -> dict[str, Any]:
    """The model config with the resolved attention and the data's needs (explicit model values win)."""
    explicit = {k: v for k, v in _container(cfg.model).items() if v is not None}
    from_data = dict(datamodule.model_kwargs()) if hasattr(datamodule, "model_kwargs") else {}
    for key in ("max_seq_len", "vocab_size"):
        if key in explicit and key in from_data and explicit[key] < from_data[key]:
            what = "sequences" if key == "max_seq_len" else "token ids"
            raise ConfigError(
                f"model.{key}={explicit[key]} is smaller than the data's {key}={from_data[key]} (the data has longer "
                f"{what} than the model allows); remove the override or set model.{key}>={from_data[key]}."
            )
    model_cfg = {**from_data, **explicit}
    model_cfg["attention"] = resolve_attention(cfg)
    return model_cfg


def build_task(cfg: DictConfig, model_cfg: dict[str, Any]) -> L.LightningModule:
    from attnzoo.models import MODELS
    from attnzoo.training import TASKS

    try:
        model_cls = resolve_class(model_cfg, MODELS, "model")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    task_name = getattr(model_cls, "task", "lm")  # a user's class without one trains as a language model
    if task_name not in TASKS:
        raise ConfigError(unknown(f"task (of model {model_cls.__name__})", task_name, TASKS))
    return TASKS[task_name](
        model=model_cfg, optimizer=_container(cfg.get("optimizer")), scheduler=_container(cfg.get("scheduler"))
    )


def _setup(cfg: DictConfig) -> tuple[Any, dict[str, Any], L.LightningModule, str | None]:
    """Everything a configuration error can come from, before any training starts."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None and not Path(str(ckpt_path)).expanduser().is_file():
        raise ConfigError(
            f"ckpt_path={ckpt_path} does not exist; pass the path of a checkpoint written by a run, e.g. "
            f"ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt (absolute, or relative to where you started)."
        )
    if cfg.get("data") is None or cfg.get("model") is None:
        raise ConfigError("the config needs a model and a data group (see configs/train.yaml).")
    try:
        datamodule = build_datamodule(cfg.data)
        model_cfg = model_config(cfg, datamodule)
        task = build_task(cfg, model_cfg)  # builds the model: unknown option, pattern, dim % heads, ...
        if ckpt_path is not None:  # unreadable or from another model: one message now, not a deep traceback later
            faults.check_resume_checkpoint(Path(str(ckpt_path)).expanduser(), task)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from err
    return datamodule, model_cfg, task, None if ckpt_path is None else str(Path(str(ckpt_path)).expanduser())


def _instantiate_all(group: Any) -> list[Any]:
    if not group:
        return []
    return [instantiate(c) for c in group.values() if c is not None and "_target_" in c]


def run(cfg: DictConfig) -> float | None:
    """Train, test and summarise one configuration; return ``cfg.optimized_metric`` (None if not logged)."""
    started = time.perf_counter()
    try:
        validate_config(cfg)  # every key and value against the callable it feeds, before anything is built or seeded
    except ConfigError as err:
        raise SystemExit(f"attnzoo: configuration error: {err}") from None
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    if cfg.get("tune_malloc", False):
        tune_malloc()  # opt-in, process-wide: keep freed CPU memory for reuse (attnzoo.allocator); no-op without glibc
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    try:
        datamodule, model_cfg, task, ckpt_path = _setup(cfg)
    except ConfigError as err:
        raise SystemExit(f"attnzoo: configuration error: {err}") from None
    if cfg.get("compile", False):
        task.model.compile()  # in place: the state_dict keys (and so checkpoints) stay those of the eager model

    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    throughput = ThroughputMonitor()
    callbacks = [*_instantiate_all(cfg.get("callbacks")), throughput]
    if not cfg.trainer.get("enable_progress_bar", True):  # trainer.enable_progress_bar=false: drop the configured bar
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = _instantiate_all(cfg.get("logger"))
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=faults.trainer_plugins()
    )  # atomic checkpoint writes, weights_only reads (training/faults.py)

    if trainer.is_global_zero:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        resolved["model"] = model_cfg  # the model exactly as built: data kwargs and per-layer attention included
        OmegaConf.save(OmegaConf.create(resolved), output_dir / "config.yaml")
        log.info(
            "model %s: attention %s, %d parameters",
            model_cfg.get("_target_") or model_cfg["name"],
            attention_names(model_cfg),
            sum(p.numel() for p in task.parameters()),
        )

    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    except faults.NonFiniteLossError as err:
        raise SystemExit(f"attnzoo: training stopped: {err}") from None
    except SIGTERMException:
        return None  # SIGTERM/SIGINT: last.ckpt is written and the resume command printed; exit status 0
    fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    test_results = trainer.test(task, datamodule=datamodule, ckpt_path=best, verbose=trainer.is_global_zero)
    test_metrics = {k: float(v) for k, v in (test_results[0] if test_results else {}).items()}
    metrics = {**fit_metrics, **test_metrics}
    if trainer.is_global_zero:  # the tested (best) weights, as plain tensors: attnzoo.models.load_weights
        faults.export_weights(task, output_dir)

    if trainer.is_global_zero:
        summary = {
            "config_name": _config_name(),
            "overrides": _overrides(),
            "choices": _choices(),
            "model": model_cfg.get("_target_") or model_cfg["name"],
            "attention": attention_names(model_cfg),
            "attention_specs": model_cfg["attention"],
            "params": sum(p.numel() for p in task.parameters()),
            "test_metrics": test_metrics,
            "val_metrics": {k: v for k, v in fit_metrics.items() if k.startswith("val/")},
            "best_checkpoint": best,
            "global_step": trainer.global_step,
            "epochs": trainer.current_epoch,
            "train_tokens_per_s": throughput.tokens_per_second,
            "wall_time_s": time.perf_counter() - started,
            "output_dir": str(output_dir),
        }
        write_summary(output_dir / "summary.json", summary)
        log.info("summary: %s", output_dir / "summary.json")

    name = cfg.get("optimized_metric")
    if name is None:
        return None
    if name not in metrics:
        log.warning("optimized_metric %r was not logged; logged: %s", name, sorted(metrics))
        return None
    return metrics[name]


def _config_name() -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().job.config_name)
    except ValueError:  # run() called without @hydra.main (tests, notebooks)
        return "train"


def _choices() -> dict[str, str | None]:
    """The config group options of this run, e.g. ``{"model": "gpt", "attention": "softmax", "experiment": None}``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        choices = OmegaConf.to_container(HydraConfig.get().runtime.choices)
        return {k: v for k, v in choices.items() if not k.startswith("hydra")}
    except ValueError:
        return {}


def _overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []
