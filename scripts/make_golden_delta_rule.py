"""Write tests/golden/delta_rule.pt and tests/golden/gated_delta_rule.pt from fla-core's pure-torch references.

    pip install --no-deps fla-core==0.6.0 einops    # not a dependency of attnzoo: only this script imports fla
    python scripts/make_golden_delta_rule.py

Runs FLA's ``delta_rule_recurrence`` (fla/ops/delta_rule/naive.py, layout (B, H, T, D)) and
``naive_recurrent_gated_delta_rule`` (fla/ops/gated_delta_rule/naive.py, layout (B, T, H, D)) unmodified, on seeded
inputs shaped as attnzoo's op takes them ((B, T, H, D); the first function's inputs are transposed for the call
only), and saves inputs, outputs, final state and the gradients of loss = sum(o * do) + sum(final * dfinal) with
respect to every input, through FLA's own autograd graph. Both functions compute in float32, so the file is float32.
tests/golden/GOLDEN.md describes the files and the cross-checks printed here.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

OUT = Path(__file__).resolve().parent.parent / "tests" / "golden"
B, T, H, K, V = 2, 20, 2, 16, 32  # T = 20 is no multiple of the test's chunk of 8; K != V catches a transposed state
SEED = 0


def make_inputs(gated: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(SEED)
    inputs = {
        "q": F.normalize(torch.randn(B, T, H, K), dim=-1),  # the layers L2-normalise q and k before the op
        "k": F.normalize(torch.randn(B, T, H, K), dim=-1),
        "v": torch.randn(B, T, H, V),
        "beta": torch.randn(B, T, H).sigmoid(),
        "initial_state": torch.randn(B, H, K, V),
    }
    if gated:
        inputs["g"] = F.logsigmoid(torch.randn(B, T, H))
    return inputs


def run(gated: bool) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fla warns that triton cannot run on a CPU
        import fla
        from fla.ops.delta_rule.naive import delta_rule_chunkwise, delta_rule_recurrence
        from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule, naive_recurrent_gated_delta_rule
    inputs = make_inputs(gated)
    x = {key: t.clone().requires_grad_(True) for key, t in inputs.items()}
    if gated:
        function = "fla.ops.gated_delta_rule.naive.naive_recurrent_gated_delta_rule"
        o, final = naive_recurrent_gated_delta_rule(
            x["q"], x["k"], x["v"], x["beta"], x["g"], initial_state=x["initial_state"], output_final_state=True
        )
        chunk_o, chunk_final = naive_chunk_gated_delta_rule(
            *(inputs[key] for key in ("q", "k", "v", "g", "beta")),
            chunk_size=8,
            initial_state=inputs["initial_state"],
            output_final_state=True,
        )
    else:
        function = "fla.ops.delta_rule.naive.delta_rule_recurrence"
        bhtd = [x[key].transpose(1, 2) for key in ("q", "k", "v", "beta")]
        o, final = delta_rule_recurrence(*bhtd, initial_state=x["initial_state"], output_final_state=True)
        o = o.transpose(1, 2)
        # FLA's chunkwise naive form takes no initial state and needs T a multiple of the chunk: compare on 16 steps
        rec_o, rec_final = delta_rule_recurrence(*(t[:, :, :16].detach() for t in bhtd))
        chunk_o, chunk_final = delta_rule_chunkwise(*(t[:, :, :16].detach() for t in bhtd), chunk_size=8)
    gen = torch.Generator().manual_seed(SEED + 1)
    do, dfinal = torch.randn(o.shape, generator=gen), torch.randn(final.shape, generator=gen)
    grads = torch.autograd.grad((o * do).sum() + (final * dfinal).sum(), list(x.values()))
    if gated:
        print(f"  naive chunk (C = 8) vs recurrent: o {(chunk_o - o).abs().max():.1e}, state "
              f"{(chunk_final - final).abs().max():.1e}")  # fmt: skip
    else:
        print(f"  naive chunkwise (C = 8) vs recurrent, first 16 steps from a zero state: o "
              f"{(chunk_o - rec_o).abs().max():.1e}, state {(chunk_final - rec_final).abs().max():.1e}")  # fmt: skip
    return {
        "meta": {
            "source": f"fla-core {fla.__version__}",
            "function": function,
            "seed": SEED,
            "torch": str(torch.__version__),
        },
        "inputs": inputs,
        "scale": K**-0.5,
        "chunk_size": 8,
        "o": o.detach(),
        "final_state": final.detach(),
        "do": do,
        "dfinal_state": dfinal,
        "grads": {key: grad for key, grad in zip(x, grads)},
    }


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # no options: --help only
    for name, gated in (("delta_rule", False), ("gated_delta_rule", True)):
        print(name)
        data = run(gated)
        path = OUT / f"{name}.pt"
        torch.save(data, path)
        again = torch.load(path, weights_only=True)
        rerun = run(gated)
        same = max((again[key] - rerun[key]).abs().max().item() for key in ("o", "final_state"))
        print(f"  wrote {path.name} ({path.stat().st_size / 1024:.0f} KB); reloaded and re-run: max abs diff {same}")


if __name__ == "__main__":
    main()
