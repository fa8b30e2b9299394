"""Generated data sets cached on disk by a hash of their configuration.

Synthetic sets (MQAR, ListOps) are a pure function of their config and seed, so a run regenerates nothing it has
made before: the tensors go to ``<data_dir>/<kind>/<hash>.pt`` with the config beside them as JSON for people.
``data_dir`` is the Hydra ``paths.data_dir`` (default ``~/.cache/attnzoo``), never the package's ``data/`` folder,
which holds code only. Files are written to a temporary name and renamed, so a reader (another DDP rank, a killed
run) never sees half a file, and they are read with ``weights_only=True`` (tensors only, no code).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = "~/.cache/attnzoo"


def config_hash(config: dict[str, Any]) -> str:
    """A short stable hash of a JSON-serialisable config (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path(kind: str, config: dict[str, Any], data_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`cached_tensors` keeps the set of ``kind`` generated from ``config``."""
    root = Path(os.path.expanduser(str(data_dir or DEFAULT_DATA_DIR)))
    return root / kind / f"{config_hash(config)}.pt"


def cached_tensors(
    kind: str,
    config: dict[str, Any],
    make: Callable[[], dict[str, Tensor]],
    data_dir: str | os.PathLike | None = None,
) -> dict[str, Tensor]:
    """Load the tensors generated from ``config``, calling ``make()`` and saving its result only on a miss.

    Args:
        kind: a folder name for the data set family, e.g. ``"mqar"``.
        config: everything the generated tensors depend on (including the seed); it is hashed.
        make: generates the tensors; called only when the cache has no file for ``config``.
        data_dir: cache root (default ``~/.cache/attnzoo``).
    """
    path = cache_path(kind, config, data_dir)
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a corrupted file is regenerated, not trusted
            log.warning("cached %s set %s is unreadable (%s); regenerating it", kind, path, err)
    tensors = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(tensors, tmp)
    os.replace(tmp, path)  # atomic: concurrent writers of the same config produce identical files
    path.with_suffix(".json").write_text(json.dumps(config, sort_keys=True, indent=1, default=str))
    log.info("generated %s set %s", kind, path)
    return tensors
