"""Benchmark attention layers or kernels against softmax SDPA: forward and forward+backward time, peak memory.

Two levels:

* ``--level layer``: registered attentions built with ``build_attention`` (dim = heads x head_dim) on x (B, T, dim);
  the baseline is the ``softmax`` layer (SDPA inside).
* ``--level kernel``: functional ops from :data:`KERNEL_OPS` on (B, T, H, D) tensors; the baseline is
  ``F.scaled_dot_product_attention``. Add an op by adding one factory to that dict (see :class:`KernelCase`).

Method. Every length is measured in one process, side by side: each repeat runs every method once in turn (round
robin), so machine load hits all of them alike; the table reports the median over repeats after ``--warmup`` runs, and
ratios of medians against the baseline measured in the same run. ``--repeats`` rounds at least; with ``--min-time S``
rounds are added until the length's timing has taken S seconds (at most ``--max-repeats``), so short lengths, where a
round takes milliseconds, get medians of many rounds. Forward is timed under ``torch.no_grad()``; fwd+bwd
is forward, ``out.float().square().mean().backward()`` with gradients for all inputs. Peak memory is measured in a
separate run (not timed) by a ``TorchDispatchMode`` that adds up the bytes of every tensor storage created during the
fwd+bwd call and subtracts them when the storage is freed: the peak of torch's live CPU allocations beyond the inputs
(tracemalloc-like; allocator caching and Python objects are not counted). A method whose single fwd+bwd exceeded
``--time-budget`` seconds, or whose peak exceeded ``--memory-budget`` MiB at some length, is skipped at longer
lengths; the table says so.

Examples::

    python scripts/bench_attention.py --attention softmax linear based --lengths 256 1024 4096
    python scripts/bench_attention.py --level kernel --ops linear_attn linear_attn_cumsum --lengths 1024 4096 8192
    python scripts/bench_attention.py --level kernel --ops linear_attn linear_attn_cumsum --feature-dim 256

Writes ``results.md`` (Markdown table), ``results.json`` (every number plus the configuration) and ``results.png``
(time per token and peak memory against T) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from attnzoo.allocator import tune_malloc
from attnzoo.extras import require

# ----------------------------------------------------------------------------------------------------------------
# measurement


class PeakMemory(TorchDispatchMode):
    """Peak bytes of live tensor storages created while the mode is active (CPU; inputs made before it not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def _collect(self) -> None:
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._collect()  # before registering outputs: a freed address may be reused by this op's output
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in self.live or storage.nbytes() == 0:
                    continue  # a view or an in-place result: already counted
                self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


@dataclass
class Case:
    """One method at one length: fresh inputs (leaf tensors) and a callable mapping them to the output."""

    inputs: list[torch.Tensor]
    fn: Callable[..., torch.Tensor]
    params: list[torch.Tensor] = field(default_factory=list)  # module parameters (gradients cleared between runs)

    def forward(self) -> None:
        with torch.no_grad():
            self.fn(*self.inputs)

    def forward_backward(self) -> None:
        for t in self.inputs + self.params:
            t.grad = None
        out = self.fn(*self.inputs)
        out.float().square().mean().backward()


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_memory(case: Case) -> int:
    with PeakMemory() as mem:
        case.forward_backward()
    return mem.peak


# ----------------------------------------------------------------------------------------------------------------
# kernel-level ops: name -> factory(B, T, H, D, causal, dtype, feature_dim) -> Case. Extend by adding entries.


KernelFactory = Callable[..., Case]


def _qkv(B, T, H, D, dtype, feature_dim=None, positive=False):
    K = feature_dim or D
    gen = torch.Generator().manual_seed(0)
    make = torch.rand if positive else torch.randn  # feature-mapped q, k are positive for linear attention
    q = make(B, T, H, K, generator=gen, dtype=dtype).requires_grad_(True)
    k = make(B, T, H, K, generator=gen, dtype=dtype).requires_grad_(True)
    v = torch.randn(B, T, H, D, generator=gen, dtype=dtype).requires_grad_(True)
    return q, k, v


def sdpa_case(B, T, H, D, causal, dtype, feature_dim=None) -> Case:
    """Softmax attention through F.scaled_dot_product_attention, inputs already in its (B, H, T, D) layout."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=gen, dtype=dtype).requires_grad_(True) for _ in range(3))
    return Case([q, k, v], lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal))


def linear_attn_case(backend: str) -> KernelFactory:
    def factory(B, T, H, D, causal, dtype, feature_dim=None) -> Case:
        from attnzoo.kernels import linear_attn

        q, k, v = _qkv(B, T, H, D, dtype, feature_dim, positive=True)
        return Case([q, k, v], lambda q, k, v: linear_attn(q, k, v, causal=causal, backend=backend)[0])

    factory.__doc__ = f"attnzoo.kernels.linear_attn, backend={backend!r}, normalised."
    return factory


def linear_attn_cumsum_case(B, T, H, D, causal, dtype, feature_dim=None) -> Case:
    """Causal linear attention by a cumulative sum of per-token K x V states (the form performer-pytorch uses:
    einsum of k and v into (T, K, V), cumsum over T, contract with q). Memory O(T K V). Benchmark-only."""

    def fn(q, k, v):
        if not causal:
            state = torch.einsum("bthk,bthv->bhkv", k, v)
            return torch.einsum("bthk,bhkv->bthv", q, state) / (
                torch.einsum("bthk,bhk->bth", q, k.sum(1))[..., None] + 1e-6
            )
        states = torch.einsum("bthk,bthv->bthkv", k, v).cumsum(1)  # (B, T, H, K, V): one state per token
        num = torch.einsum("bthkv,bthk->bthv", states, q)
        return num / (torch.einsum("bthk,bthk->bth", q, k.cumsum(1))[..., None] + 1e-6)

    return Case(list(_qkv(B, T, H, D, dtype, feature_dim, positive=True)), fn)


def gla_case(backend: str) -> KernelFactory:
    def factory(B, T, H, D, causal, dtype, feature_dim=None) -> Case:
        from attnzoo.kernels import gla

        q, k, v = _qkv(B, T, H, D, dtype, feature_dim)
        gen = torch.Generator().manual_seed(1)  # FLA's gate: logsigmoid / 16, float32
        g = (F.logsigmoid(torch.randn(*q.shape, generator=gen)) / 16).requires_grad_(True)
        return Case([q, k, v, g], lambda q, k, v, g: gla(q, k, v, g, backend=backend)[0])

    factory.__doc__ = f"attnzoo.kernels.gla (causal by nature), backend={backend!r}, gates logsigmoid / 16."
    return factory


def simple_gla_case(backend: str) -> KernelFactory:
    def factory(B, T, H, D, causal, dtype, feature_dim=None) -> Case:
        from attnzoo.kernels import simple_gla

        q, k, v = _qkv(B, T, H, D, dtype, feature_dim)
        g = torch.full((B, T, H), -1 / 32, dtype=dtype)  # a RetNet-like fixed per-head log decay (no gradient)
        return Case([q, k, v], lambda q, k, v: simple_gla(q, k, v, g, backend=backend)[0])

    factory.__doc__ = f"attnzoo.kernels.simple_gla (scalar decay per head: RetNet, Mamba-2), backend={backend!r}."
    return factory


def selective_scan_case(backend: str) -> KernelFactory:
    def factory(B, T, H, D, causal, dtype, feature_dim=None) -> Case:
        from attnzoo.kernels import selective_scan

        E, N = H * D, feature_dim or 16  # channels = the attention's width; N = mamba's d_state
        gen = torch.Generator().manual_seed(0)
        u = torch.randn(B, E, T, generator=gen, dtype=dtype).requires_grad_(True)
        delta = (torch.rand(B, E, T, generator=gen, dtype=dtype) * 0.1).requires_grad_(True)  # mamba's init range
        A = -torch.arange(1, N + 1, dtype=dtype).repeat(E, 1)  # mamba's A = -(1..N)
        Bm = torch.randn(B, N, T, generator=gen, dtype=dtype).requires_grad_(True)
        Cm = torch.randn(B, N, T, generator=gen, dtype=dtype).requires_grad_(True)
        return Case(
            [u, delta, Bm, Cm], lambda u, d, Bm, Cm: selective_scan(u, d, A, Bm, Cm, backend=backend).transpose(1, 2)
        )

    factory.__doc__ = f"attnzoo.kernels.selective_scan over E = H x D channels, N = 16, backend={backend!r}."
    return factory


def delta_rule_case(backend: str, gated: bool) -> KernelFactory:
    def factory(B, T, H, D, causal, dtype, feature_dim=None) -> Case:
        from attnzoo.kernels import delta_rule

        K = feature_dim or D
        gen = torch.Generator().manual_seed(0)
        # L2-normalised q, k as DeltaNet passes them; beta = sigmoid(N(0, 1)); Gated DeltaNet-like gate logsigmoid / 16
        q, k = (F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1).to(dtype) for _ in range(2))
        v = torch.randn(B, T, H, D, generator=gen, dtype=dtype)
        beta = torch.randn(B, T, H, generator=gen).sigmoid().to(dtype)
        inputs = [q, k, v, beta] + ([F.logsigmoid(torch.randn(B, T, H, generator=gen)) / 16] if gated else [])
        inputs = [t.requires_grad_(True) for t in inputs]
        return Case(inputs, lambda q, k, v, beta, g=None: delta_rule(q, k, v, beta, g, backend=backend)[0])

    kind = "gated (Gated DeltaNet)" if gated else "ungated (DeltaNet)"
    factory.__doc__ = f"attnzoo.kernels.delta_rule, {kind}, L2-normalised q/k, backend={backend!r}."
    return factory


def neighborhood_case(backend: str, kernel_size: int = 256) -> KernelFactory:
    def factory(B, T, H, D, causal, dtype, feature_dim=None) -> Case:
        from attnzoo.layers.neighborhood import neighborhood_attention

        q, k, v = _qkv(B, T, H, D, dtype)
        kernel = kernel_size if causal else kernel_size + 1  # non-causal kernels are odd
        kernel = min(kernel, T if causal else T - (T + 1) % 2)
        return Case(
            [q, k, v],
            lambda q, k, v: neighborhood_attention(q, k, v, kernel_size=kernel, causal=causal, backend=backend),
        )

    factory.__doc__ = f"attnzoo.layers.neighborhood core, kernel_size {kernel_size} (issue 21's window), {backend!r}."
    return factory


KERNEL_OPS: dict[str, KernelFactory] = {
    "sdpa": sdpa_case,
    "gla": gla_case("torch"),
    "gla_reference": gla_case("reference"),
    "linear_attn": linear_attn_case("torch"),
    "linear_attn_reference": linear_attn_case("reference"),
    "linear_attn_cumsum": linear_attn_cumsum_case,
    "simple_gla": simple_gla_case("torch"),
    "selective_scan": selective_scan_case("torch"),
    "selective_scan_reference": selective_scan_case("reference"),
    "delta_rule": delta_rule_case("torch", gated=False),
    "delta_rule_reference": delta_rule_case("reference", gated=False),
    "gated_delta_rule": delta_rule_case("torch", gated=True),
    "gated_delta_rule_reference": delta_rule_case("reference", gated=True),
    "neighborhood": neighborhood_case("auto"),  # causal on the CPU: the blocked path
    "neighborhood_band": neighborhood_case("torch"),  # the generic gathered-tile lowering of the same mask_mod
}
KERNEL_BASELINE = "sdpa"


def layer_case_factory(name: str, pattern: str) -> Callable[..., Case]:
    def factory(B, T, H, D, causal, dtype, feature_dim=None) -> Case:
        from attnzoo.layers import attention_info, build_attention, pattern_flags

        torch.manual_seed(0)
        options = {"max_len": T} if "max_len" in attention_info(name).options else {}  # cosformer's position range
        layer = build_attention(name, dim=H * D, num_heads=H, **pattern_flags(pattern), **options).to(dtype).train()
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(B, T, H * D, generator=gen, dtype=dtype).requires_grad_(True)
        params = [p for p in layer.parameters() if p.requires_grad]
        if pattern.endswith("cross"):
            context = torch.randn(B, T, H * D, generator=gen, dtype=dtype).requires_grad_(True)
            return Case([x, context], lambda x, c: layer(x, context=c), params)
        return Case([x], lambda x: layer(x), params)

    return factory


# ----------------------------------------------------------------------------------------------------------------
# running


def run(args: argparse.Namespace, on_length: Callable[[dict], None] | None = None) -> dict:
    """Measure every method at every length; ``on_length(partial_result)`` is called after each length."""
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    causal = args.pattern.startswith("causal")
    if args.level == "kernel":
        names = args.ops or list(KERNEL_OPS)
        unknown = [n for n in names if n not in KERNEL_OPS]
        if unknown:
            sys.exit(f"unknown kernel op(s) {unknown}; available: {', '.join(KERNEL_OPS)}")
        baseline = KERNEL_BASELINE
        factories = {n: KERNEL_OPS[n] for n in [baseline, *names]}
    else:
        from attnzoo.layers import list_attention

        names = args.attention or list_attention(args.pattern)
        registered = list_attention(args.pattern)
        unknown = [n for n in names if n not in registered]
        if unknown:
            sys.exit(f"attention(s) {unknown} are not registered with pattern {args.pattern}; have: {registered}")
        baseline = "softmax"
        factories = {n: layer_case_factory(n, args.pattern) for n in [baseline, *names]}
    B, H, D = args.batch, args.heads, args.head_dim
    rows: list[dict] = []
    skipped: dict[str, str] = {}  # method -> reason, once over budget at a shorter length
    for T in args.lengths:
        active = [n for n in factories if n not in skipped]
        skip_rows = [n for n in factories if n in skipped]
        cases = {n: factories[n](B, T, H, D, causal, dtype, args.feature_dim) for n in active}
        times: dict[str, dict[str, list[float]]] = {n: {"fwd": [], "fwdbwd": []} for n in active}
        for n in list(active):  # warmup, and a first check against the time budget
            for _ in range(args.warmup):
                cases[n].forward()
                elapsed = timed(cases[n].forward_backward)
            if elapsed > args.time_budget:
                skipped[n] = f"fwd+bwd took {elapsed:.1f}s > --time-budget {args.time_budget}s at T={T}"
        rounds, started = 0, time.perf_counter()
        # round robin, so load hits every method alike; short lengths get more rounds (--min-time), where one
        # round takes milliseconds and a median of a few is at the mercy of the machine's noise
        while rounds < args.repeats or (rounds < args.max_repeats and time.perf_counter() - started < args.min_time):
            for n in active:
                times[n]["fwd"].append(timed(cases[n].forward))
                times[n]["fwdbwd"].append(timed(cases[n].forward_backward))
            rounds += 1
        for n in active:
            peak = peak_memory(cases[n]) if not args.no_memory else None
            if peak is not None and peak > args.memory_budget * 2**20 and n not in skipped:
                skipped[n] = f"peak {peak / 2**20:.0f} MiB > --memory-budget {args.memory_budget} MiB at T={T}"
            rows.append(
                dict(
                    method=n,
                    T=T,
                    fwd_ms=1e3 * statistics.median(times[n]["fwd"]),
                    fwdbwd_ms=1e3 * statistics.median(times[n]["fwdbwd"]),
                    peak_mib=None if peak is None else peak / 2**20,
                    repeats=rounds,
                )
            )
        for n in skip_rows:
            rows.append(dict(method=n, T=T, skipped=skipped[n]))
        del cases
        print(f"T={T}: done ({', '.join(active)})", file=sys.stderr, flush=True)
        if on_length is not None:
            on_length(summarise(args, baseline, rows))
    return summarise(args, baseline, rows)


def summarise(args: argparse.Namespace, baseline: str, rows: list[dict]) -> dict:
    """Add ratios against the baseline at the same length (same run, medians) and the run's configuration."""
    base = {r["T"]: r for r in rows if r["method"] == baseline and "skipped" not in r}
    for r in rows:
        b = base.get(r["T"])
        if "skipped" in r or b is None:
            continue
        r["fwd_speedup"] = b["fwd_ms"] / r["fwd_ms"]
        r["fwdbwd_speedup"] = b["fwdbwd_ms"] / r["fwdbwd_ms"]
        if r["peak_mib"] and b["peak_mib"]:
            r["memory_ratio"] = b["peak_mib"] / r["peak_mib"]
    return dict(
        config=dict(vars(args), out=str(args.out)),
        baseline=baseline,
        machine=dict(
            python=platform.python_version(),
            torch=torch.__version__,
            processor=platform.processor() or platform.machine(),
            cpu_count=os.cpu_count(),
            load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
        ),
        rows=rows,
    )


def _fit(Ts: list[float], ys: list[float], degree: int) -> list[float] | None:
    """Least squares of y = sum_i c_i T^i (i <= degree) in relative error (each residual divided by y, so short and
    long lengths weigh alike), coefficients kept >= 0 as costs; None with too few points."""
    if len(Ts) < degree + 1:
        return None
    X = torch.tensor([[T**i for i in range(degree + 1)] for T in Ts], dtype=torch.float64)
    y = torch.tensor(ys, dtype=torch.float64)
    Xw, yw = X / y[:, None], torch.ones(len(ys), 1, dtype=torch.float64)  # rows scaled by 1 / y
    coef = torch.linalg.lstsq(Xw, yw).solution[:, 0]
    if (coef < 0).any():  # refit without the negative terms (a cost model has no negative parts)
        keep = coef >= 0
        sub = torch.linalg.lstsq(Xw[:, keep], yw).solution[:, 0]
        coef = torch.zeros_like(coef)
        coef[keep] = sub
    return coef.tolist()


def _crossing(quadratic: list[float], linear: list[float]) -> float | None:
    """Smallest T > 0 where the linear cost model meets the quadratic one (a + bT + cT^2 = a' + b'T), or None."""
    c = quadratic[2]
    b = quadratic[1] - linear[1]
    a = quadratic[0] - linear[0]
    if c <= 0:  # no curvature: the method wins for good only if the baseline grows faster
        return None if b <= 0 else max(0.0, -a / b)
    disc = b * b - 4 * c * a
    if disc < 0:
        return 0.0  # the quadratic model is above the linear one everywhere: the method is always cheaper
    roots = [r for r in ((-b - disc**0.5) / (2 * c), (-b + disc**0.5) / (2 * c)) if r > 0]
    if a >= 0:  # softmax costs more at T = 0 already: cheaper from the start, or after the larger root
        return 0.0 if not roots else max(roots)
    return min(roots) if roots else None


def efficiency_lengths(result: dict) -> list[dict]:
    """CAB's efficiency length (Zhang et al. 2022, "CAB: Comprehensive Attention Benchmarking on Long Sequence
    Modeling", §4.3): fit the baseline's cost as a + bT + cT^2 and each method's as a' + b'T over the measured lengths
    (time of fwd+bwd, and peak memory) and report where the fits cross, beside the crossover read off the measured
    points (the first measured T from which the method is cheaper at every longer length, interpolated in log T)."""
    base = result["baseline"]
    rows = [r for r in result["rows"] if "skipped" not in r]
    out = []
    for m in sorted({r["method"] for r in rows} - {base}):
        entry = {"method": m}
        for key, column in (("time", "fwdbwd_ms"), ("memory", "peak_mib")):
            pairs = {r["T"]: r[column] for r in rows if r["method"] == m and r.get(column)}
            bpairs = {r["T"]: r[column] for r in rows if r["method"] == base and r.get(column)}
            Ts = sorted(set(pairs) & set(bpairs))
            q = _fit(Ts, [bpairs[T] for T in Ts], 2)
            lin = _fit(Ts, [pairs[T] for T in Ts], 1)
            entry[f"{key}_fit"] = None if q is None or lin is None else _crossing(q, lin)
            if entry[f"{key}_fit"] is not None and entry[f"{key}_fit"] > 4 * max(Ts):
                entry[f"{key}_fit"] = f">{4 * max(Ts)}"  # far outside the measured lengths: not a prediction
            entry[f"{key}_measured"] = _measured_crossing(Ts, [pairs[T] / bpairs[T] for T in Ts])
        out.append(entry)
    return out


def _measured_crossing(Ts: list[int], ratios: list[float]) -> float | str | None:
    """T where method / baseline falls below 1 for good (log-T interpolation); '<T0' if cheaper everywhere measured."""
    if not Ts or ratios[-1] >= 1:
        return None
    i = len(ratios) - 1
    while i > 0 and ratios[i - 1] < 1:
        i -= 1
    if i == 0:
        return f"<{Ts[0]}"
    lo, hi = math.log(Ts[i - 1]), math.log(Ts[i])
    frac = (ratios[i - 1] - 1) / (ratios[i - 1] - ratios[i])  # ratio 1 between the two points
    return round(math.exp(lo + frac * (hi - lo)))


def _fmt_length(x) -> str:
    if x is None:
        return "none in range"
    if isinstance(x, str):
        return x
    return "always cheaper" if x == 0 else f"{x:,.0f}"


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def _rounds(result: dict) -> str:
    """'5', or with --min-time the rounds each length got (every method at a length gets the same)."""
    cfg = result["config"]
    if not cfg.get("min_time"):
        return str(cfg["repeats"])
    per_length = {r["T"]: r["repeats"] for r in result["rows"] if "repeats" in r}
    counts = ", ".join(f"{rounds} at T={T}" for T, rounds in sorted(per_length.items()))
    return f"{cfg['repeats']}-{cfg['max_repeats']} rounds, added while a length took < {cfg['min_time']:g} s ({counts})"


def to_markdown(result: dict) -> str:
    cfg = result["config"]
    base = result["baseline"]
    lines = [
        f"Level `{cfg['level']}`, pattern `{cfg['pattern']}`, B={cfg['batch']}, H={cfg['heads']}, "
        f"D={cfg['head_dim']}, {cfg['dtype']}, {cfg['threads']} threads, median of {_rounds(result)} "
        f"(warmup {cfg['warmup']}); speedup and memory ratio = `{base}` / method at the same T, same run. "
        f"Load average at the end: {result['machine']['load_average']}.",
        "",
        "| method | T | fwd ms | fwd+bwd ms | fwd+bwd µs/token | peak MiB (fwd+bwd) | fwd speedup | "
        "fwd+bwd speedup | memory ratio | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in sorted(result["rows"], key=lambda r: (r["method"] != base, r["method"], r["T"])):
        if "skipped" in r:
            lines.append(f"| {r['method']} | {r['T']} | | | | | | | | skipped: {r['skipped']} |")
            continue
        lines.append(
            f"| {r['method']} | {r['T']} | {r['fwd_ms']:.2f} | {r['fwdbwd_ms']:.2f} | "
            f"{1e3 * r['fwdbwd_ms'] / (r['T'] * cfg['batch']):.2f} | {_fmt(r['peak_mib'], '.1f')} | "
            f"{_fmt(r.get('fwd_speedup'), '.2f')} | {_fmt(r.get('fwdbwd_speedup'), '.2f')} | "
            f"{_fmt(r.get('memory_ratio'), '.2f')} | |"
        )
    lengths = efficiency_lengths(result)
    if lengths:
        lines += [
            "",
            f"Efficiency length against `{base}` (CAB: where a linear fit of the method's cost crosses a quadratic fit "
            "of the baseline's; 'measured' = where the measured ratio falls below 1 for good):",
            "",
            "| method | time: fit | time: measured | memory: fit | memory: measured |",
            "|---|---:|---:|---:|---:|",
        ]
        for e in lengths:
            lines.append(
                f"| {e['method']} | {_fmt_length(e['time_fit'])} | {_fmt_length(e['time_measured'])} | "
                f"{_fmt_length(e['memory_fit'])} | {_fmt_length(e['memory_measured'])} |"
            )
    return "\n".join(lines) + "\n"


def line_style(index: int, baseline: bool = False) -> dict:
    """Matplotlib style of the index-th line: up to 20 distinct colours (the default cycle repeats after 10, so a
    full-registry plot drew softmax and cosformer alike) and changing markers; the baseline black and dashed."""
    if baseline:
        return dict(color="black", linestyle="--", linewidth=2, marker="o")
    import matplotlib

    colours = matplotlib.colormaps["tab20"].colors  # pairs of dark and light shades: the dark ten first
    return dict(color=colours[(2 * index) % 20 + (index // 10) % 2], marker="os^Dv<>PX*"[index % 10])


def label_log_ticks(axis, values: list[int]) -> None:
    """Ticks of a log axis at the measured values, as plain numbers (matplotlib's minor labels overlap there)."""
    from matplotlib.ticker import NullFormatter

    axis.set_ticks(values, [f"{v:,}" for v in values])
    axis.set_minor_formatter(NullFormatter())


def plot(result: dict, path: Path) -> None:
    matplotlib = require("matplotlib", "the plot of bench_attention.py")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = sorted({r["method"] for r in result["rows"]})
    for i, m in enumerate(methods):
        pts = [r for r in result["rows"] if r["method"] == m and "skipped" not in r]
        if not pts:
            continue
        Ts = [r["T"] for r in pts]
        style = line_style(i, m == result["baseline"])
        ax_time.plot(Ts, [1e3 * r["fwdbwd_ms"] / r["T"] for r in pts], label=m, **style)
        if all(r["peak_mib"] is not None for r in pts):
            ax_mem.plot(Ts, [r["peak_mib"] for r in pts], label=m, **style)
    ax_time.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="fwd+bwd µs per token")
    ax_mem.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="peak MiB (fwd+bwd)")
    lengths = sorted({r["T"] for r in result["rows"]})
    for ax in (ax_time, ax_mem):
        ax.grid(True, which="both", alpha=0.3)
        label_log_ticks(ax.xaxis, lengths)
        ax.tick_params(axis="x", labelrotation=45)
    ax_time.legend(fontsize=8)
    cfg = result["config"]
    fig.suptitle(
        f"{cfg['level']} level, {cfg['pattern']}, B={cfg['batch']} H={cfg['heads']} D={cfg['head_dim']}, "
        f"{cfg['threads']} threads"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time forward and forward+backward and measure peak memory of attentions (layer level) or "
        "kernels (kernel level) beside softmax SDPA, over sequence lengths; writes results.md/.json/.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--level", choices=["layer", "kernel"], default="layer", help="registered layers or kernel ops")
    p.add_argument("--attention", nargs="+", help="layer level: registered names (default: all with --pattern)")
    p.add_argument("--ops", nargs="+", help=f"kernel level: ops among {', '.join(KERNEL_OPS)} (default: all)")
    p.add_argument(
        "--pattern",
        default="causal_self",
        choices=["noncausal_self", "causal_self", "noncausal_cross", "causal_cross"],
    )
    p.add_argument("--lengths", nargs="+", type=int, default=[256, 512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--feature-dim", type=int, default=None, help="kernel level: q/k width (e.g. 256 random features)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per length, at least")
    p.add_argument(
        "--min-time",
        type=float,
        default=0.0,
        help="keep adding rounds until a length's timing has taken this long (s), up to --max-repeats",
    )
    p.add_argument("--max-repeats", type=int, default=50, help="most rounds per length under --min-time")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--time-budget", type=float, default=30.0, help="skip longer T once one fwd+bwd takes longer (s)")
    p.add_argument("--memory-budget", type=float, default=4096, help="skip longer T once peak exceeds this (MiB)")
    p.add_argument("--no-memory", action="store_true", help="skip the (slower, untimed) peak-memory run")
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    args = p.parse_args(argv)
    if args.warmup < 1 or args.repeats < 1:
        p.error("--warmup and --repeats must be >= 1")
    if args.min_time < 0 or args.max_repeats < args.repeats:
        p.error("--min-time must be >= 0 and --max-repeats >= --repeats")
    return args


def write(result: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    table = to_markdown(result)
    (out / "results.md").write_text(table)
    summary = {**result, "efficiency_lengths": efficiency_lengths(result)}
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    plot(result, out / "results.png")
    return table


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tune_malloc()  # opt-in (train.py: tune_malloc=true): the published numbers reuse freed CPU memory
    # files are rewritten after every length, so an interrupted long run keeps what it measured
    result = run(args, on_length=lambda partial: write(partial, args.out))
    print(write(result, args.out))
    print(f"wrote {args.out}/results.md, results.json, results.png", file=sys.stderr)


if __name__ == "__main__":
    main()
