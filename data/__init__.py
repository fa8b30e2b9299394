"""attnzoo.data: Lightning DataModules for the training tasks, selected by name from the ``data`` config group.

Every DataModule offers ``model_kwargs()``: what the backbone needs from the data (GPT: ``vocab_size``,
``max_seq_len``), merged under the explicit model config. LM batches are dicts of ``input_ids`` (B, T) long,
``labels`` (B, T) long with -100 = ignored, and optionally ``padding_mask`` (B, T) bool (True = real token).
"""

from __future__ import annotations

import inspect
from typing import Any

from attnzoo.data.cache import cache_path, cached_tensors, config_hash
from attnzoo.data.images import CIFAR10DataModule, DigitsDataModule, MNISTDataModule
from attnzoo.data.listops import ListOpsDataModule
from attnzoo.data.mqar import MQARDataModule, generate_mqar
from attnzoo.data.seq2seq import Seq2SeqDataModule, generate_seq2seq
from attnzoo.data.text import TextDataModule
from attnzoo.errors import unknown
from attnzoo.targets import class_options, resolve_class

DATAMODULES: dict[str, type] = {
    "mqar": MQARDataModule,
    "digits": DigitsDataModule,
    "cifar10": CIFAR10DataModule,
    "mnist": MNISTDataModule,
    "listops": ListOpsDataModule,
    "text": TextDataModule,
    "seq2seq": Seq2SeqDataModule,
}


def build_datamodule(data_cfg: Any):
    """Build the DataModule named by ``data_cfg.name`` (or the class named by ``data_cfg._target_``) with the other
    keys as kwargs."""
    node = {str(k): v for k, v in dict(data_cfg).items()}
    cls = resolve_class(node, DATAMODULES, "data", "data set")
    name = node.get("_target_") or node.get("name")
    options = class_options(node)
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        options = {
            k: OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v
            for k, v in options.items()
        }
    except ImportError:
        pass  # plain dicts need no conversion
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    valid = [p for p in params if p != "self"]
    for key in options:
        if key not in valid and not takes_any:
            raise TypeError(f"data set {name}: " + unknown("option", key, valid))
    return cls(**options)


__all__ = [
    "DATAMODULES",
    "MQARDataModule",
    "Seq2SeqDataModule",
    "build_datamodule",
    "cache_path",
    "cached_tensors",
    "config_hash",
    "generate_mqar",
    "generate_seq2seq",
]
