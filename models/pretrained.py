"""``save_pretrained`` / ``from_pretrained`` for the backbones: huggingface_hub's ``PyTorchModelHubMixin`` with
attnzoo's weight writer.

``model.save_pretrained(folder)`` writes ``config.json`` (the constructor arguments the model was built with, per-layer
attention lists and every option included) and ``model.safetensors`` (written atomically by
:func:`attnzoo.models.save_weights`, tied weights stored once), plus the hub's ``README.md`` model card.
``GPT.from_pretrained(folder)`` rebuilds the model from ``config.json`` and loads the weights strictly; a local folder
needs no network. A Hub repo id works too (``huggingface_hub`` downloads the two files), as does ``push_to_hub``.

A training run writes the same ``model.safetensors`` format into its run directory but not ``config.json`` (the run's
``.hydra/config.yaml`` holds the config instead); ``attnzoo.models.load_weights(model, path)`` loads that file into a
model built from the run's config, and ``model.save_pretrained(folder)`` then gives a folder ``from_pretrained`` reads.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from huggingface_hub.utils import is_jsonable

from attnzoo.layers.factory import FACTORY_ARGS
from attnzoo.models.io import load_weights, save_weights

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def _plain(value: Any) -> Any:
    """OmegaConf containers (a Hydra config's ``attention`` list) and tuples as plain JSON-able lists and dicts."""
    if type(value).__name__ in ("DictConfig", "ListConfig"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class PretrainedMixin(PyTorchModelHubMixin, library_name="attnzoo"):
    """Adds ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` to a backbone (``class GPT(nn.Module,
    PretrainedMixin)``); the config is every constructor argument except ``device`` and ``dtype``."""

    _unsaved_args: tuple[str, ...] = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        instance = super().__new__(cls, *args, **kwargs)
        # The hub mixin keeps only JSON-able arguments and drops the rest silently (an OmegaConf attention list
        # would vanish and from_pretrained would build softmax layers); this config is complete or says what is not.
        try:
            bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
        except TypeError:
            return instance  # __init__ raises the error that names the wrong argument
        bound.apply_defaults()
        config: dict[str, Any] = {}
        unsaved = []
        for name, value in list(bound.arguments.items())[1:]:
            kind = inspect.signature(cls.__init__).parameters[name].kind
            items = value.items() if kind is inspect.Parameter.VAR_KEYWORD else [(name, value)]
            for key, item in items:
                if key in FACTORY_ARGS:
                    continue  # where and in which dtype to build is the loader's choice, not part of the model
                item = _plain(item)
                if is_jsonable(item):
                    config[key] = item
                else:
                    unsaved.append(key)
        instance._hub_mixin_config = config
        instance._unsaved_args = tuple(unsaved)
        return instance

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> str | None:
        """Write ``config.json`` and ``model.safetensors`` (and a model card) into ``save_directory``.

        Keyword arguments are huggingface_hub's (``push_to_hub``, ``repo_id``, ``model_card_kwargs``, ...).

        Raises:
            ValueError: the model was built with an argument that JSON cannot hold (e.g. a class for a timm
                ``norm_layer``), so ``from_pretrained`` could not rebuild it.
        """
        if self._unsaved_args and kwargs.get("config") is None:
            raise ValueError(
                f"{type(self).__name__}.save_pretrained: constructor argument(s) {list(self._unsaved_args)} are not "
                f"JSON values, so config.json could not rebuild this model; build it from names, numbers, strings, "
                f"lists and dicts (e.g. attention specs), or save the weights alone with attnzoo.models.save_weights."
            )
        return super().save_pretrained(save_directory, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        save_weights(self, Path(save_directory) / WEIGHTS_FILE)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs: Any,
    ) -> Any:
        if os.path.isdir(model_id):
            folder = Path(model_id)
            if not (folder / CONFIG_FILE).is_file():
                raise FileNotFoundError(
                    f"{cls.__name__}.from_pretrained: {folder} has no {CONFIG_FILE}. A training run directory holds "
                    f"only {WEIGHTS_FILE}: build the model from the run's config, load it with "
                    f"attnzoo.models.load_weights(model, '{folder / WEIGHTS_FILE}'), then model.save_pretrained(...)."
                )
            weights = folder / WEIGHTS_FILE
        else:
            weights = Path(
                hf_hub_download(
                    repo_id=model_id,
                    filename=WEIGHTS_FILE,
                    revision=revision,
                    cache_dir=cache_dir,
                    force_download=force_download,
                    token=token,
                    local_files_only=local_files_only,
                )
            )
        model = cls(**model_kwargs)
        load_weights(model, weights, strict=strict)
        if str(map_location) != "cpu":
            model.to(map_location)
        return model.eval()
