"""Sample text from a byte-level GPT checkpoint written by ``python train.py experiment=gpt_text``.

The prompt is encoded as UTF-8 bytes (the text data's vocabulary of 256), the model continues it with its per-layer
decoding caches (``GPT.generate``), and the bytes are decoded back (a character cut in the middle becomes U+FFFD).

    python scripts/generate.py --checkpoint outputs/<date>/<time>/checkpoints/last.ckpt --prompt "def main(" \\
        --max-new-tokens 300 --temperature 0.8 --top-k 40
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def load_model(checkpoint: Path) -> torch.nn.Module:
    """The GPT inside a LanguageModelTask checkpoint (rebuilt from the configs saved with it)."""
    from attnzoo.training import LanguageModelTask

    if not checkpoint.is_file():
        raise SystemExit(f"generate: no checkpoint at {checkpoint}; pass a .ckpt written by train.py.")
    task = LanguageModelTask.load_from_checkpoint(str(checkpoint), map_location="cpu", weights_only=False)
    model = task.model.eval()
    if getattr(model, "vocab_size", None) != 256:
        raise SystemExit(
            f"generate: {checkpoint} holds a model with vocab_size={getattr(model, 'vocab_size', None)}; text "
            f"prompts need a byte-level model (vocab_size=256, e.g. experiment=gpt_text)."
        )
    return model


def generate(
    model: torch.nn.Module,
    prompt: str,
    *,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 40,
    use_cache: bool = True,
) -> str:
    """The prompt followed by ``max_new_tokens`` sampled bytes, decoded."""
    from attnzoo.data.text import decode, encode

    ids = encode(prompt)[None]  # (1, T)
    if ids.shape[1] == 0:
        raise SystemExit("generate: the prompt is empty; pass --prompt with at least one character.")
    limit = getattr(model, "max_seq_len", None)
    if getattr(model, "pos_emb", None) is not None and ids.shape[1] + max_new_tokens > limit:
        raise SystemExit(
            f"generate: prompt ({ids.shape[1]} bytes) + {max_new_tokens} new bytes exceed the model's learned "
            f"positions (max_seq_len={limit}); shorten them."
        )
    out = model.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, use_cache=use_cache)
    return decode(out[0])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a .ckpt from a byte-level GPT run")
    parser.add_argument("--prompt", default="def ", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="bytes to sample")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=40, help="sample among the k most likely bytes (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="re-run the whole sequence for every new byte")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    model = load_model(args.checkpoint)
    text = generate(
        model,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        use_cache=not args.no_cache,
    )
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
