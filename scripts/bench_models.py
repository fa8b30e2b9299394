"""Model throughput against the anchors, measured side by side in one process.

* GPT: training tokens/s (forward + backward + AdamW step) and KV-cache generation tokens/s of attnzoo's GPT with
  softmax attention against x-transformers' ``TransformerWrapper(Decoder)`` of the same size (RoPE, GELU MLP x4,
  pre-norm LayerNorm, tied embeddings, SDPA attention).
* ViT: training samples/s of attnzoo's ViT (softmax) against timm's ``VisionTransformer`` of the same size.

Each figure is the median of ``--repeats`` timed steps after warm-up; the two models alternate step by step so that
machine load affects both alike. The anchors come from the optional ``bench`` extra: ``pip install -e ".[bench]"``.

    python scripts/bench_models.py --part gpt vit --out bench_results/models
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from attnzoo.allocator import tune_malloc
from attnzoo.extras import require


def _median_times(fns: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():  # interleaved: load spikes hit both
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _train_step(model: torch.nn.Module, forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        forward().backward()
        opt.step()

    return step


def bench_gpt(args: argparse.Namespace) -> list[dict]:
    require("x_transformers", "bench_models.py --part gpt (its baseline)")  # missing: names the extra to install
    from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper

    from attnzoo.models import GPT

    V, D, L, H, T, B = args.vocab, args.dim, args.depth, args.heads, args.seq_len, args.batch
    torch.manual_seed(0)
    zoo = GPT(V, dim=D, depth=L, num_heads=H, attention={"name": "softmax", "rope": True}, max_seq_len=T)
    xt = TransformerWrapper(
        num_tokens=V,
        max_seq_len=T,
        use_abs_pos_emb=False,
        tie_embedding=True,
        attn_layers=Decoder(dim=D, depth=L, heads=H, rotary_pos_emb=True, attn_flash=True, ff_mult=4),
    )
    xt_wrapped = AutoregressiveWrapper(xt)
    idx = torch.randint(0, V, (B, T + 1))
    inputs, targets = idx[:, :-1], idx[:, 1:]

    def zoo_loss() -> torch.Tensor:
        return F.cross_entropy(zoo(inputs).flatten(0, 1), targets.flatten())

    def xt_loss() -> torch.Tensor:
        return F.cross_entropy(xt(inputs).flatten(0, 1), targets.flatten())

    train = _median_times(
        {"attnzoo": _train_step(zoo.train(), zoo_loss), "x-transformers": _train_step(xt.train(), xt_loss)},
        args.repeats,
        2,
    )
    prompt = torch.randint(0, V, (1, 16))
    n = args.new_tokens
    zoo.eval()
    xt_wrapped.eval()

    def zoo_generate() -> None:
        zoo.generate(prompt, n, temperature=1.0, top_k=25)

    def xt_generate() -> None:
        with torch.no_grad():
            xt_wrapped.generate(prompt, n, cache_kv=True, temperature=1.0)

    gen = _median_times({"attnzoo": zoo_generate, "x-transformers": xt_generate}, max(3, args.repeats // 3), 1)
    rows = []
    for key in ("attnzoo", "x-transformers"):
        rows.append(
            {
                "part": "gpt",
                "model": key,
                "train_tokens_per_s": B * T / train[key],
                "generate_tokens_per_s": n / gen[key],
            }
        )
    rows[0]["train_ratio"] = rows[0]["train_tokens_per_s"] / rows[1]["train_tokens_per_s"]
    rows[0]["generate_ratio"] = rows[0]["generate_tokens_per_s"] / rows[1]["generate_tokens_per_s"]
    return rows


def bench_vit(args: argparse.Namespace) -> list[dict]:
    from timm.models.vision_transformer import VisionTransformer

    from attnzoo.models import ViT

    size = dict(img_size=args.img_size, patch_size=args.patch_size, embed_dim=args.dim, depth=args.depth)
    torch.manual_seed(0)
    timm_vit = VisionTransformer(**size, num_heads=args.heads, num_classes=10)
    zoo_vit = ViT(**size, num_heads=args.heads, num_classes=10, attention="softmax")
    images = torch.randn(args.batch, 3, args.img_size, args.img_size)
    labels = torch.randint(0, 10, (args.batch,))
    times = _median_times(
        {
            "attnzoo": _train_step(zoo_vit.train(), lambda: F.cross_entropy(zoo_vit(images), labels)),
            "timm": _train_step(timm_vit.train(), lambda: F.cross_entropy(timm_vit(images), labels)),
        },
        args.repeats,
        2,
    )
    rows = [{"part": "vit", "model": k, "train_samples_per_s": args.batch / t} for k, t in times.items()]
    rows[0]["train_ratio"] = rows[0]["train_samples_per_s"] / rows[1]["train_samples_per_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="*", default=["gpt", "vit"], choices=["gpt", "vit"])
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench_results/models"))
    args = parser.parse_args()
    tune_malloc()  # opt-in (train.py: tune_malloc=true): the published numbers reuse freed CPU memory
    torch.set_num_threads(args.threads)

    rows: list[dict] = []
    if "gpt" in args.part:
        rows += bench_gpt(args)
    if "vit" in args.part:
        rows += bench_vit(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "models.json").write_text(
        json.dumps({"args": {**vars(args), "out": str(args.out)}, "rows": rows}, indent=1)
    )
    lines = ["| part | model | train throughput | generate tokens/s | train ratio | generate ratio |", "|---" * 6 + "|"]
    for r in rows:
        train = r.get("train_tokens_per_s", r.get("train_samples_per_s"))
        unit = "tok/s" if "train_tokens_per_s" in r else "samples/s"
        gen = f"{r['generate_tokens_per_s']:.1f}" if "generate_tokens_per_s" in r else "-"
        ratios = [f"{r[k]:.2f}x" if k in r else "" for k in ("train_ratio", "generate_ratio")]
        lines.append(f"| {r['part']} | {r['model']} | {train:.1f} {unit} | {gen} | {ratios[0]} | {ratios[1]} |")
    table = "\n".join(lines)
    (args.out / "models.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
