"""DePT (Shi & Lipani, 2024): a shorter soft prompt plus a low-rank offset on the input embeddings.

The defining properties against hand computations: the model sees ``[P; E + (A B)_{0..T-1}]``;
the trainable count is the paper's ``m*d + s*r + r*d``; at init (``B = 0``) it is prompt tuning
with the short prompt; the pair learns ``lr_ratio`` times as fast as the prompt under AdamW; a
left-padded row is that row alone; inputs past ``max_length`` and bad files fail clearly.
"""
from __future__ import annotations

import pytest
import torch
from conftest import HIDDEN, VOCAB, make_bert, make_llama
from safetensors.torch import load_file, save_file

import peftlab
from peftlab.core import model_adapters
from peftlab.methods.dept import parameter_count

SCALE = dict(initializer_range=0.2)
SPEC = "dept[length=4,r=3,max_length=16,lr_ratio=1]"  # offsets as large as the prompt's moves


def llama():
    return make_llama(**SCALE)


def the_module(model):
    (module,) = [m for _, _, m in model_adapters.model_adapters(model)]
    return module


def moved(model, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in the_module(model).parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def batch(rows=3, length=6):
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(2))


def run(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def test_the_model_sees_the_prompt_then_the_embeddings_plus_their_low_rank_offsets():
    model = moved(peftlab.attach(llama(), SPEC))
    module = the_module(model)
    a, b = module.scaled_a * module.ratio, module.scaled_b * module.ratio
    assert a.shape == (16, 3) and b.shape == (3, HIDDEN)
    ids = batch()
    with torch.no_grad(), peftlab.disabled(model):
        table = model.get_input_embeddings().weight
        offsets = torch.stack([sum(a[i, k] * b[k] for k in range(3)) for i in range(6)])  # (A B)_i, by hand
        embeds = torch.cat([module.prompt_embeddings.expand(3, -1, -1), table[ids] + offsets], 1)
        expected = model(inputs_embeds=embeds).logits[:, 4:]
    torch.testing.assert_close(run(model, ids), expected, rtol=1e-5, atol=1e-5)


def test_the_trainable_count_is_the_papers_formula():
    for spec, (m, s, r) in [("dept[length=4,r=3,max_length=16]", (4, 16, 3)), ("dept", (40, 256, 45))]:
        model = peftlab.attach(llama(), spec)
        assert peftlab.summary(model)["trainable"] == parameter_count(m, s, r, HIDDEN) == m * HIDDEN + s * r + r * HIDDEN
    # the authors' GLUE budget on T5-Base (d=768): 40 tokens, rank 45, 256 positions = 100 prompt tokens
    assert parameter_count(40, 256, 45, 768) == 100 * 768


def test_at_init_it_is_prompt_tuning_with_the_short_prompt():
    model = peftlab.attach(llama(), SPEC)
    module = the_module(model)
    assert torch.count_nonzero(module.scaled_b) == 0 and torch.count_nonzero(module.scaled_a) > 0
    prompt = peftlab.attach(llama(), "prompt[length=4]")
    with torch.no_grad():
        the_module(prompt).prompt_embeddings.copy_(module.prompt_embeddings)
    ids = batch()
    torch.testing.assert_close(run(model, ids), run(prompt, ids), rtol=0, atol=0)


def test_the_pair_learns_lr_ratio_times_as_fast_as_the_prompt_under_adam():
    """One Adam step moves every entry by about lr (its first step is lr * sign(grad)): the prompt's
    entries by lr, A's and B's (the true factors) by lr * lr_ratio."""
    model = moved(peftlab.attach(llama(), "dept[length=4,r=3,max_length=16,lr_ratio=0.1]"), std=0.1)
    module = the_module(model)
    before = [module.prompt_embeddings.detach().clone(), *(f.detach().clone() for f in module_factors(module))]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = batch()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    after = [module.prompt_embeddings.detach(), *module_factors(module)]
    steps = [(new - old).abs().max().item() for new, old in zip(after, before)]
    assert steps[0] == pytest.approx(1e-3, rel=1e-2)
    assert steps[1] == pytest.approx(1e-4, rel=1e-2) and steps[2] == pytest.approx(1e-4, rel=1e-2)


def module_factors(module):
    return [t.detach() for t in (module.scaled_a * module.ratio, module.scaled_b * module.ratio)]


def test_a_left_padded_row_is_that_row_alone():
    model = moved(peftlab.attach(llama(), SPEC))
    ids = batch()
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    padded = run(model, ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))  # as generate does
    alone = run(model, ids[1:2, 2:])
    torch.testing.assert_close(padded[1, 2:], alone[0], rtol=1e-5, atol=1e-5)


def test_cached_generation_equals_full_forwards_on_the_prompt_and_offsets():
    """generate's later steps reuse the cache; the offsets sit on the given tokens only."""
    model = moved(peftlab.attach(llama(), SPEC))
    ids = batch(rows=2)
    with torch.no_grad():
        generated = model.generate(input_ids=ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(generated[:, -1], run(model, ids)[:, -1].argmax(-1), rtol=0, atol=0)


def test_inputs_longer_than_max_length_fail_clearly():
    model = peftlab.attach(llama(), "dept[length=2,r=2,max_length=5]")
    with pytest.raises(peftlab.StateError, match="max_length=5"):
        model(input_ids=batch(length=6))


def test_works_on_an_encoder_classifier():
    model = moved(peftlab.attach(make_bert(**SCALE), "dept[length=4,r=3,max_length=16]"))
    out, base = run(model, batch()), run(make_bert(**SCALE), batch())
    assert out.shape == base.shape and not torch.allclose(out, base)


def test_save_load_is_exact_and_bad_files_fail_clearly(tmp_path):
    model = moved(peftlab.attach(llama(), "dept[length=4,r=3,max_length=16]"))
    peftlab.save(model, tmp_path)
    ids = batch()
    torch.testing.assert_close(run(peftlab.load(llama(), tmp_path), ids), run(model, ids), rtol=0, atol=1e-6)
    weights = tmp_path / "adapter_model.safetensors"
    saved = load_file(weights)
    (a_key,) = [k for k in saved if k.endswith("lora_embedding_A")]
    module = the_module(model)
    torch.testing.assert_close(saved[a_key], module.scaled_a * module.ratio)  # the true A, whatever lr_ratio
    save_file({**saved, a_key: torch.zeros(8, 3)}, str(weights))
    with pytest.raises(peftlab.IncompatibleBaseError, match="lora_embedding_A"):
        peftlab.load(llama(), tmp_path)
    save_file({k: v for k, v in saved.items() if k != a_key}, str(weights))
    with pytest.raises(peftlab.AdapterFormatError, match="lora_embedding_A"):
        peftlab.load(llama(), tmp_path)
