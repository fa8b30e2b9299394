"""A zoo attention inside a tiny Hugging Face Llama built from a config (no download): forward, backward, generate
with and without the cache, the zoo state kept in HF's Cache object, and left padding."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from attnzoo.hf import HFAttention, replace_attention  # noqa: E402

LAYERS = ["softmax", "gla", "mamba"]


def _tiny_llama(name: str, **options) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=100,
        max_position_embeddings=128,
    )
    return replace_attention(LlamaForCausalLM(config), name, **options)


@pytest.mark.parametrize("name", LAYERS)
def test_forward_backward_and_generate_with_and_without_cache(name):
    model = _tiny_llama(name)
    assert all(isinstance(layer.self_attn, HFAttention) for layer in model.model.layers)
    ids = torch.randint(0, 100, (2, 10))
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.model.layers[0].self_attn.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    model.eval()
    prompt = ids[:, :4]
    cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.shape == (2, 12)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("name", LAYERS)
def test_prefill_then_steps_equal_one_forward_and_state_lives_in_the_hf_cache(name):
    model = _tiny_llama(name).eval()
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        cache = DynamicCache()
        steps = [model(input_ids=ids[:, :5], cache=cache, use_cache=True).logits]
        for t in range(5, 9):
            steps.append(model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)
    assert sorted(cache._attnzoo_states) == [0, 1]
    assert cache.get_seq_length() == 9


def test_left_padding_does_not_change_a_sequence():
    model = _tiny_llama("gla").eval()
    prompt = torch.randint(1, 100, (1, 5))
    alone = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)], dim=1)
    batch = model.generate(
        torch.cat([padded, torch.cat([prompt[:, :1].repeat(1, 3), prompt], 1)]),
        attention_mask=torch.cat([mask, torch.ones_like(mask)]),
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
    )
    assert torch.equal(batch[0, 3:], alone[0])


def test_replace_attention_needs_a_model_with_self_attn():
    model = torch.nn.Linear(2, 2)
    model.config = LlamaConfig(hidden_size=64, num_attention_heads=4)
    with pytest.raises(ValueError, match="no module with a self_attn"):
        replace_attention(model, "gla")
