"""``summary.json`` of a run and the comparison table of several runs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from attnzoo.layers import split_spec


def attention_names(model_cfg: dict[str, Any]) -> list[str]:
    """The attention name of every layer, e.g. ``["gla", "gla", "softmax"]``."""
    from attnzoo.models import per_layer

    depth = int(model_cfg.get("depth", 1))
    return [split_spec(spec)[0] for spec in per_layer(model_cfg["attention"], depth)]


def write_summary(path: str | Path, summary: dict[str, Any]) -> Path:
    path = Path(path)
    path.write_text(json.dumps(summary, indent=2, sort_keys=False, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _attention_label(summary: dict[str, Any]) -> str:
    names = summary.get("attention") or []
    if names and all(n == names[0] for n in names):
        return str(names[0])
    return ",".join(names)


def comparison_table(summaries: list[dict[str, Any]]) -> str:
    """A Markdown table, one row per run: attention, params, test metrics, val metric, tokens/s, wall time."""
    metric_keys: list[str] = []
    for s in summaries:
        for key in s.get("test_metrics", {}):
            if key not in metric_keys:
                metric_keys.append(key)
    header = ["job", "attention", "overrides", "params", *metric_keys, "train tok/s", "wall s"]
    rows = []
    for s in summaries:
        metrics = s.get("test_metrics", {})
        rows.append(
            [
                str(s.get("job", "")),
                _attention_label(s),
                " ".join(s.get("overrides", [])) or "-",
                _fmt(s.get("params")),
                *[_fmt(metrics.get(k)) for k in metric_keys],
                _fmt(s.get("train_tokens_per_s")),
                _fmt(s.get("wall_time_s")),
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join(lines)
