"""CPT, Context-aware Prompt Tuning (Blau et al., 2024): the context's embeddings, refined within balls.

The prompt is the context tokens' embeddings plus a trained update that only template and input
tokens get; after every optimizer step each token's update is projected back into its ball (checked
by hand, against HF PEFT's own projection, and through ``peftlab.train``); HF PEFT's ``CPT`` files
both ways (peft's causal-LM logits include the virtual positions).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import VOCAB, make_bert, make_llama
from safetensors.torch import load_file, save_file

import peftlab
from peftlab.core import adapters as core
from peftlab.core import model_adapters
from peftlab.train import TrainConfig, train

peft = pytest.importorskip("peft")

SCALE = dict(initializer_range=0.2)
TOKENS, TYPES = [5, 6, 7, 8, 9, 10, 11, 12], [1, 2, 2, 3, 4, 0, 6, 8]  # two examples; type 0: a separator
SPEC = f"cpt[token_ids={TOKENS},types={TYPES},epsilon=2,format_epsilon=1]".replace(" ", "")
MOVABLE = torch.tensor([True, True, True, True, False, False, True, False])


def llama():
    return make_llama(**SCALE)


def the_module(model):
    (module,) = [m for _, _, m in model_adapters.model_adapters(model)]
    return module


def batch(rows=3, length=6):
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(2))


def run(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def pushed(model, std=1.0, seed=0):
    """Every token's update moved far off its init (outside its ball), as by large steps."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        the_module(model).delta.add_(torch.randn(the_module(model).delta.shape, generator=g) * std)
    return model


# ---- the defining property ---------------------------------------------------------------------

def test_the_prompt_is_the_contexts_embeddings_plus_the_update_of_movable_tokens():
    model = pushed(peftlab.attach(llama(), SPEC))
    module = the_module(model)
    table = model.get_input_embeddings().weight
    torch.testing.assert_close(module.embedding, table[TOKENS])
    expected_prompt = table[TOKENS] + module.delta * MOVABLE[:, None]
    ids = batch()
    with torch.no_grad(), peftlab.disabled(model):
        embeds = torch.cat([expected_prompt.expand(3, -1, -1), model.get_input_embeddings()(ids)], 1)
        expected = model(inputs_embeds=embeds).logits[:, len(TOKENS):]
    torch.testing.assert_close(run(model, ids), expected, rtol=1e-5, atol=1e-5)
    assert peftlab.summary(model)["trainable"] == len(TOKENS) * 32


def test_after_a_step_each_update_is_projected_into_its_ball():
    """delta_i <- delta_i * eps_i / max(|delta_i|, eps_i); eps: 1 (templates) or 2 (inputs) * sqrt(32/2048)."""
    model = pushed(peftlab.attach(llama(), SPEC))
    module = the_module(model)
    with torch.no_grad():
        module.delta[2] = module.delta[2] / module.delta[2].norm() * 0.1  # already inside its ball: stays
    before = module.delta.detach().clone()
    core.after_step(model, 1, 10)
    scale = math.sqrt(32 / 2048)
    radius = {1: 1 * scale, 2: 2 * scale, 3: 1 * scale}
    for i, t in enumerate(TYPES):
        eps = radius.get(t % 4, 1e-10) if t > 0 else 1e-10
        norm = float(before[i].norm())
        expected = before[i] * (eps / max(norm, eps))
        torch.testing.assert_close(module.delta[i].detach(), expected)
    torch.testing.assert_close(module.delta[2].detach(), before[2])
    assert float(module.delta[1].detach().norm()) == pytest.approx(2 * scale)


def test_the_projection_is_pefts():
    model = pushed(peftlab.attach(llama(), SPEC))
    module = the_module(model)
    config = peft.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=TOKENS, cpt_tokens_type_mask=TYPES,
                            opt_projection_epsilon=2, opt_projection_format_epsilon=1)
    config.token_dim = 32
    theirs = peft.tuners.cpt.CPTEmbedding(config, llama().get_input_embeddings())
    with torch.no_grad():
        theirs.delta_embedding.weight.copy_(module.delta)
        expected = theirs.get_projection()
    core.after_step(model, 1, 10)
    torch.testing.assert_close(module.delta.detach(), expected)
    torch.testing.assert_close(module.eps, theirs.get_epsilon())


def test_only_template_and_input_tokens_get_gradients():
    model = peftlab.attach(llama(), SPEC)
    model(input_ids=batch()).logits.square().mean().backward()
    grad = the_module(model).delta.grad
    assert all(bool(grad[i].abs().sum() > 0) == bool(MOVABLE[i]) for i in range(len(TOKENS)))
    assert all(p.grad is None for n, p in model.named_parameters() if "peftlab" not in n)


def test_the_trainer_projects_after_every_step():
    model = peftlab.attach(llama(), SPEC)
    module = the_module(model)
    embedding = module.embedding.clone()
    ids = batch(rows=4, length=8)
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]
    steps = []
    model.get_input_embeddings().register_forward_hook(
        lambda *_: steps.append(module.delta.detach().norm(dim=1).clone()))  # the update each forward sees
    result = train(model, rows, TrainConfig(lr=0.5, steps=4, batch_size=4, warmup_steps=0, schedule="constant",
                                            progress=False, device="cpu"))
    assert result.losses[-1] < result.losses[0]
    torch.testing.assert_close(module.embedding, embedding, rtol=0, atol=0)  # the init never moves
    norms = module.delta.detach().norm(dim=1)
    eps = module.eps
    assert bool((norms <= eps * (1 + 1e-5)).all()) and bool((steps[-1] <= eps * (1 + 1e-5)).all())
    assert torch.allclose(norms[MOVABLE], eps[MOVABLE], rtol=1e-4)  # lr 0.5 pushes every movable token to its edge


def test_generate_reads_the_context_once():
    model = pushed(peftlab.attach(llama(), SPEC))
    core.after_step(model, 1, 1)
    ids = batch()
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                   do_sample=False, pad_token_id=0)
        greedy = ids
        for _ in range(3):
            greedy = torch.cat([greedy, model(input_ids=greedy).logits[:, -1].argmax(-1, keepdim=True)], 1)
    torch.testing.assert_close(generated, greedy, rtol=0, atol=0)


# ---- the loss on the context's own labels -----------------------------------------------------------

def test_the_contexts_labels_are_predicted_from_the_context_before_them():
    """Labels at positions 4 (type 4, example 0) and 7 (type 8, example 1); with decay 0.5 the last
    example weighs 0.5 and the one before 0.25 (the user's labels weigh 1)."""
    model = pushed(peftlab.attach(llama(), SPEC[:-1] + ",weighted_loss=decay,loss_decay=0.5]"), std=0.01)
    module = the_module(model)
    with torch.no_grad(), peftlab.disabled(model):
        logits = model(inputs_embeds=module.prompt()[None]).logits[0]
    by_hand = [torch.nn.functional.cross_entropy(logits[p - 1:p], torch.tensor([TOKENS[p]])) for p in (4, 7)]
    expected = (0.25 * by_hand[0] + 0.5 * by_hand[1]) / 2
    torch.testing.assert_close(core.regularization(model), expected)
    plain = peftlab.attach(llama(), SPEC)
    assert float(core.regularization(plain)) > 0
    assert core.regularization(peftlab.attach(llama(), "cpt[token_ids=[3,4],types=[1,2]]")) is None  # no labels


def test_the_context_loss_is_pefts(tmp_path):
    """PEFT's CPT loss with no labelled input tokens is the context's alone, with the same weights (the
    input's tokens still take weight 1, so the last example weighs loss_decay there too)."""
    ours = pushed(peftlab.attach(llama(), SPEC[:-1] + ",weighted_loss=decay,loss_decay=0.5]"), std=0.01)
    core.after_step(ours, 1, 1)
    peftlab.save(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(llama(), tmp_path).eval()
    ids = batch()
    with torch.no_grad():
        their_loss = theirs(input_ids=ids, labels=torch.full_like(ids, -100)).loss
    torch.testing.assert_close(core.regularization(ours).detach(), their_loss)


def test_the_context_loss_trains_the_prompt():
    model = peftlab.attach(llama(), SPEC)
    core.regularization(model).backward()
    grad = the_module(model).delta.grad
    assert grad[MOVABLE].abs().sum() > 0 and not grad[~MOVABLE].any()
    assert all(p.grad is None for n, p in model.named_parameters() if "peftlab" not in n)


# ---- settings and refusals --------------------------------------------------------------------------

def test_defaults_are_pefts():
    config = peftlab.core.adapters.build_configs("cpt")[0]
    assert (config.token_ids, config.types, config.mask, config.epsilon, config.format_epsilon) == ([0], [1], [1], 0.1, 0.1)


def test_bad_settings_and_models_fail_clearly():
    with pytest.raises(peftlab.TargetError, match="needs a causal LM"):
        peftlab.attach(make_bert(), "cpt")
    with pytest.raises(peftlab.ConfigError, match="vocabulary has 96 tokens"):
        peftlab.attach(llama(), "cpt[token_ids=[96]]")
    with pytest.raises(peftlab.ConfigError, match="types needs one entry per context token"):
        peftlab.attach(llama(), "cpt[token_ids=[1,2],types=[1]]")


# ---- HF PEFT, both ways ---------------------------------------------------------------------------

def peft_config(**settings):
    return peft.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=TOKENS, cpt_tokens_type_mask=TYPES,
                          opt_projection_epsilon=2, opt_projection_format_epsilon=1, **settings)


def peft_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits[:, len(TOKENS):]


def test_peftlab_adapter_loads_in_peft_with_the_same_outputs(tmp_path):
    ours = pushed(peftlab.attach(llama(), SPEC))
    core.after_step(ours, 1, 1)
    peftlab.save(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(llama(), tmp_path).eval()
    torch.testing.assert_close(peft_logits(theirs, batch()), run(ours, batch()), rtol=1e-5, atol=1e-5)


def test_peft_adapter_loads_in_peftlab_with_the_same_outputs(tmp_path):
    theirs = peft.get_peft_model(llama(), peft_config()).eval()
    with torch.no_grad():
        theirs.prompt_encoder["default"].delta_embedding.weight.normal_()  # projected by peft's forward
    expected = peft_logits(theirs, batch())
    theirs.save_pretrained(tmp_path)
    ours = peftlab.load(llama(), tmp_path)
    torch.testing.assert_close(run(ours, batch()), expected, rtol=1e-5, atol=1e-5)
    module = the_module(ours)  # the saved prompt is the new init, as in peft
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))["prompt_embeddings"]
    torch.testing.assert_close(module.embedding, saved, rtol=0, atol=0)
    assert not module.delta.any()
    config = peftlab.core.state.get_state(ours).configs["default"][0]
    assert (config.method, config.token_ids, config.types, config.epsilon) == ("cpt", TOKENS, TYPES, 2)
    peftlab.save(ours, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(llama(), tmp_path / "again").eval()
    torch.testing.assert_close(peft_logits(again, batch()), expected, rtol=1e-5, atol=1e-5)


def test_the_files_are_pefts_own(tmp_path):
    peft.get_peft_model(llama(), peft_config(opt_weighted_loss_type="decay", opt_loss_decay_factor=0.9,
                                             cpt_mask=[1] * 7 + [0])).save_pretrained(tmp_path / "peft")
    spec = SPEC[:-1] + ",weighted_loss=decay,loss_decay=0.9,mask=[1,1,1,1,1,1,1,0]]"
    peftlab.save(peftlab.attach(llama(), spec), tmp_path / "ours")
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("peft", "ours")]
    shapes = [{k: v.shape for k, v in load_file(str(tmp_path / d / "adapter_model.safetensors")).items()}
              for d in ("peft", "ours")]
    assert shapes[0] == shapes[1] == {"prompt_embeddings": (8, 32)}
    for c in configs:
        c.pop("peft_version")
    assert configs[0] == configs[1]


def test_bad_files_fail_clearly(tmp_path):
    peftlab.save(peftlab.attach(llama(), SPEC), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "num_virtual_tokens": 3}))
    with pytest.raises(peftlab.AdapterFormatError, match="inconsistent"):
        peftlab.load(llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "cpt_tokens_type_mask": [1, 2]}))
    with pytest.raises(peftlab.AdapterFormatError, match="types needs one entry"):
        peftlab.load(llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file({"prompt_embeddings": torch.zeros(8, 64)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(peftlab.IncompatibleBaseError, match="saved for another base model"):
        peftlab.load(llama(), tmp_path, check_base=False)
    save_file({"other": torch.zeros(8, 32)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(peftlab.AdapterFormatError, match="no 'prompt_embeddings'"):
        peftlab.load(llama(), tmp_path, check_base=False)
