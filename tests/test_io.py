"""Safe loading: safetensors round trip of a tied-weight model, weights-only checkpoint reads, clear errors."""

from __future__ import annotations

import pytest
import torch

from attnzoo.models import GPT, load_checkpoint, load_weights, save_weights


def test_safetensors_round_trip_keeps_outputs_and_tied_weights(tmp_path):
    torch.manual_seed(0)
    model = GPT(64, dim=32, depth=2, num_heads=4).eval()
    path = save_weights(model, tmp_path / "gpt.safetensors")
    torch.manual_seed(1)
    other = GPT(64, dim=32, depth=2, num_heads=4).eval()
    idx = torch.randint(0, 64, (2, 9))
    assert not torch.equal(other(idx), model(idx))
    load_weights(other, path)
    torch.testing.assert_close(other(idx), model(idx), atol=0, rtol=0)
    assert other.head.weight is other.tok_emb.weight


def test_load_weights_rejects_a_different_architecture(tmp_path):
    path = save_weights(GPT(64, dim=32, depth=2, num_heads=4), tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="does not match GPT"):
        load_weights(GPT(64, dim=32, depth=3, num_heads=4), path)
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_weights(GPT(64, dim=32), tmp_path / "absent.safetensors")


class _Exploit:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_checkpoint_loading_never_executes_code(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Exploit()}, path)
    with pytest.raises(ValueError, match="not a weights-only checkpoint"):
        load_checkpoint(path)


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    path = tmp_path / "cut.ckpt"
    torch.save({"state_dict": GPT(64, dim=32).state_dict()}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_checkpoint(path)
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "step": 3}, good)
    assert load_checkpoint(good)["step"] == 3
