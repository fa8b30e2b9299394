"""attnzoo.training: Lightning tasks built from configs, callbacks, and ``run(cfg)`` behind ``python train.py``.

``TASKS`` maps a backbone's ``task`` attribute (``attnzoo.models.MODELS[name].task``) to its LightningModule.
"""

from attnzoo.training.base import BaseTask, build_model
from attnzoo.training.classification import ClassificationTask
from attnzoo.training.lm import LanguageModelTask
from attnzoo.training.optim import build_optimizer, param_groups, warmup_cosine
from attnzoo.training.run import ConfigError, resolve_attention, run
from attnzoo.training.seq2seq import Seq2SeqTask

TASKS: dict[str, type] = {
    "lm": LanguageModelTask,
    "classification": ClassificationTask,
    "seq2seq": Seq2SeqTask,
}

__all__ = [
    "TASKS",
    "BaseTask",
    "ConfigError",
    "LanguageModelTask",
    "Seq2SeqTask",
    "build_model",
    "build_optimizer",
    "param_groups",
    "resolve_attention",
    "run",
    "warmup_cosine",
]
