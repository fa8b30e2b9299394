"""Draw the figures of docs/benchmarks.md whose benchmark script does not plot, from the tables in that file.

``python scripts/plot_benchmarks.py`` reads each table named in ``FIGURES`` (by its section heading and its position
in the section), takes the numbers out of the cells (``6,048 ms`` -> 6048, ``**139x**`` -> 139) and writes one PNG
per table under ``docs/bench/figures/``. The tables are the published numbers, so a figure changes only when its
table does; re-run this after editing one. The scripts that plot (bench_attention, bench_decode, bench_mqar) write
their own PNGs next to their results.
"""

from __future__ import annotations

import argparse
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

from attnzoo.extras import require

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class Figure:
    """One grouped bar chart of a table: a bar group per row, a bar per value column."""

    name: str  # the PNG's file name, without .png
    section: str  # the start of the heading of the section that holds the table
    table: int  # which table of that section (0 = the first)
    labels: tuple[str, ...]  # columns joined into each row's label
    values: tuple[str, ...]  # the columns drawn as bars
    ylabel: str
    title: str
    log: bool = False
    reference: float | None = None  # a horizontal line, e.g. ratio 1.0


FIGURES = (
    Figure(
        "delta_rule",
        "## 1. Kernels",
        1,
        ("method", "T"),
        ("fwd+bwd ms, 1 thread", "fwd+bwd ms, 2 threads"),
        "fwd+bwd time (ms, log scale)",
        "delta_rule ops against SDPA causal and their recurrent reference (B=1, H=4, D=64)",
        log=True,
    ),
    Figure(
        "selective_scan",
        "## 2. Selective scan",
        0,
        ("L", "pass"),
        ("sequential reference", "chunked torch"),
        "time (ms, log scale)",
        "selective_scan against its sequential reference (B=1, D=256, N=16)",
        log=True,
    ),
    Figure(
        "selective_scan_steps",
        "## 2. Selective scan",
        1,
        ("steps (delta)",),
        ("previous kernel", "this kernel"),
        "fwd+bwd time (ms)",
        "selective_scan by step size (batch 64, E=128, N=16, L=128, 1 thread)",
    ),
    Figure(
        "models",
        "## 5. Models",
        0,
        ("part",),
        ("ratio",),
        "attnzoo / anchor (higher is better)",
        "Models against their anchors (2 threads)",
        reference=1.0,
    ),
    Figure(
        "mqar_step_time",
        "## 6. Recall versus state size",
        1,
        ("model",),
        ("1 thread", "2 threads"),
        "training step (s)",
        "MQAR training step at T=128 by threads",
    ),
    Figure(
        "linearize_mqar",
        "## 8. Linearizing",
        0,
        ("model",),
        ("right after the swap", "after fine-tune (val / test)", "from scratch, 500 steps (test)"),
        "accuracy (fine-tune: validation)",
        "MQAR: linearized models against the softmax teacher (dashed, 0.996)",
        reference=0.996,
    ),
    Figure(
        "linearize_text",
        "## 8. Linearizing",
        1,
        ("model",),
        (
            "right after the swap",
            "after transfer",
            "after fine-tune (val / test)",
            "from scratch, 99 steps (val / test)",
        ),
        "validation bits per byte (lower is better)",
        "gpt_text linearized to gla against the teacher (dashed, 2.673)",
        reference=2.673,
    ),
    Figure(
        "linearize_vit",
        "## 8. Linearizing",
        2,
        ("model",),
        (
            "right after the swap",
            "after transfer",
            "after fine-tune (val / test)",
            "from scratch, 300 steps (val / test)",
        ),
        "validation accuracy",
        "vit_digits linearized to gla against the teacher (dashed, 0.994)",
        reference=0.994,
    ),
    Figure(
        "linearize_decode",
        "## 8. Linearizing",
        3,
        ("model", "context"),
        ("ms / token",),
        "ms / token",
        "Decode time per token, teachers and linearized models (batch 1, 1 thread)",
    ),
)


def section_tables(text: str, heading: str) -> list[list[dict[str, str]]]:
    """The Markdown tables of the section whose heading starts with ``heading``, as lists of {column: cell}."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(heading)]
    if len(starts) != 1:
        raise SystemExit(f"{DOC}: expected one section starting with {heading!r}, found {len(starts)}.")
    end = next((i for i in range(starts[0] + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tables, block = [], []
    for line in [*lines[starts[0] + 1 : end], ""]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif block:
            header, rows = block[0], block[2:]  # block[1] is the |---| separator
            tables.append([dict(zip(header, row)) for row in rows])
            block = []
    return tables


def number(cell: str) -> float:
    match = NUMBER.search(cell.replace("**", ""))
    if match is None:
        raise SystemExit(f"{DOC}: no number in table cell {cell!r}.")
    return float(match.group().replace(",", ""))


def label(cell: str) -> str:
    """A cell as a short tick label: no Markdown, no trailing details (after ': ' or ' ('), wrapped."""
    text = cell.replace("**", "").replace("`", "").split(": ")[0].split(" (")[0]
    return textwrap.fill(text, 16)


def value_label(height: float) -> str:
    return f"{height:,.0f}" if height >= 100 else f"{height:.3g}"


def draw(figure: Figure, rows: list[dict[str, str]], path: Path) -> None:
    matplotlib = require("matplotlib", "scripts/plot_benchmarks.py")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for column in (*figure.labels, *figure.values):
        if column not in rows[0]:
            raise SystemExit(f"{DOC}: table {figure.table} of {figure.section!r} has no column {column!r}.")
    labels = [", ".join(label(row[c]) for c in figure.labels) for row in rows]
    width = 0.8 / len(figure.values)
    colours = (
        ("tab:blue",) if len(figure.values) == 1 else ("0.55", "tab:blue", "tab:orange", "tab:green")
    )  # grey: the baseline
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(rows) + 2), 3.8))
    for k, column in enumerate(figure.values):
        heights = [number(row[column]) for row in rows]
        xs = [i + (k - (len(figure.values) - 1) / 2) * width for i in range(len(rows))]
        bars = ax.bar(xs, heights, width, label=column, color=colours[k % len(colours)])
        ax.bar_label(bars, labels=[value_label(h) for h in heights], fontsize=7, padding=1)
    if figure.reference is not None:
        ax.axhline(figure.reference, color="black", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_yscale("log" if figure.log else "linear")
    ax.set_ylabel(figure.ylabel)
    ax.set_title(figure.title, fontsize=9)
    if len(figure.values) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DOC.parent / "bench" / "figures")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text()
    for figure in FIGURES:
        tables = section_tables(text, figure.section)
        if figure.table >= len(tables):
            raise SystemExit(f"{DOC}: {figure.section!r} has {len(tables)} tables, not {figure.table + 1}.")
        path = args.out / f"{figure.name}.png"
        draw(figure, tables[figure.table], path)
        print(path)


if __name__ == "__main__":
    main()
