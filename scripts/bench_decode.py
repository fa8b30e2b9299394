"""Decode latency of GPT with each causal attention: per-token time at growing contexts, and whole generations.

For every attention with ``causal_self`` (or the ones named), a GPT of the given size is prefilled with a context of
each length through its per-layer caches, then ``--steps`` single-token steps are timed (median of their times),
round robin over the contexts in visits of a few steps, so that the contexts are measured side by side. A recurrent
layer keeps a constant-size state, so its per-token time should not grow with the context; softmax reads a KV cache
that grows with it. The ``ratio`` column is the per-token time at the longest context over the shortest. A second
table gives tokens/s of a whole ``generate`` call (prompt + new tokens, sampling included). Layers take the options
of ``configs/attention/<name>.yaml`` (RoPE for softmax), with cosformer's ``max_len`` raised to the longest context.

    python scripts/bench_decode.py --attention softmax gla mamba --contexts 256 1024 4096 --out bench_results/decode
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from attnzoo.allocator import tune_malloc
from attnzoo.extras import require
from attnzoo.layers import list_attention
from attnzoo.models import GPT
from attnzoo.training.run import attention_defaults

ROUND_STEPS = 4  # timed steps per context per round robin visit


def per_token_ms(model: GPT, contexts: list[int], steps: int, vocab: int) -> dict[int, float]:
    """Median single-token step time (ms) after a prefill of each context length.

    The contexts are prefilled first and then stepped round robin, so that drift in the machine's speed reaches
    every context alike. Each visit makes one untimed step, then ``ROUND_STEPS`` timed ones: a step right after
    another context's would find its KV cache evicted from the CPU caches (measured: softmax at 256 tokens then
    takes 1.6 ms instead of 0.85), which a generation running alone never sees.
    """
    streams = []
    with torch.no_grad():
        for context in contexts:
            caches = model.new_caches(1)
            prompt = torch.randint(0, vocab, (1, context))
            model(prompt, caches=caches)
            streams.append({"caches": caches, "token": prompt[:, -1:], "position": context, "times": []})
        while len(streams[0]["times"]) < steps:
            for stream in streams:
                for timed in [False] + [True] * min(ROUND_STEPS, steps - len(stream["times"])):
                    start = time.perf_counter()
                    logits = model(stream["token"], caches=stream["caches"], offset=stream["position"])
                    if timed:
                        stream["times"].append(time.perf_counter() - start)
                    stream["token"] = logits[:, -1].argmax(-1, keepdim=True)
                    stream["position"] += 1
    return {c: 1e3 * statistics.median(s["times"]) for c, s in zip(contexts, streams)}


def generation_tokens_per_s(model: GPT, prompt_len: int, new_tokens: int, vocab: int) -> float:
    prompt = torch.randint(0, vocab, (1, prompt_len))
    start = time.perf_counter()
    model.generate(prompt, new_tokens, temperature=1.0, top_k=50)
    return new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention", nargs="*", default=None, help="names (default: every causal_self attention)")
    parser.add_argument("--contexts", nargs="*", type=int, default=[256, 1024, 4096, 8192])
    parser.add_argument("--steps", type=int, default=16, help="timed single-token steps per context")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated in the tokens/s table")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench_results/decode"))
    args = parser.parse_args()
    tune_malloc()  # opt-in (train.py: tune_malloc=true): the published numbers reuse freed CPU memory

    torch.set_num_threads(args.threads)
    names = args.attention or list_attention("causal_self")
    rows = []
    for name in names:
        torch.manual_seed(0)
        spec = attention_defaults(name)  # the command line's options (configs/attention/<name>.yaml)
        if "max_len" in spec:  # cosformer's fixed position range must cover the longest context
            spec["max_len"] = max(args.contexts) + 2 * args.steps + 1  # timed steps plus the untimed ones
        model = GPT(args.vocab, dim=args.dim, depth=args.depth, num_heads=args.heads, attention=spec).eval()
        try:
            ms = per_token_ms(model, args.contexts, args.steps, args.vocab)
        except ValueError as err:  # e.g. cosformer's fixed max_len below the longest context: say so, go on
            print(f"{name:>16}  skipped: {err}", flush=True)
            continue
        tps = generation_tokens_per_s(model, 16, args.new_tokens, args.vocab)
        state = model.blocks[0].attn.state_size(max(args.contexts)) * args.depth
        rows.append({"attention": name, "ms_per_token": ms, "generate_tokens_per_s": tps, "state_size": state})
        cols = "  ".join(f"{c}: {v:.2f} ms" for c, v in ms.items())
        print(f"{name:>16}  {cols}  ratio {ms[max(ms)] / ms[min(ms)]:.2f}  generate {tps:.1f} tok/s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode.json").write_text(
        json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=1)
    )
    lo, hi = min(args.contexts), max(args.contexts)
    header = "| attention | " + " | ".join(f"ms/token @ {c}" for c in args.contexts)
    header += f" | {hi}/{lo} | generate tok/s | state @ {hi} |"
    lines = [header, "|" + "---|" * (len(args.contexts) + 4)]
    for r in rows:
        ms = r["ms_per_token"]
        cells = " | ".join(f"{ms[c]:.2f}" for c in args.contexts)
        tail = f"{ms[hi] / ms[lo]:.2f} | {r['generate_tokens_per_s']:.1f} | {r['state_size']:,}"
        lines.append(f"| {r['attention']} | {cells} | {tail} |")
    table = "\n".join(lines)
    (args.out / "decode.md").write_text(
        f"GPT dim={args.dim} depth={args.depth} heads={args.heads}, batch 1, {args.threads} threads, fp32; "
        f"median of {args.steps} steps.\n\n{table}\n"
    )
    print("\n" + table)
    _plot(rows, args.contexts, args.out / "decode.png")


def _plot(rows: list[dict], contexts: list[int], path: Path) -> None:
    matplotlib = require("matplotlib", "the plot of bench_decode.py")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from bench_attention import label_log_ticks, line_style  # the sibling script (scripts/ is on sys.path when run)

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, r in enumerate(rows):
        style = line_style(i, r["attention"] == "softmax")
        ax.plot(contexts, [r["ms_per_token"][c] for c in contexts], label=r["attention"], **style)
    ax.set(xscale="log", yscale="log", xlabel="context length", ylabel="ms per generated token", title="GPT decode")
    label_log_ticks(ax.xaxis, contexts)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
