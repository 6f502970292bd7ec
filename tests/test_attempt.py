"""ATTEMPT (Asai et al., 2022): frozen source prompts and a target prompt, mixed per input by attention.

The defining property against a hand computation fed to the plain model, sources read from saved
peftlab prompt adapters (frozen while the target prompt and the attention train), an adapter that
loads without its source files, KV-cached generation, and clear errors for bad sources.
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import VOCAB, make_llama
from safetensors.torch import save_file

import peftlab
from peftlab.core import model_adapters
from peftlab.train import TrainConfig, train

SCALE = dict(initializer_range=0.2)  # weights at a pretrained scale, so virtual tokens visibly matter


def llama():
    return make_llama(**SCALE)


def the_module(model):
    (module,) = [m for _, _, m in model_adapters.model_adapters(model)]
    return module


def perturbed(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def batch(rows=3, length=6):
    ids = torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[-1, :2] = 0  # a left-padded row: its padding must not enter the max-pool
    return ids, mask


def saved_prompt(tmp_path, name, length=3, seed=0):
    model = peftlab.attach(make_llama(seed=seed, **SCALE), f"prompt[length={length},init=random]")
    return str(peftlab.save(model, tmp_path / name))


# ---- the defining property ---------------------------------------------------------------------

def test_each_row_gets_the_target_prompt_plus_its_attention_mixture_by_hand():
    """x = maxpool(X), h = LN(W_up silu(W_down x)), a = softmax(maxpool(P_j)·h / (d e)), P = P_t + sum a_j P_j."""
    model = perturbed(peftlab.attach(llama(), "attempt[length=3,random_sources=2,attn_r=4]"))
    module = the_module(model)
    prompts = torch.cat([module.source_prompts, module.prompt_embeddings[None]])  # (3 x 3 x 32), target last
    att = module.attention
    ids, mask = batch()
    with torch.no_grad():
        expected = []
        for row in range(ids.shape[0]):
            tokens = model.get_input_embeddings()(ids[row])
            x = torch.stack([max(tokens[i, j] for i in range(tokens.shape[0]) if mask[row, i]) for j in range(32)])
            z = att.up.weight @ (lambda v: v * torch.sigmoid(v))(att.down.weight @ x)  # no biases
            h = (z - z.mean()) / torch.sqrt(z.var(unbiased=False) + att.norm.eps) * att.norm.weight + att.norm.bias
            scores = torch.stack([prompts[j].max(0).values @ h for j in range(3)]) / (32 * math.e)
            a = torch.exp(scores) / torch.exp(scores).sum()
            prompt = prompts[2] + sum(a[j] * prompts[j] for j in range(3))
            embeds = torch.cat([prompt, tokens])[None]
            with peftlab.disabled(model):
                out = model(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(3, dtype=mask.dtype), mask[row]])[None])
            expected.append(out.logits[0, 3:])
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_the_mixture_is_per_input_and_sums_to_one():
    model = perturbed(peftlab.attach(llama(), "attempt[length=3,random_sources=3,temperature=0.5]"))
    module = the_module(model)
    ids, mask = batch()
    with torch.no_grad():
        from peftlab.methods.attempt import pool_inputs

        weights = module.weights(pool_inputs(model.get_input_embeddings()(ids), mask))
    assert weights.shape == (3, 4)  # 3 sources + the target
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    assert not torch.allclose(weights[0], weights[1])


# ---- sources -----------------------------------------------------------------------------------

def test_sources_come_from_saved_prompt_adapters_and_stay_frozen(tmp_path):
    paths = [saved_prompt(tmp_path, "a", seed=1), saved_prompt(tmp_path, "b", seed=2)]
    sources = [the_module(peftlab.attach(make_llama(seed=s, **SCALE), "prompt[length=3,init=random]")).prompt_embeddings
               for s in (1, 2)]
    model = peftlab.attach(llama(), f"attempt[length=3,sources=[{paths[0]},{paths[1]}]]")
    module = the_module(model)
    torch.testing.assert_close(module.source_prompts, torch.stack([s.detach() for s in sources]), rtol=0, atol=0)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    rows = [{"input_ids": r, "labels": r} for r in batch(4)[0]]
    train(model, rows, TrainConfig(lr=1e-2, steps=3, batch_size=4, warmup_steps=0, progress=False, device="cpu"))
    after = module.state_dict()
    assert torch.equal(after["source_prompts"], before["source_prompts"])
    assert not torch.equal(after["prompt_embeddings"], before["prompt_embeddings"])
    assert not torch.equal(after["attention.down.weight"], before["attention.down.weight"])


def test_a_saved_attempt_adapter_loads_without_its_source_files(tmp_path):
    path = saved_prompt(tmp_path, "src", seed=3)
    model = perturbed(peftlab.attach(llama(), f"attempt[length=3,sources=[{path}]]"))
    ids, mask = batch()
    expected = model(input_ids=ids, attention_mask=mask).logits.detach()
    peftlab.save(model, tmp_path / "attempt")
    (tmp_path / "src" / "adapter_model.safetensors").unlink()
    loaded = peftlab.load(llama(), tmp_path / "attempt")
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=1e-6)
    with pytest.raises(peftlab.ConfigError, match="source"):  # a fresh attach does need them
        peftlab.attach(llama(), f"attempt[length=3,sources=[{path}]]")


def test_cached_generation_matches_generation_without_a_cache():
    model = perturbed(peftlab.attach(llama(), "attempt[length=3]"))
    ids, mask = batch()
    settings = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **settings)
        plain = model.generate(ids, use_cache=False, **settings)
    assert torch.equal(cached, plain)


# ---- errors ------------------------------------------------------------------------------------

def test_bad_sources_fail_clearly(tmp_path):
    path = saved_prompt(tmp_path, "four", length=4)
    with pytest.raises(peftlab.IncompatibleBaseError, match="length"):
        peftlab.attach(llama(), f"attempt[length=3,sources=[{path}]]")
    save_file({"a.prompt_embeddings": torch.zeros(3, 32), "b.prompt_embeddings": torch.zeros(3, 32)},
              str(tmp_path / "two.safetensors"))
    with pytest.raises(peftlab.AdapterFormatError, match="exactly one soft prompt"):
        peftlab.attach(llama(), f"attempt[length=3,sources=[{tmp_path / 'two.safetensors'}]]")
    with pytest.raises(peftlab.ConfigError, match="not a saved soft-prompt adapter"):
        peftlab.attach(llama(), f"attempt[length=3,sources=[{tmp_path / 'nowhere'}]]")
    with pytest.raises(peftlab.ConfigError, match="temperature"):
        peftlab.attach(llama(), "attempt[temperature=0]")
