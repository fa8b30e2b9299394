"""Optional dependencies: import one where it is needed, or fail with the pip command that installs it.

``pip install attnzoo`` brings only what the default run needs (torch, timm, Hydra, Lightning, ...). The rest sits
behind the package's extras, and the modules that need it import it lazily through :func:`require`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# top-level module -> (distribution on PyPI, attnzoo extra that declares it)
EXTRAS: dict[str, tuple[str, str]] = {
    "sklearn": ("scikit-learn", "vision"),
    "torchvision": ("torchvision", "vision"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "matplotlib": ("matplotlib", "plot"),
    "triton": ("triton", "triton"),
    "x_transformers": ("x-transformers", "bench"),
}


def require(module: str, needed_for: str) -> ModuleType:
    """Import ``module`` (e.g. ``"sklearn.datasets"``); if its package is missing, raise ``ModuleNotFoundError``
    naming what needs it (``needed_for``, e.g. ``"data=digits"``) and the extra to install."""
    top = module.partition(".")[0]
    if top not in EXTRAS:
        raise ValueError(f"{top!r} is not an optional dependency of attnzoo; known: {', '.join(sorted(EXTRAS))}.")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.partition(".")[0] != top:
            raise  # the package is there but something it imports is not: its own message says what
        package, extra = EXTRAS[top]
        raise ModuleNotFoundError(
            f"{needed_for} needs {package}, which is not installed: pip install 'attnzoo[{extra}]' "
            f"(or pip install {package}).",
            name=top,
        ) from None
