"""GPT: greedy generation with the per-layer caches equals generation without them, for every registered attention
with a causal_self pattern (parametrised over the registry); shape and length errors; hybrids."""

from __future__ import annotations

import pytest
import torch

from attnzoo.layers import list_attention
from attnzoo.models import GPT, MODELS


@pytest.mark.parametrize("name", list_attention("causal_self"))
def test_greedy_generate_with_cache_equals_without(name):
    torch.manual_seed(0)
    model = GPT(48, dim=32, depth=2, num_heads=4, attention=name, max_seq_len=32).double().eval()
    prompt = torch.randint(0, 48, (2, 4))
    with_cache = model.generate(prompt, max_new_tokens=4, temperature=0, use_cache=True)
    without = model.generate(prompt, max_new_tokens=4, temperature=0, use_cache=False)
    assert with_cache.shape == (2, 8)
    assert torch.equal(with_cache, without)


def test_hybrid_attention_per_layer():
    model = GPT(32, dim=32, depth=2, num_heads=4, attention=["softmax", {"name": "softmax", "rope": True}])
    assert model.blocks[0].attn.rope is None and model.blocks[1].attn.rope is not None
    with pytest.raises(ValueError, match="has 3 entries but the model has depth=2"):
        GPT(32, dim=32, depth=2, num_heads=4, attention=["softmax"] * 3)


def test_longer_than_learned_positions_is_a_clear_error():
    model = GPT(32, dim=32, depth=1, num_heads=4, positions="learned", max_seq_len=8)
    with pytest.raises(ValueError, match="longer than max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_model_registry_and_task():
    assert MODELS["gpt"] is GPT and GPT.task == "lm"
    logits = GPT(32, dim=32, depth=1, num_heads=4)(torch.zeros(2, 7, dtype=torch.long))
    assert logits.shape == (2, 7, 32)
    with pytest.raises(ValueError, match=r"\(B, T\) token ids"):
        GPT(32, dim=32, depth=1, num_heads=4)(torch.zeros(7, dtype=torch.long))
