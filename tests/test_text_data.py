"""Byte-level text data: byte round trip, split by file, windows, the default standard-library corpus."""

from __future__ import annotations

import pytest
import torch

from attnzoo.data.text import TextDataModule, corpus_files, decode, encode, stdlib_dir


def write_corpus(root, n=10):
    for i in range(n):
        (root / f"f{i}.txt").write_text(f"file {i}: héllo wörld ✓\n" * (20 + i), encoding="utf-8")
    (root / "skip.bin").write_bytes(b"\x00" * 50)


def test_byte_round_trip():
    text = "def f(x):\n    return 'héllo ✓ 🐍'\n"
    ids = encode(text)
    assert ids.dtype == torch.long and int(ids.max()) < 256
    assert len(ids) == len(text.encode("utf-8"))
    assert decode(ids) == text


def test_split_by_file_and_windows(tmp_path):
    write_corpus(tmp_path)
    dm = TextDataModule(
        path=tmp_path,
        pattern="*.txt",
        seq_len=16,
        val_fraction=0.2,
        test_fraction=0.1,
        data_dir=tmp_path / "cache",
        batch_size=4,
    )
    dm.setup()
    parts = dm.split_paths
    assert sorted(p.name for s in parts.values() for p in s) == sorted(f"f{i}.txt" for i in range(10))
    assert not set(parts["train"]) & set(parts["val"]) and not set(parts["train"]) & set(parts["test"])
    assert len(parts["val"]) == 2 and len(parts["test"]) == 1
    # the val stream is exactly its files' bytes
    expected = b"\n".join(p.read_bytes() for p in parts["val"])
    assert decode(dm.splits["val"].stream) == expected.decode("utf-8")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 16)
    torch.testing.assert_close(batch["input_ids"][:, 1:], batch["labels"][:, :-1])  # labels are the next bytes
    assert dm.model_kwargs() == {"vocab_size": 256, "max_seq_len": 16}
    assert list((tmp_path / "cache" / "text").glob("*.pt"))


def test_single_file_is_split_by_bytes(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("abcdefghij" * 100)
    dm = TextDataModule(path=path, seq_len=8, data_dir=tmp_path / "cache")
    dm.setup()
    sizes = {s: len(d.stream) for s, d in dm.splits.items()}
    assert sum(sizes.values()) == 1000 and sizes["train"] == 900


def test_default_corpus_is_the_standard_library():
    files = corpus_files()
    assert len(files) > 100
    assert all(stdlib_dir() in f.parents and "site-packages" not in f.parts for f in files[:50])
    assert any(f.name == "os.py" for f in files)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a file nor a folder"):
        corpus_files(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no file matching"):
        corpus_files(tmp_path, "*.nothing")


def test_experiment_gpt_text_runs_and_generate_samples(tmp_path, data_dir):
    """``experiment=gpt_text`` on a small folder, then scripts/generate.py continues a prompt from its checkpoint."""
    import importlib.util
    import json
    from pathlib import Path

    from conftest import compose_train, shrink
    from omegaconf import open_dict

    from attnzoo.training import run

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_corpus(corpus, n=12)
    cfg = shrink(compose_train(["experiment=gpt_text"]), tmp_path / "run", data_dir)
    with open_dict(cfg):
        cfg.data.path = str(corpus)
        cfg.data.pattern = "*.txt"
        cfg.data.seq_len = 32
        cfg.data.max_bytes = None
        cfg.data.batch_size = 8
        cfg.model.dim = 32
        cfg.model.depth = 1
        cfg.trainer.limit_train_batches = 2
        cfg.trainer.limit_val_batches = 1
        cfg.trainer.limit_test_batches = 1
        cfg.trainer.val_check_interval = 1.0
    run(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["model"] == "gpt" and "test/loss" in summary["test_metrics"]

    script = Path(__file__).resolve().parents[1] / "scripts" / "generate.py"
    spec = importlib.util.spec_from_file_location("generate_script", script)
    generate_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate_script)
    model = generate_script.load_model(tmp_path / "run" / "checkpoints" / "last.ckpt")
    torch.manual_seed(0)
    text = generate_script.generate(model, "file ", max_new_tokens=20, temperature=1.0, top_k=None)
    assert text.startswith("file ") and len(text.encode("utf-8", errors="surrogatepass")) >= 5
    greedy_cached = generate_script.generate(model, "file ", max_new_tokens=10, temperature=0)
    greedy_plain = generate_script.generate(model, "file ", max_new_tokens=10, temperature=0, use_cache=False)
    assert greedy_cached == greedy_plain
    with pytest.raises(SystemExit, match="no checkpoint"):
        generate_script.load_model(tmp_path / "missing.ckpt")
