"""Recall versus state size: a Zoology-style MQAR sweep sized for a CPU.

For every attention (default: every registered causal one) x model width x (sequence length, key-value pairs) cell,
a two-layer GPT is trained on MQAR (:func:`attnzoo.data.mqar.generate_mqar`) for each learning rate of a small
grid; the cell's score is the best test accuracy over the learning rates (Zoology's protocol). A run stops early once
its validation accuracy reaches ``--target``. Output: a Markdown table, a heatmap per width, and accuracy against the
decoding state size (``state_size`` of the layers, summed over layers) — the plot of Zoology's Figure 2.

Sizes. Every model is a 2-layer GPT with mixer-only blocks (as the main MQAR run; ``--mlp-ratio 4`` adds MLPs),
width // 32 heads, vocabulary 512, batch 64, the main run's AdamW and warmup + cosine schedule, and the layers' options
from ``configs/attention/<name>.yaml``. Measured on this 2-core CPU: softmax at width 64 needs ~1,400 steps at lr 2e-2
to pass 0.99 on (64, 4) (1,900 at 1e-2; 3e-3 stays below 0.98 after 2,000) and ~1,100 on (128, 8) — MQAR is learned
late and suddenly, so a step budget below that measures nothing.

The default grid (``python scripts/bench_mqar.py``) is the part of Zoology's grid sized for an hour on 2 cores: every
causal attention x width 64 x cells (64, 4) and (128, 8), lr 2e-2, up to 1,500 steps. Measured: 57.5 min with 2
workers (114 worker-minutes), mamba's (128, 8) cell alone 19 (docs/benchmarks.md §6).
``--full`` is the whole CPU-sized grid: widths 32/64/128 x cells (64, 4), (128, 8), (256, 16) x lrs 3e-3/1e-2/2e-2,
up to 2,000 steps (about a day on 2 cores). Results are appended to ``runs.json`` after every cell, so an interrupted
sweep resumes where it stopped (``--fresh`` starts over).

    python scripts/bench_mqar.py --out bench_results/mqar
    python scripts/bench_mqar.py --attention softmax gla --widths 64 --cells 64x4 128x8
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from attnzoo.allocator import tune_malloc
from attnzoo.data.mqar import generate_mqar, split_seed
from attnzoo.extras import require
from attnzoo.layers import list_attention
from attnzoo.models import GPT
from attnzoo.training.optim import build_optimizer, warmup_cosine
from attnzoo.training.run import attention_defaults


def accuracy(model: GPT, data: dict[str, torch.Tensor], batch: int = 256) -> float:
    correct = total = 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(data["input_ids"]), batch):
            ids, labels = data["input_ids"][i : i + batch], data["labels"][i : i + batch]
            pred = model(ids).argmax(-1)
            scored = labels != -100
            correct += (pred[scored] == labels[scored]).sum().item()
            total += scored.sum().item()
    model.train()
    return correct / max(total, 1)


def build_model(name: str, width: int, seq_len: int, args: argparse.Namespace) -> GPT:
    torch.manual_seed(0)
    heads = args.heads or max(1, width // 32)
    # the layer's options as the command line uses them (configs/attention/<name>.yaml: RoPE for softmax, ...)
    spec = attention_defaults(name)
    return GPT(
        args.vocab, dim=width, depth=2, num_heads=heads, attention=spec, max_seq_len=seq_len, mlp_ratio=args.mlp_ratio
    )


def probe_seconds(job: tuple[str, int, int, int, argparse.Namespace]) -> float:
    """A job's cost if no run stops early: the median of 3 timed training steps x steps x learning rates."""
    name, width, seq_len, _, args = job
    torch.set_num_threads(args.threads)
    tune_malloc()
    model = build_model(name, width, seq_len, args)
    tokens = torch.randint(0, args.vocab, (args.batch, seq_len), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(4):  # the first step pays for lazy initialisation
        start = time.perf_counter()
        F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[1] * args.max_steps * len(args.lrs)


def train_one(name: str, width: int, seq_len: int, pairs: int, lr: float, args: argparse.Namespace) -> dict:
    common = dict(vocab_size=args.vocab, input_seq_len=seq_len, num_kv_pairs=pairs)
    train = generate_mqar(**common, num_examples=args.train_examples, seed=split_seed(0, "train"))
    val = generate_mqar(**common, num_examples=256, seed=split_seed(0, "val"))
    test = generate_mqar(**common, num_examples=args.test_examples, seed=split_seed(0, "test"))
    model = build_model(name, width, seq_len, args)
    # the main run's optimiser and schedule (configs/train.yaml): AdamW (0.9, 0.95), weight decay 0.1 on matrices,
    # linear warmup then cosine to 0.1 x lr
    opt = build_optimizer(model, {"lr": lr, "weight_decay": 0.1, "betas": (0.9, 0.95)})
    warmup = min(100, args.max_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, warmup_steps=warmup, total_steps=args.max_steps, min_lr_ratio=0.1)
    )
    n, start, step, val_acc = len(train["input_ids"]), time.perf_counter(), 0, 0.0
    gen = torch.Generator().manual_seed(1)
    while step < args.max_steps:
        idx = torch.randint(0, n, (args.batch,), generator=gen)
        logits = model(train["input_ids"][idx])
        loss = F.cross_entropy(logits.flatten(0, 1), train["labels"][idx].flatten(), ignore_index=-100)
        if model.aux_loss is not None:
            loss = loss + model.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        if step % args.eval_every == 0:
            val_acc = accuracy(model, val)
            if val_acc >= args.target:
                break
    state = sum(block.attn.state_size(seq_len) for block in model.blocks)
    return {
        "attention": name,
        "width": width,
        "seq_len": seq_len,
        "pairs": pairs,
        "lr": lr,
        "steps": step,
        "val_acc": val_acc,
        "test_acc": accuracy(model, test),
        "state_size": state,
        "seconds": time.perf_counter() - start,
    }


def run_cell(job: tuple[str, int, int, int, argparse.Namespace]) -> list[dict]:
    """Every learning rate of one (attention, width, cell), stopping at the first that solves it."""
    name, width, seq_len, pairs, args = job
    torch.set_num_threads(args.threads)
    tune_malloc()  # opt-in (train.py: tune_malloc=true): the published numbers reuse freed CPU memory
    runs = []
    for lr in args.lrs:
        runs.append(train_one(name, width, seq_len, pairs, lr, args))
        if runs[-1]["val_acc"] >= args.target:
            break  # a solved cell cannot improve by much with another learning rate; save the time
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention", nargs="*", default=None, help="default: every causal_self attention")
    parser.add_argument("--widths", nargs="*", type=int, default=None)
    parser.add_argument("--cells", nargs="*", default=None, help="SEQLENxPAIRS (default: 64x4 128x8)")
    parser.add_argument("--lrs", nargs="*", type=float, default=None)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--full", action="store_true", help="widths 32/64/128, 3 cells, lrs 3e-3/1e-2/2e-2, 2000 steps")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default: width // 32)")
    parser.add_argument("--mlp-ratio", type=float, default=0.0, help="0 = mixer-only blocks, as the main MQAR run")
    parser.add_argument("--train-examples", type=int, default=20000)
    parser.add_argument("--test-examples", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument(
        "--target", type=float, default=0.999, help="stop a run early at this val accuracy (0.99 stopped too soon)"
    )
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel, one process each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--out", type=Path, default=Path("bench_results/mqar"))
    parser.add_argument(
        "--report-only", action="store_true", help="write the table and plots from runs.json without training"
    )
    parser.add_argument(
        "--fresh", action="store_true", help="ignore the runs already in --out/runs.json (default: resume from them)"
    )
    args = parser.parse_args()
    args.widths = args.widths or ([32, 64, 128] if args.full else [64])
    args.cells = args.cells or (["64x4", "128x8", "256x16"] if args.full else ["64x4", "128x8"])
    args.lrs = args.lrs or ([3e-3, 1e-2, 2e-2] if args.full else [2e-2])
    args.max_steps = args.max_steps or (2000 if args.full else 1500)
    names = args.attention or list_attention("causal_self")
    cells = [tuple(int(v) for v in c.split("x")) for c in args.cells]

    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.json"
    keys = ("max_steps", "batch", "vocab", "heads", "mlp_ratio", "train_examples", "target")
    settings = {k: getattr(args, k) for k in keys}
    runs: list[dict] = []
    if log.is_file() and not args.fresh:  # resume: keep finished cells measured with the same settings
        runs = [r for r in json.loads(log.read_text()) if r.get("settings") == settings]
    done = {(r["attention"], r["width"], r["seq_len"], r["pairs"]) for r in runs}
    jobs = [
        (name, width, seq_len, pairs, args)
        for name in names
        for width in args.widths
        for seq_len, pairs in cells
        if (name, width, seq_len, pairs) not in done
    ]
    if args.report_only:
        jobs = []
    print(f"{len(jobs)} cells to run ({len(done)} resumed from {log}), {args.workers} workers", flush=True)
    started = time.perf_counter()
    ctx = torch.multiprocessing.get_context("spawn")  # fresh interpreters: no inherited thread pools
    with ctx.Pool(max(1, min(args.workers, len(jobs)))) as pool:
        if len(jobs) > args.workers:
            # longest job first (LPT) by a measured step time: the workers then finish within about one short job of
            # each other; ordering by cell size alone left mamba's T=128 cell (a quarter of the sweep) to start late
            costs = pool.map(probe_seconds, jobs)
            jobs = [job for _, job in sorted(zip(costs, jobs), key=lambda pair: -pair[0])]
            print(f"probed step times: {sum(costs) / 60 / args.workers:.0f} min per worker without early stops")
        for cell_runs in pool.imap_unordered(run_cell, jobs):
            for r in cell_runs:
                r["settings"] = settings
                print(
                    f"{r['attention']:>16} d={r['width']:<4} T={r['seq_len']:<4} kv={r['pairs']:<3} lr={r['lr']:g}: "
                    f"test acc {r['test_acc']:.3f} ({r['steps']} steps, {r['seconds']:.0f}s)",
                    flush=True,
                )
            runs.extend(cell_runs)
            tmp = log.with_suffix(".tmp")
            tmp.write_text(json.dumps(runs, indent=1))
            tmp.replace(log)  # atomic: an interrupted sweep resumes from the cells already finished

    best: dict[tuple, dict] = {}
    for r in runs:
        key = (r["attention"], r["width"], r["seq_len"], r["pairs"])
        if key not in best or r["test_acc"] > best[key]["test_acc"]:
            best[key] = r
    header = "| attention | d_model | " + " | ".join(f"T={s}, kv={p}" for s, p in cells) + " | state @ longest |"
    lines = [header, "|---" * (len(cells) + 3) + "|"]
    for name in names:
        for width in args.widths:
            found = [best.get((name, width, s, p)) for s, p in cells]
            accs = " | ".join("not run" if r is None else f"{r['test_acc']:.3f}" for r in found)
            state = next((f"{r['state_size']:,}" for r in reversed(found) if r is not None), "")
            lines.append(f"| {name} | {width} | {accs} | {state} |")
    table = "\n".join(lines)
    blocks = "mixer-only blocks" if args.mlp_ratio == 0 else f"MLP ratio {args.mlp_ratio:g}"
    about = f"{args.max_steps} steps max, batch {args.batch}, lrs {args.lrs}, vocab {args.vocab}, 2 layers, {blocks}"
    wall = "Written from runs.json without training (--report-only)."
    if jobs:
        wall = (
            f"Wall time of the invocation that wrote this: {(time.perf_counter() - started) / 60:.1f} min for "
            f"{len(jobs)} cells on {args.workers} workers x {args.threads} threads ({len(done)} cells resumed)."
        )
    (args.out / "mqar.md").write_text(f"MQAR test accuracy (best over learning rates; {about}).\n\n{table}\n\n{wall}\n")
    print("\n" + table + "\n\n" + wall)
    _plots(best, names, args.widths, cells, args.out)


def _plots(best: dict, names: list[str], widths: list[int], cells: list[tuple], out: Path) -> None:
    matplotlib = require("matplotlib", "the plots of bench_mqar.py")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from bench_attention import line_style  # the sibling script (scripts/ is on sys.path when run)
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, len(widths), figsize=(3 + 2.2 * len(widths), 0.4 * len(names) + 1.8), squeeze=False)
    for ax, width in zip(axes[0], widths):
        grid = [
            [best[(n, width, s, p)]["test_acc"] if (n, width, s, p) in best else float("nan") for s, p in cells]
            for n in names
        ]
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set(title=f"d_model={width}", xticks=range(len(cells)), yticks=range(len(names)))
        ax.set_xticklabels([f"{s}/{p}" for s, p in cells], fontsize=7)
        ax.set_yticklabels(names if ax is axes[0][0] else [""] * len(names), fontsize=7)
        for i, row in enumerate(grid):
            for j, acc in enumerate(row):
                label, dark = ("n/a", True) if math.isnan(acc) else (f"{acc:.2f}", acc < 0.6)
                ax.text(j, i, label, ha="center", va="center", fontsize=6, color="w" if dark else "k")
    fig.tight_layout()
    fig.savefig(out / "mqar_heatmap.png", dpi=120)

    fig, ax = plt.subplots(figsize=(6, 4))
    seq_len, pairs = cells[-1]
    for i, name in enumerate(names):
        keys = [(name, w, seq_len, pairs) for w in widths if (name, w, seq_len, pairs) in best]
        if not keys:
            continue
        pts = sorted((best[k]["state_size"], best[k]["test_acc"]) for k in keys)
        ax.plot(*zip(*pts), label=name, **line_style(i, name == "softmax"))
    ax.set(xscale="log", xlabel="decode state size (numbers per sequence)", ylabel="MQAR accuracy")
    ax.xaxis.set_minor_formatter(NullFormatter())  # the minor labels of a log axis overlap
    ax.set_title(f"recall vs state, T={seq_len}, {pairs} kv pairs", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "mqar_state.png", dpi=120)


if __name__ == "__main__":
    main()
