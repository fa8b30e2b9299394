"""Which class a ``model`` or ``data`` config node builds: a built-in by ``name``, or any class by ``_target_``.

``model=gpt`` picks ``attnzoo.models.MODELS["gpt"]``; ``model._target_=my_pkg.MyModel`` (Hydra's convention) plugs in
a user's class instead and takes precedence over ``name``. The node's other keys are the class's keyword arguments,
as for the built-ins.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attnzoo.errors import unknown


def resolve_class(node: Mapping[str, Any], registry: Mapping[str, type], group: str, kind: str | None = None) -> type:
    """The class ``node`` builds: ``node["_target_"]`` imported if given, else ``registry[node["name"]]``.

    ``group`` is the config node (``model``, ``data``), ``kind`` what its names are called in errors (``data set``).

    Raises ``ValueError`` naming the key and the fix when the target does not import or the name is unknown.
    """
    target = node.get("_target_")
    if target is not None:
        import hydra.utils

        try:
            cls = hydra.utils.get_class(str(target))
        except Exception as err:  # Hydra's locate raises ImportError, AttributeError or ValueError
            raise ValueError(
                f"{group}._target_={target!r} is not an importable class ({err}); give a dotted path such as "
                f"my_package.my_module.MyClass, importable from where you run."
            ) from None
        return cls
    name = node.get("name")
    if name not in registry:
        raise ValueError(unknown(kind or group, name, registry))
    return registry[name]


def class_options(node: Mapping[str, Any]) -> dict[str, Any]:
    """The node's keyword arguments for the class: every key but ``name`` and ``_target_``."""
    return {str(k): v for k, v in node.items() if k not in ("name", "_target_")}
