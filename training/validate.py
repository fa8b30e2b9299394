"""Check every value of a run's configuration against the callable it feeds, before any data or model is built.

Each config node becomes the keyword arguments of one callable, so that callable's signature is the schema:

==============  ===========================================================================================
node            callable (keys = its parameters, types = its hints via ``typing.get_type_hints``)
==============  ===========================================================================================
``model``       ``attnzoo.models.MODELS[model.name]``, plus the base class's parameters when it forwards
                ``**kwargs`` (the ViT passes them to timm's ``VisionTransformer``)
``attention``   the registered layer's options (``attention_options``): the ``attention`` group, and each
                entry of ``model.attention`` (one entry, or a list with one entry per layer)
``data``        ``attnzoo.data.DATAMODULES[data.name]``
``optimizer``   ``OPTIMIZERS[optimizer.name]`` without ``params`` (what ``build_optimizer`` builds)
``scheduler``   the schedules' keyword options without ``total_steps``, which the task computes
``trainer``     the class named by ``trainer._target_`` (``lightning.Trainer``); ``callbacks``, ``logger`` and
                ``plugins`` come from their own config groups
top level       ``run()``'s own settings (``RUN_SETTINGS``)
==============  ===========================================================================================

Types: an int is accepted for a float; a bool is not an int; a list of the right length is accepted for a tuple; a
mapping with ``_target_`` for a class (Hydra instantiates it); ``null`` only where the hint allows it, except in
``model``, where ``null`` means "from the data, or the model's default". Ranges come from the argument's name
(``RANGES``, ``TRAINER_RANGES``: sizes > 0, dropout probabilities in [0, 1], ...), so a newly registered layer or
data set is checked without editing this file. Then a few rules across keys: ``dim`` divisible by ``num_heads``,
``min_<x> <= max_<x>``, fractions that sum below 1, and paths that must exist (``data.path``, ``data.root`` unless
``data.download``, ``ckpt_path``).

The first problem raises :class:`ConfigError` with one line, ``<key>: expected <what>, got <value>; e.g. <a valid
override>``, which ``run()`` prints as ``attnzoo: configuration error: ...`` before exiting with status 1.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from attnzoo.errors import unknown
from attnzoo.training.optim import warmup_cosine


class ConfigError(ValueError):
    """A run configuration that cannot work; ``run`` turns it into one message and exit status 1."""


# ------------------------------------------------------------------------------------------------------------------
# the declarative part: ranges by argument name, the optimizer and schedules, run()'s own settings


@dataclass(frozen=True)
class Range:
    """Bounds for a number (every number of a list, tuple or mapping value); ``float_le`` bounds floats only."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    float_le: float | None = None  # Lightning's limit_*_batches: an int counts batches, a float is a fraction
    example: float | None = None  # a valid value for the "e.g." part when the callable's default is None

    def __contains__(self, x: float) -> bool:
        return (
            (self.gt is None or x > self.gt)
            and (self.ge is None or x >= self.ge)
            and (self.lt is None or x < self.lt)
            and (self.le is None or x <= self.le)
            and (self.float_le is None or isinstance(x, int) or x <= self.float_le)
        )

    def __str__(self) -> str:
        """``> 0``, ``>= -1``, ``in [0, 1]``, ``in (0, 1)``."""
        lower = (self.ge, "[", ">=") if self.ge is not None else (self.gt, "(", ">") if self.gt is not None else None
        upper = (self.le, "]", "<=") if self.le is not None else (self.lt, ")", "<") if self.lt is not None else None
        if lower and upper:
            text = f"in {lower[1]}{lower[0]:g}, {upper[0]:g}{upper[1]}"
        elif lower or upper:
            bound, _, relation = lower or upper
            text = f"{relation} {bound:g}"
        else:
            text = ""
        if self.float_le is not None:
            text += f" (a float is a fraction: at most {self.float_le:g})"
        return text

    def sample(self, integer: bool) -> float:
        """A value inside the range, for examples."""
        if self.example is not None:
            return self.example
        if self.ge is not None:
            value = self.ge
        elif self.gt is not None:
            value = self.gt + 1 if integer or self.lt is None else (self.gt + self.lt) / 2
        else:
            value = 0
        if self.lt is not None and not value < self.lt:
            value = (value + self.lt) / 2
        return int(value) if integer else float(value)


POSITIVE = Range(gt=0)
NON_NEGATIVE = Range(ge=0)
PROBABILITY = Range(ge=0, le=1)

# Argument name (an fnmatch pattern) -> range, for every node but the trainer; the first matching row wins, so the
# exceptions to a pattern come before it. Counts that may be zero are listed by name; everything else that counts or
# sizes something must be positive.
RANGES: tuple[tuple[str, Range], ...] = (
    ("seed", NON_NEGATIVE),
    ("num_threads", NON_NEGATIVE),  # 0: torch's own default
    ("num_workers", NON_NEGATIVE),  # 0: load in the main process
    ("num_prefix_tokens", NON_NEGATIVE),
    ("reg_tokens", NON_NEGATIVE),
    ("ortho_scaling", NON_NEGATIVE),
    ("min_length", NON_NEGATIVE),
    ("warmup_steps", NON_NEGATIVE),
    ("weight_decay", NON_NEGATIVE),
    ("lb_coeff", NON_NEGATIVE),
    ("mlp_ratio", NON_NEGATIVE),  # 0: no MLP (mixer-only blocks)
    ("min_lr_ratio", PROBABILITY),
    ("betas", Range(ge=0, lt=1)),  # Adam's moment decays
    ("*drop*", PROBABILITY),  # dropout, attn_drop, drop_path, drop_rate, ...: probabilities
    ("*_fraction", Range(gt=0, lt=1)),
    ("num_*", POSITIVE),  # num_heads, num_kv_heads, num_classes, num_kv_pairs, num_examples' counts
    ("*_heads", NON_NEGATIVE),  # MoH's shared_heads / routed_heads may be 0
    ("dim", POSITIVE),
    ("depth", POSITIVE),
    ("*_dim", POSITIVE),
    ("*_size", POSITIVE),
    ("*_len", POSITIVE),
    ("max_*", POSITIVE),
    ("expand*", POSITIVE),
    ("*eps", POSITIVE),
    ("*_rank", POSITIVE),
    ("*_interval", POSITIVE),
    ("d_*", POSITIVE),  # Mamba's d_state, d_conv
    ("dt_*", POSITIVE),  # Mamba's dt_min, dt_max, dt_scale, dt_init_floor
    ("*_range", POSITIVE),  # Mamba-2's A_init_range
    ("lr", POSITIVE),
    ("rope_base", POSITIVE),
    ("headdim", POSITIVE),
    ("ngroups", POSITIVE),
    ("nb_features", POSITIVE),
    ("agent_num", POSITIVE),
    ("window", POSITIVE),
    ("in_chans", POSITIVE),
    ("gate_logit_normalizer", POSITIVE),
    ("power_a", POSITIVE),
)

# lightning.Trainer's arguments (its documentation): -1 means "no limit" for the epoch/step maxima
TRAINER_RANGES: tuple[tuple[str, Range], ...] = (
    ("max_epochs", Range(ge=-1, example=10)),
    ("max_steps", Range(ge=-1, example=-1)),
    ("num_sanity_val_steps", Range(ge=-1, example=2)),
    ("limit_*_batches", Range(ge=0, float_le=1.0, example=1.0)),
    ("overfit_batches", Range(ge=0, float_le=1.0)),
    ("min_*", NON_NEGATIVE),
    ("fast_dev_run", NON_NEGATIVE),
    ("reload_dataloaders_every_n_epochs", NON_NEGATIVE),
    ("gradient_clip_val", Range(ge=0, example=1.0)),
    ("num_nodes", POSITIVE),
    ("accumulate_grad_batches", POSITIVE),
    ("check_val_every_n_epoch", POSITIVE),
    ("log_every_n_steps", Range(gt=0, example=50)),
)


# What BaseTask builds from the optimizer / scheduler configs (training/base.py, training/optim.py), and the
# arguments the task fills in itself: the model's parameter groups, the step and the run's total steps.
OPTIMIZERS: dict[str, Callable[..., Any]] = {"adamw": torch.optim.AdamW}
SCHEDULERS: dict[str, Callable[..., Any] | None] = {"warmup_cosine": warmup_cosine, "constant": None}
SET_BY_TASK = ("params", "step", "total_steps")

# run()'s own top-level settings: name -> type hint
RUN_SETTINGS: dict[str, Any] = {
    "seed": int | None,
    "num_threads": int | None,
    "tune_malloc": bool,
    "compile": bool,
    "ckpt_path": str | None,
    "optimized_metric": str | None,
    "task_name": str,
}

# Trainer arguments that run() sets itself, and where the user sets them instead
TRAINER_SET_BY_RUN = {  # argument -> (who sets it, an override of that instead)
    "callbacks": ("the callbacks group (callbacks.<name>.<arg>=...)", "callbacks=none"),
    "logger": ("the logger group", "logger=tensorboard"),
    "plugins": ("run() (atomic checkpoint writes, weights-only loads)", None),
}


# ------------------------------------------------------------------------------------------------------------------
# types: does a config value fit a hint, and how to say what a hint wants


_UNION_TYPES = (Union, types.UnionType)


def _is_pathlike(hint: Any) -> bool:
    return isinstance(hint, type) and (issubclass(hint, os.PathLike) or issubclass(hint, Path))


def matches(value: Any, hint: Any) -> bool:
    """True if a plain config value (None, bool, int, float, str, list, dict) can be passed where ``hint`` is."""
    if hint is Any or hint is inspect.Parameter.empty or isinstance(hint, (str, typing.TypeVar, typing.ForwardRef)):
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in _UNION_TYPES:
        return any(matches(value, a) for a in args)
    if origin is typing.Annotated:
        return matches(value, args[0])
    if origin is Literal:  # type equality first, so True does not pass for 1
        return any(type(value) is type(a) and value == a for a in args)
    if hint is None or hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if _is_pathlike(hint):
        return isinstance(value, str)
    if origin is tuple or hint is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if not args:
            return True
        if len(args) == 2 and args[1] is Ellipsis:
            return all(matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args))
    if origin in (list, Sequence, Iterable) or hint is list:
        return isinstance(value, (list, tuple)) and all(matches(v, args[0]) for v in value if args)
    if origin in (dict, Mapping) or hint is dict:
        if not isinstance(value, dict):
            return False
        return not args or all(matches(k, args[0]) and matches(v, args[1]) for k, v in value.items())
    if isinstance(value, dict) and "_target_" in value:
        return True  # Hydra instantiates it; what it builds is checked by the callable itself
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a typing construct a config value cannot be checked against (Callable, Protocol, ...)


def _is_class(hint: Any) -> bool:
    """A class that no config value is (not a builtin, a path or a generic alias): a Tensor, a Strategy."""
    return isinstance(hint, type) and hint not in (bool, int, float, str, list, tuple, dict) and not _is_pathlike(hint)


def _plural(hint: Any) -> str:
    words = {"an integer": "integers", "a number": "numbers", "true or false": "booleans", "a string": "strings"}
    text = describe(hint)
    return words.get(text, text)


def _singular(hint: Any) -> str:
    """``integer`` for ``an integer``: the words inside ``a mapping {string: integer}``."""
    return describe(hint).removeprefix("an ").removeprefix("a ")


def describe(hint: Any) -> str:
    """What a hint wants, in the words of a config file: ``an integer``, ``a list of 2 numbers``, ``null``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in _UNION_TYPES:
        members = [a for a in args if a is not type(None)]
        if any(not _is_class(a) for a in members):  # a Tensor or Strategy object is not what a config file holds
            members = [a for a in members if not _is_class(a)]
        literals = [v for a in members if typing.get_origin(a) is Literal for v in typing.get_args(a)]
        parts = [describe(a) for a in members if typing.get_origin(a) is not Literal]
        parts += [describe(Literal[tuple(literals)])] if literals else []
        if "a number" in parts and "an integer" in parts:
            parts.remove("an integer")
        return " or ".join([*dict.fromkeys(parts), *(["null"] if type(None) in args else [])])
    if origin is typing.Annotated:
        return describe(args[0])
    if origin is Literal:  # Lightning's precision takes both 32 and "32": say it once
        return "one of " + ", ".join(dict.fromkeys(_format_value(a) for a in args))
    if hint is None or hint is type(None):
        return "null"
    simple = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Any: "any value"}
    if hint in simple:
        return simple[hint]
    if _is_pathlike(hint):
        return "a path"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        if len(set(args)) == 1:
            return f"a list of {len(args)} {_plural(args[0])}"
        return f"a list [{', '.join(describe(a) for a in args)}]"
    if origin in (list, Sequence, Iterable):
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin in (dict, Mapping):
        return f"a mapping {{{_singular(args[0])}: {_singular(args[1])}}}" if args else "a mapping"
    if isinstance(hint, type):
        return f"a {hint.__name__} (a mapping with _target_)"
    return str(hint)


def _numbers(value: Any) -> list[float]:
    """The numbers inside a value (itself, a list's or a mapping's values), never bools."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _numbers(v)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    return []


def _without_none(hint: Any) -> Any:
    if typing.get_origin(hint) in _UNION_TYPES:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else Union[tuple(args)]  # noqa: UP007  (a runtime-built union)
    return hint


def _allows_none(hint: Any) -> bool:
    return matches(None, hint)


def expected(hint: Any, rng: Range | None) -> str:
    """``an integer > 0``, ``a number in [0, 1] or null``, ``a list of 2 integers, each > 0``."""
    base = describe(_without_none(hint))
    if rng is not None and str(rng):
        base = f"{base} {rng}" if base in ("an integer", "a number") else f"{base}, each number {rng}"
    return f"{base} or null" if _allows_none(hint) and _without_none(hint) is not hint else base


def _got(value: Any) -> str:
    if value is None:
        return "null"
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a mapping"}
    if isinstance(value, str):
        try:
            float(value)
            return f"{value!r} (a string: quoted numbers stay strings, write it without quotes)"
        except ValueError:
            return f"{value!r} (a string)"
    return f"{_format_value(value)} ({kind.get(type(value), 'a value')})"


def _format_value(value: Any) -> str:
    """A value as the Hydra command line writes it: true, null, 0.001, [0.9,0.95], {name:gla,expand_k:0.5}."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def override(key: str, value: Any) -> str:
    """``key=value`` for the shell: single-quoted if it holds characters the shell or Hydra's parser would split."""
    text = f"{key}={_format_value(value)}"
    return f"'{text}'" if any(c in text for c in "[]{}(),*<> ") else text


# ------------------------------------------------------------------------------------------------------------------
# signatures: the parameters a callable takes, with hints and defaults


@dataclass(frozen=True)
class Param:
    hint: Any
    default: Any  # inspect.Parameter.empty if required


def signature_params(fn: Callable[..., Any], skip: Iterable[str] = ()) -> dict[str, Param]:
    """Keyword parameters of ``fn`` (a class: its ``__init__``), following ``**kwargs`` into the base classes."""
    skip = {"self", *skip}
    params: dict[str, Param] = {}
    targets = [c.__init__ for c in fn.__mro__ if c is not object] if isinstance(fn, type) else [fn]
    for target in targets:
        try:
            hints = typing.get_type_hints(target)
        except Exception:  # unresolvable forward references: fall back to the annotations that are not strings
            hints = {}
        forwards = False
        for p in inspect.signature(target).parameters.values():
            if p.kind is p.VAR_KEYWORD:
                forwards = True
            elif p.name not in skip and p.name not in params and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
                params[p.name] = Param(hints.get(p.name, p.annotation), p.default)
        if not forwards:
            break
    return params


def range_for(name: str, table: tuple[tuple[str, Range], ...]) -> Range | None:
    return next((rng for pattern, rng in table if fnmatch.fnmatchcase(name, pattern)), None)


# ------------------------------------------------------------------------------------------------------------------
# the checks


def _fail(key: str, message: str, example: str | None) -> ConfigError:
    return ConfigError(f"{key}: {message}" + (f"; e.g. {example}" if example else ""))


def _sample(hint: Any, rng: Range | None) -> Any:
    """A value that fits ``hint`` and ``rng``, for examples when the callable's default does not."""
    hint = _without_none(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in _UNION_TYPES:
        return _sample(args[0], rng)
    if origin is Literal:
        return args[0]
    if hint is bool:
        return True
    if hint in (int, float):
        return (rng or Range()).sample(integer=hint is int)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return [_sample(a, rng) for a in args]
    return None


def _repaired(value: Any, rng: Range) -> Any:
    """``value`` with every number outside ``rng`` replaced by one inside it."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return value if value in rng else rng.sample(integer=isinstance(value, int))
    if isinstance(value, (list, tuple)):
        return [_repaired(v, rng) for v in value]
    if isinstance(value, dict):
        return {k: _repaired(v, rng) for k, v in value.items()}
    return value


def check_value(key: str, value: Any, param: Param, rng: Range | None, example: Callable[[Any], str]) -> None:
    """Raise if ``value`` does not fit the parameter's hint or ``rng``; ``example(v)`` spells an override."""
    in_range = rng is None or all(n in rng for n in _numbers(value))
    if matches(value, param.hint) and in_range:
        return
    good = param.default
    if (
        good is None
        or good is inspect.Parameter.empty
        or not (matches(good, param.hint) and (rng is None or all(n in rng for n in _numbers(good))))
    ):
        # the given value with its out-of-range numbers replaced, when only the range failed; else a fresh sample
        good = _repaired(value, rng) if matches(value, param.hint) and rng is not None else _sample(param.hint, rng)
    if isinstance(good, tuple):
        good = list(good)
    raise _fail(
        key, f"expected {expected(param.hint, rng)}, got {_got(value)}", None if good is None else example(good)
    )


def _raise_unknown(key: str, name: str, owner: str, valid: Iterable[str], example: Callable[[str], str | None]) -> None:
    """``<key>: unknown option 'x' of <owner>. Did you mean 'y'? Valid: ...; e.g. <override>``."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    # no close spelling: still show one valid override (the option that shares the most characters)
    guess = (
        close[0] if close else max(valid, key=lambda v: difflib.SequenceMatcher(None, name, v).ratio(), default=None)
    )
    hint = f" Did you mean {close[0]!r}?" if close else ""
    message = f"unknown option {name!r} of {owner}.{hint} Valid: {', '.join(valid)}"
    raise _fail(key, message, example(guess) if guess else None)


def check_node(
    prefix: str,
    values: dict[str, Any],
    params: dict[str, Param],
    owner: str,
    *,
    table: tuple[tuple[str, Range], ...] = RANGES,
    none_means_default: bool = False,
    ignore: Iterable[str] = ("name",),
    spell: Callable[[str, Any], str] | None = None,
) -> None:
    """Check one node's keys against ``params`` and its values against their hints and ranges.

    Args:
        prefix: the node's key, e.g. ``model`` or ``model.attention[1]``.
        values: the node as plain Python values.
        params: what the callable takes (``signature_params``).
        owner: what takes the options, in messages: ``model gpt``, ``attention softmax``, ``Trainer``.
        table: ranges by argument name.
        none_means_default: a ``null`` value is always fine (the model node: "from the data").
        ignore: keys that select the callable rather than feed it.
        spell: ``spell(option, value) -> override`` for the "e.g." part (default ``prefix.option=value``).
    """
    spell = spell or (lambda option, v: override(f"{prefix}.{option}", v))
    ignore = set(ignore)

    def spell_known(option: str) -> str | None:
        value = values.get(option, params[option].default)
        return spell(option, value) if value is not inspect.Parameter.empty else None

    for option, value in values.items():
        if option in ignore:
            continue
        key = f"{prefix}.{option}"
        if option not in params:
            _raise_unknown(key, option, owner, params, spell_known)
        if value is None and none_means_default:
            continue
        rng = range_for(option, table)
        check_value(key, value, params[option], rng, lambda v, option=option: spell(option, v))
    _check_across(prefix, values, spell)


def _check_across(prefix: str, values: dict[str, Any], spell: Callable[[str, Any], str]) -> None:
    """Rules that involve two keys of one node: width % heads, min <= max, fractions below 1 together."""
    numeric = {k: v for k, v in values.items() if _numbers(v) == [v]}
    heads = numeric.get("num_heads")
    width_key = next((k for k in ("dim", "embed_dim") if k in numeric), None)
    if width_key and heads and isinstance(heads, int) and values[width_key] % heads:
        width = values[width_key]
        divisors = [d for d in range(1, width + 1) if width % d == 0]
        nearest = min(divisors, key=lambda d: (abs(d - heads), d))
        raise _fail(
            f"{prefix}.num_heads",
            f"expected a divisor of {prefix}.{width_key}={width} ({', '.join(map(str, divisors[:12]))}"
            f"{', ...' if len(divisors) > 12 else ''}), got {heads}",
            spell("num_heads", nearest),
        )
    pairs = [(k, "max_" + k[4:]) for k in numeric if k.startswith("min_")]
    pairs += [(k, k[:-4] + "_max") for k in numeric if k.endswith("_min")]  # Mamba's dt_min / dt_max
    for low_key, high_key in sorted(pairs):
        # a negative maximum is Lightning's "no limit" (max_epochs=-1, max_steps=-1)
        if high_key in numeric and 0 <= numeric[high_key] < numeric[low_key]:
            low = numeric[low_key]
            raise _fail(
                f"{prefix}.{low_key}",
                f"expected at most {prefix}.{high_key}={numeric[high_key]}, got {low}",
                spell(high_key, 2 * low),
            )
    fractions = sorted(k for k in numeric if k.endswith("_fraction"))
    if len(fractions) > 1 and sum(numeric[k] for k in fractions) >= 1:
        total = " + ".join(f"{prefix}.{k}" for k in fractions)
        raise _fail(
            f"{prefix}.{fractions[-1]}",
            f"expected {total} < 1 (the rest is training data), got {sum(numeric[k] for k in fractions):g}",
            spell(fractions[-1], round((1 - sum(numeric[k] for k in fractions[:-1])) / 2, 3)),
        )


def _plain(node: Any, key: str) -> Any:
    """A config node as plain Python values; an interpolation that does not resolve is named."""
    if not isinstance(node, (DictConfig, ListConfig)):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{key}: cannot resolve an interpolation: {str(err).splitlines()[0]}") from None


def _path_exists(key: str, value: Any, what: str, example: str, *, is_file: bool = False) -> None:
    if value is None:
        return
    path = Path(str(value)).expanduser()
    if path.is_file() if is_file else path.exists():
        return
    where = path.parent.resolve()  # relative paths start from the directory the run was started in
    missing = f"{path.name} does not exist in {where}" if where.is_dir() else f"{where} does not exist"
    raise _fail(key, f"expected an existing {what}, got {str(value)!r}: {missing}", example)


# ------------------------------------------------------------------------------------------------------------------
# the nodes


def _check_run_settings(cfg: DictConfig) -> None:
    for name, hint in RUN_SETTINGS.items():
        if name in cfg:
            value = _plain(cfg[name], name)
            check_value(
                name,
                value,
                Param(hint, inspect.Parameter.empty),
                range_for(name, RANGES),
                lambda v, n=name: override(n, v),
            )
    _path_exists(
        "ckpt_path",
        cfg.get("ckpt_path"),
        "checkpoint file written by a run",
        "ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt",
        is_file=True,
    )


def _target_class(group: str, target: Any) -> type:
    import hydra.utils

    try:
        return hydra.utils.get_class(str(target))
    except Exception as err:  # ImportError, AttributeError, ValueError from Hydra's locate
        raise _fail(
            f"{group}._target_",
            f"expected an importable class, got {target!r} ({err})",
            f"{group}._target_=my_package.my_module.MyClass",
        ) from None


def _check_model(model: dict[str, Any]) -> None:
    from attnzoo.models import MODELS

    name = model.get("name")
    if model.get("_target_") is not None:  # a user's class: its own signature is the contract
        cls = _target_class("model", model["_target_"])
        name = cls.__name__
    elif name not in MODELS:
        close = difflib.get_close_matches(str(name), MODELS, n=1)
        raise _fail("model.name", unknown("model", name, MODELS).rstrip("."), f"model={close[0] if close else 'gpt'}")
    else:
        cls = MODELS[name]
    params = signature_params(cls)
    values = {k: v for k, v in model.items() if k != "attention"}
    check_node("model", values, params, f"model {name}", none_means_default=True, ignore=("name", "_target_"))
    attention = model.get("attention")
    depth = model.get("depth")
    if isinstance(attention, list) and isinstance(depth, int) and len(attention) != depth:
        raise _fail(
            "model.attention",
            f"expected one entry per layer (model.depth={depth}), got {len(attention)} entries",
            f"model.depth={len(attention)}",
        )


def _spell_entry(entries: Any, index: int | None) -> Callable[[str | None, Any], str]:
    """Overrides for one entry of ``model.attention``: the whole value, rewritten with the fixed option."""

    def spell(option: str | None, value: Any) -> str:
        entry = entries if index is None else entries[index]
        fixed = {**entry, option: value} if isinstance(entry, dict) and option is not None else value
        if index is None:
            return override("model.attention", fixed)
        return override("model.attention", [fixed if i == index else e for i, e in enumerate(entries)])

    return spell


def _check_attention_entry(key: str, entry: Any, spell: Callable[[str | None, Any], str]) -> None:
    from attnzoo.layers import attention_class, list_attention
    from attnzoo.layers.registry import CONTRACT_ARGS

    registered = list_attention()
    name = entry.get("name") if isinstance(entry, dict) else entry
    name_key = f"{key}.name" if isinstance(entry, dict) else key
    if isinstance(entry, dict) and "name" not in entry:
        raise _fail(key, "expected a mapping with a 'name' key (a registered attention)", spell("name", "softmax"))
    if not isinstance(name, str):
        raise _fail(name_key, f"expected a registered attention name, got {_got(name)}", spell(None, "softmax"))
    if name not in registered:
        close = difflib.get_close_matches(name, registered, n=1)
        fix = close[0] if close else "softmax"
        raise _fail(name_key, unknown("attention", name, registered).rstrip("."), spell("name", fix))
    if isinstance(entry, dict):
        for option in CONTRACT_ARGS:
            if option in entry:
                raise _fail(
                    f"{key}.{option}",
                    f"is set by the model for every layer (dim and num_heads from the model config, causal and cross "
                    f"from the backbone), not by the attention config; got {_got(entry[option])}",
                    "model.dim=64 model.num_heads=4" if option in ("dim", "num_heads") else "model=gpt (causal)",
                )
        cls = attention_class(name)
        check_node(key, entry, signature_params(cls, skip=CONTRACT_ARGS), f"attention {name}", spell=spell)


def _check_attention(cfg: DictConfig, model: dict[str, Any] | None) -> None:
    group = _plain(cfg.get("attention"), "attention")
    if group:

        def spell_group(option: str | None, value: Any) -> str:
            return f"attention={value}" if option in (None, "name") else override(f"attention.{option}", value)

        _check_attention_entry("attention", group, spell_group)
    explicit = (model or {}).get("attention")
    if explicit is None:
        return
    if isinstance(explicit, list):
        for i, entry in enumerate(explicit):
            _check_attention_entry(f"model.attention[{i}]", entry, _spell_entry(explicit, i))
    elif isinstance(explicit, (str, dict)):
        _check_attention_entry("model.attention", explicit, _spell_entry(explicit, None))
    else:
        raise _fail(
            "model.attention",
            f"expected a name, a mapping with a 'name' key, or a list of those, got {_got(explicit)}",
            "'model.attention=[softmax,{name:softmax,rope:false}]'",
        )


def _check_data(data: dict[str, Any]) -> None:
    from attnzoo.data import DATAMODULES

    name = data.get("name")
    if data.get("_target_") is not None:  # a user's DataModule: its own signature is the contract
        cls = _target_class("data", data["_target_"])
        check_node("data", data, signature_params(cls), f"data module {cls.__name__}", ignore=("name", "_target_"))
        return
    if name not in DATAMODULES:
        close = difflib.get_close_matches(str(name), DATAMODULES, n=1)
        raise _fail(
            "data.name", unknown("data set", name, DATAMODULES).rstrip("."), f"data={close[0] if close else 'mqar'}"
        )
    check_node("data", data, signature_params(DATAMODULES[name]), f"data set {name}")
    _path_exists("data.path", data.get("path"), "file or folder", "data.path=null")
    if not data.get("download", False):
        _path_exists("data.root", data.get("root"), "folder (or data.download=true)", "data.download=true")


def _check_named(
    prefix: str, node: dict[str, Any], builders: dict[str, Callable[..., Any] | None], every_option: bool
) -> None:
    """The optimizer or scheduler node: ``name`` picks the builder (None: takes no options); options are its keywords.

    ``every_option``: accept the options of every builder (train.yaml keeps warmup_steps when scheduler.name=constant).
    """
    name = node.get("name")
    if name not in builders:
        close = difflib.get_close_matches(str(name), builders, n=1)
        raise _fail(
            f"{prefix}.name",
            unknown(prefix, name, builders).rstrip("."),
            override(f"{prefix}.name", close[0] if close else next(iter(builders))),
        )
    chosen = [builders[name]] + ([b for b in builders.values() if b is not builders[name]] if every_option else [])
    params: dict[str, Param] = {}
    for builder in filter(None, chosen):
        for key, param in signature_params(builder, skip=SET_BY_TASK).items():
            params.setdefault(key, param)
    check_node(prefix, node, params, f"{prefix} {name}")


def _check_trainer(trainer: dict[str, Any]) -> None:
    import hydra.utils

    target = trainer.get("_target_", "lightning.pytorch.Trainer")
    try:
        trainer_cls = hydra.utils.get_class(target)
    except Exception as err:  # ImportError, AttributeError, ValueError from Hydra's locate
        raise _fail(
            "trainer._target_", f"expected an importable class, got {target!r} ({err})", "trainer=cpu"
        ) from None
    for key, (where, instead) in TRAINER_SET_BY_RUN.items():
        if key in trainer:
            raise _fail(f"trainer.{key}", f"is set by {where}, not by the trainer config: remove it", instead)
    params = signature_params(trainer_cls, skip=TRAINER_SET_BY_RUN)
    check_node("trainer", trainer, params, trainer_cls.__name__, table=TRAINER_RANGES, ignore=("_target_",))


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first value that the callable it feeds would not accept (module docstring).

    Nothing is built and no file is written; only ``ckpt_path``, ``data.path`` and ``data.root`` are looked up.
    """
    _check_run_settings(cfg)
    model = _plain(cfg.get("model"), "model")
    if isinstance(model, dict):
        _check_model(model)
    _check_attention(cfg, model if isinstance(model, dict) else None)
    data = _plain(cfg.get("data"), "data")
    if isinstance(data, dict):
        _check_data(data)
    for prefix, builders, every_option in (("optimizer", OPTIMIZERS, False), ("scheduler", SCHEDULERS, True)):
        node = _plain(cfg.get(prefix), prefix)
        if isinstance(node, dict):
            _check_named(prefix, node, builders, every_option)
    trainer = _plain(cfg.get("trainer"), "trainer")
    if isinstance(trainer, dict):
        _check_trainer(trainer)
