"""Fidelity report: build every seed layer from the official weights in ``tests/golden/`` and print, per golden case,
the largest absolute error against the official implementation's saved outputs (the README's Fidelity table).

The golden files are data only (GOLDEN.md says how each was made); this script and ``tests/test_golden_*.py`` run the
same conversions, the tests assert the tolerances (float64 files 1e-10, float32 files 1e-5).

    python scripts/fidelity.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from attnzoo.kernels import gla, simple_gla
from attnzoo.layers import build_attention
from attnzoo.layers.agent import AgentAttention
from attnzoo.layers.cosformer import CosFormer, cosformer_attention
from attnzoo.layers.moh import MoHAttention
from attnzoo.layers.performer import Performer, favor_attention, official_favor_options

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "tests" / "golden"


def load(name: str) -> dict:
    return torch.load(GOLDEN_DIR / f"{name}.pt", weights_only=True)


def err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return (got.double() - ref.double()).abs().max().item()


def performer() -> list[tuple[str, float]]:
    d, rows = load("performer"), []
    f = d["fast"]
    q, k, v = (f[n].transpose(1, 2) for n in ("q", "k", "v"))
    for causal in (False, True):
        o, _ = favor_attention(
            q, k, v, f["state_dict"]["projection_matrix"], causal=causal, **official_favor_options(causal)
        )
        rows.append(
            (
                f"FastAttention {'causal' if causal else 'non-causal'}",
                err(o.transpose(1, 2), f["out_causal" if causal else "out_noncausal"]),
            )
        )
    s = d["self_attention"]
    for causal in (False, True):
        layer = Performer.from_official(s["state_dict"], causal=causal, **s["init_kwargs"]).eval()
        rows.append(
            (
                f"SelfAttention {'causal' if causal else 'non-causal'}",
                err(layer(s["x"]), s["out_causal" if causal else "out_noncausal"]),
            )
        )
    return rows


def cosformer() -> list[tuple[str, float]]:
    d, kw = load("cosformer"), None
    kw = d["init_kwargs"]

    def layer(causal: bool, max_len: int | None) -> CosFormer:
        m = CosFormer(kw["embed_dim"], kw["num_heads"], causal=causal, max_len=max_len).double().eval()
        m.load_state_dict(d["state_dict"])
        return m

    x = d["x"].transpose(0, 1)
    rows = [("non-causal", err(layer(False, None)(x).transpose(0, 1), d["out_noncausal"]))]
    causal = layer(True, x.shape[1])
    rows.append(("causal", err(causal(x).transpose(0, 1), d["out_causal"])))
    cache = causal.new_cache(x.shape[0])
    stepped = torch.cat(
        [causal(x[:, :20], cache=cache)] + [causal(x[:, t : t + 1], cache=cache) for t in range(20, 32)], 1
    )
    rows.append(("causal, prefill then steps", err(stepped.transpose(0, 1), d["out_causal"])))
    m = layer(False, None)
    query, key, value = (d[n].transpose(0, 1) for n in ("cross_query", "cross_key", "cross_value"))
    B, T, S, H, D = query.shape[0], query.shape[1], key.shape[1], m.num_heads, m.head_dim
    o, _ = cosformer_attention(
        F.relu(m.q_proj(query)).view(B, T, H, D),
        F.relu(m.k_proj(key)).view(B, S, H, D),
        m.v_proj(value).view(B, S, H, D),
        causal=False,
        max_len=None,
    )
    rows.append(("cross (T=12, S=20)", err(m.out_proj(o.reshape(B, T, -1)).transpose(0, 1), d["out_cross_noncausal"])))
    return rows


def agent() -> list[tuple[str, float]]:
    d = load("agent_attention")
    rows = []
    for case in ("agent16", "agent9"):
        layer = AgentAttention.from_official(d[case]["state_dict"], **d[case]["init_kwargs"]).eval()
        rows.append((f"DeiT, 4x4 grid + class token, {case[5:]} agents", err(layer(d["x"]), d[case]["out"])))
    return rows


def moh() -> list[tuple[str, float]]:
    d = load("moh")
    layer = MoHAttention.from_official(d["state_dict"], **d["init_kwargs"])
    rows = [("output (eval)", err(layer.eval()(d["x"]), d["out"]))]
    layer.train()(d["x"])
    rows.append(("load-balance loss", err(layer.aux_loss / layer.lb_coeff, d["load_balance_loss"])))
    same = torch.equal(layer.route(d["x"]).indices, d["routed_topk_indices"])
    rows.append(("selected heads (top-3 of 6)", 0.0 if same else float("inf")))
    return rows


def mamba() -> list[tuple[str, float]]:
    d = load("mamba")
    kw = d["init_kwargs"]
    layer = build_attention(
        "mamba",
        dim=kw["hidden_size"],
        num_heads=1,
        causal=True,
        d_state=kw["state_size"],
        d_conv=kw["conv_kernel"],
        expand=kw["intermediate_size"] / kw["hidden_size"],
        dt_rank=kw["dt_rank"],
        conv_bias=kw["use_conv_bias"],
        bias=kw["use_bias"],
    )
    layer.load_state_dict(d["state_dict"], strict=True)
    layer.eval()
    x, n = d["x"], d["prefill_len"]
    with torch.no_grad():
        rows = [("full forward", err(layer(x), d["out"]))]
        cache = layer.new_cache(x.shape[0])
        parts = [layer(x[:, :n], cache=cache)]
        states = [
            err(cache.conv_state, d["conv_state_after_prefill"]),
            err(cache.ssm_state, d["ssm_state_after_prefill"]),
        ]
        parts += [layer(x[:, t : t + 1], cache=cache) for t in range(n, x.shape[1])]
    rows.append(("prefill 16 + 8 steps", err(torch.cat(parts, 1), d["out_prefill_then_step"])))
    states += [err(cache.conv_state, d["conv_state_final"]), err(cache.ssm_state, d["ssm_state_final"])]
    rows.append(("conv and ssm states (after prefill, final)", max(states)))
    return rows


def gla_ops() -> list[tuple[str, float]]:
    d, rows = load("gla"), []
    for op, case, gate in ((gla, "gla", "gk"), (simple_gla, "simple_gla", "g")):
        for backend in ("reference", "torch"):
            o, final = op(
                d["q"],
                d["k"],
                d["v"],
                d[case][gate],
                initial_state=d[case]["initial_state"],
                output_final_state=True,
                backend=backend,
            )
            rows.append(
                (f"{case} ({backend}): o, final state", max(err(o, d[case]["o"]), err(final, d[case]["final_state"])))
            )
    return rows


def timm_softmax() -> list[tuple[str, float]]:
    d, rows = load("timm_attention"), []
    kw = d["init_kwargs"]
    for causal in (False, True):
        layer = build_attention(
            "softmax", dim=kw["dim"], num_heads=kw["num_heads"], causal=causal, qkv_bias=kw["qkv_bias"]
        ).double()
        layer.load_state_dict(d["state_dict"], strict=True)
        rows.append(
            (
                f"timm Attention{' (is_causal)' if causal else ''}",
                err(layer.eval()(d["x"]), d["out_causal" if causal else "out"]),
            )
        )
    return rows


METHODS = {
    "performer": ("performer-pytorch 1.1.4", "float64", performer),
    "cosformer": ("OpenNLPLab/cosFormer @8e12da1", "float64", cosformer),
    "agent": ("LeapLabTHU/Agent-Attention @207ce3e", "float64", agent),
    "moh": ("SkyworkAI/MoH (DiT) @2cefd57", "float64", moh),
    "mamba": ("fla-core 0.6.0 Mamba (mamba_ssm names)", "float32", mamba),
    "gla (kernel)": ("fla-core 0.6.0 naive recurrences", "float32", gla_ops),
    "softmax": ("timm 1.0.31 Attention", "float64", timm_softmax),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--summary", action="store_true", help="one row per method (largest error over its cases)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = ["| method | official source | dtype | case | largest abs. error |", "|---|---|---|---|---:|"]
    for name, (source, dtype, fn) in METHODS.items():
        rows = fn()
        if args.summary:
            rows = [(f"{len(rows)} cases: " + "; ".join(r[0] for r in rows), max(r[1] for r in rows))]
        for case, value in rows:
            lines.append(f"| {name} | {source} | {dtype} | {case} | {value:.1e} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
