"""The benchmark scripts: the efficiency-length fit recovers a known crossover, and each script runs end to end at toy
sizes (so a report command in docs/benchmarks.md cannot silently rot). Timing itself is never asserted."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load(name: str):
    if str(SCRIPTS) not in sys.path:  # as when run as `python scripts/<name>.py`: siblings import each other
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_efficiency_length_fit_recovers_the_crossing_of_known_cost_models():
    bench = load("bench_attention")
    Ts = [256, 512, 1024, 2048, 4096]
    quadratic = lambda T: 0.5 + 1e-3 * T + 2e-6 * T * T  # softmax-like
    linear = lambda T: 2.0 + 3e-3 * T  # crosses where 2e-6 T^2 - 2e-3 T - 1.5 = 0: T = 1,500
    rows = [dict(method="base", T=T, fwdbwd_ms=quadratic(T), peak_mib=1.0 + T) for T in Ts]
    rows += [dict(method="lin", T=T, fwdbwd_ms=linear(T), peak_mib=2.0 + T) for T in Ts]
    (entry,) = bench.efficiency_lengths({"baseline": "base", "rows": rows})
    assert entry["time_fit"] == pytest.approx(1500.0, rel=1e-3)
    assert 1024 < entry["time_measured"] < 2048  # read off the measured points, between the two that bracket it
    assert entry["memory_measured"] is None  # linear memory for both: the method never becomes cheaper


def test_crossing_cases():
    bench = load("bench_attention")
    assert bench._crossing([1.0, 1.0, 1.0], [0.5, 0.5]) == 0.0  # cheaper everywhere
    assert bench._crossing([0.0, 1.0, 0.0], [0.0, 2.0]) is None  # costlier everywhere, no curvature to catch up
    assert bench._crossing([0.0, 0.0, 1.0], [0.0, 4.0]) == pytest.approx(4.0)


def test_bench_attention_kernel_level_runs_and_reports_efficiency_lengths(tmp_path):
    bench = load("bench_attention")
    args = ["--level", "kernel", "--ops", "linear_attn", "selective_scan", "simple_gla", "--lengths", "32", "64"]
    # --min-time adds rounds past --repeats; a tiny op never fills 60 s, so every length stops at --max-repeats
    bench.main(
        [*args, "--repeats", "1", "--min-time", "60", "--max-repeats", "3", "--threads", "1", "--out", str(tmp_path)]
    )
    table = (tmp_path / "results.md").read_text()
    assert "Efficiency length against `sdpa`" in table and "| selective_scan |" in table
    result = json.loads((tmp_path / "results.json").read_text())
    assert {e["method"] for e in result["efficiency_lengths"]} == {"linear_attn", "selective_scan", "simple_gla"}
    assert {r["repeats"] for r in result["rows"]} == {
        3
    } and "median of 1-3 rounds, added while a length took < 60 s (3 at T=32, 3 at T=64)" in table
    assert (tmp_path / "results.png").stat().st_size > 0


def test_bench_mqar_runs_a_tiny_sweep_and_resumes(tmp_path):
    cmd = [sys.executable, str(SCRIPTS / "bench_mqar.py"), "--attention", "softmax", "linear", "--cells", "16x2"]
    cmd += ["--max-steps", "2", "--eval-every", "1", "--train-examples", "64", "--test-examples", "16"]
    cmd += ["--workers", "1", "--out", str(tmp_path)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert {r["attention"] for r in runs} == {"softmax", "linear"} and all(0 <= r["test_acc"] <= 1 for r in runs)
    assert "| softmax | 64 |" in (tmp_path / "mqar.md").read_text()
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert "0 cells to run (2 resumed" in second.stdout


def test_bench_decode_steps_every_context_round_robin_and_writes_the_tables(tmp_path):
    # cosformer has a fixed position range: the script must size it for every step it takes, timed or not
    cmd = [sys.executable, str(SCRIPTS / "bench_decode.py"), "--attention", "cosformer", "softmax"]
    cmd += ["--contexts", "8", "24", "--steps", "6", "--dim", "32", "--depth", "1", "--heads", "2"]
    cmd += ["--new-tokens", "4", "--threads", "1", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "skipped" not in out.stdout
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    assert [r["attention"] for r in rows] == ["cosformer", "softmax"]
    assert all(set(r["ms_per_token"]) == {"8", "24"} and min(r["ms_per_token"].values()) > 0 for r in rows)
    assert "| cosformer |" in (tmp_path / "decode.md").read_text()


def test_bench_decode_times_the_requested_number_of_steps(monkeypatch):
    bench = load("bench_decode")
    import torch

    from attnzoo.models import GPT

    model = GPT(16, dim=32, depth=1, num_heads=2, attention="linear").eval()
    offsets = []
    forward = model.forward

    def spy(tokens, caches=None, offset=0):
        offsets.append((tokens.shape[1], offset))
        return forward(tokens, caches=caches, offset=offset)

    monkeypatch.setattr(model, "forward", spy)
    clock = iter(range(10_000))
    monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(clock)))
    torch.manual_seed(0)
    ms = bench.per_token_ms(model, [5, 9], steps=6, vocab=16)
    assert set(ms) == {5, 9}
    # 6 timed steps per context in visits of ROUND_STEPS = 4, each after one untimed step: 2 visits, 8 steps
    single = [offset for length, offset in offsets if length == 1]
    assert sorted(single) == sorted([*range(5, 13), *range(9, 17)])
    assert single[:5] == [5, 6, 7, 8, 9] and single[5:10] == [9, 10, 11, 12, 13]  # context 5's visit, then 9's
    assert ms == {5: 1e3, 9: 1e3}  # the fake clock ticks once per timed step


@pytest.mark.parametrize("script", sorted(p.stem for p in SCRIPTS.glob("*.py")))
def test_every_script_has_help(script):
    out = subprocess.run([sys.executable, str(SCRIPTS / f"{script}.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage" in out.stdout.lower(), out.stderr[-1000:]
