"""Cartridges (Eyuboglu et al., 2025): a trained KV cache in front of every request.

The defining properties, each against a hand computation: the model with a cartridge is the base
model run on a KV cache holding the cartridge's keys and values; the first ``frozen`` tokens never
train (by hand and through ``peftlab.train``); ``init=text`` is the text itself in context. And
HF PEFT's ``CARTRIDGE`` files both ways, on the tiny Llama and a BERT classifier, with clear errors
for bad files.
"""
from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, logits, make_bert, make_llama, peft_logits
from safetensors.torch import load_file, save_file
from test_prompting import greedy_by_full_forwards
from test_prompt_peft import peft_prefix_classification_problem, skip_if

import peftlab
from peftlab.core import model_adapters
from peftlab.formats.hf_common import PEFT_VERSION
from peftlab.methods.cartridge import join_prefix
from peftlab.methods.prompting import PrefixShape, split_prefix
from peftlab.train import TrainConfig, train

peft = pytest.importorskip("peft")

SCALE = dict(initializer_range=0.2)
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 8  # the tiny Llama: 4 query heads, 2 key/value heads of 8


def llama():
    return make_llama(**SCALE)


def bert():
    return make_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **SCALE)


def the_module(model):
    (module,) = [m for _, _, m in model_adapters.model_adapters(model)]
    return module


def moved(model, seed=0, std=0.3):
    """Every cartridge value (frozen ones too) moved off its init, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in the_module(model).parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def batch(rows=3, length=6):
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(2))


# ---- the defining properties -----------------------------------------------------------------------

def test_the_model_attends_to_the_cartridge_as_to_a_kv_cache():
    from transformers import DynamicCache

    model = moved(peftlab.attach(llama(), "cartridge[length=5,frozen=2]"))
    flat = the_module(model).prefix().detach()
    assert flat.shape == (5, LAYERS * 2 * KV_HEADS * HEAD_DIM)
    ids = batch()
    cache = DynamicCache(config=model.config)
    per_token = flat.view(5, LAYERS, 2, KV_HEADS, HEAD_DIM)  # HF PEFT's layout, unpacked by hand
    for layer in range(LAYERS):
        keys, values = (per_token[:, layer, kv].transpose(0, 1).expand(3, -1, -1, -1) for kv in (0, 1))
        cache.update(keys, values, layer)
    with torch.no_grad(), peftlab.disabled(model):
        expected = model(input_ids=ids, attention_mask=torch.ones(3, 11, dtype=torch.long), past_key_values=cache,
                         position_ids=torch.arange(5, 11).expand(3, -1)).logits
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)


def test_the_frozen_tokens_never_train():
    model = peftlab.attach(llama(), "cartridge[length=5,frozen=2]")
    module = the_module(model)
    assert peftlab.summary(model)["trainable"] == 3 * LAYERS * 2 * KV_HEADS * HEAD_DIM
    frozen, trainable = module.frozen_embedding.detach().clone(), module.trainable_embedding.detach().clone()
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in batch(4, 8)]
    train(model, rows, TrainConfig(lr=1e-2, steps=3, batch_size=4, warmup_steps=0, progress=False, device="cpu"))
    assert torch.equal(module.frozen_embedding, frozen)
    assert not torch.equal(module.trainable_embedding, trainable)
    peftlab.set_active(model, "default")  # making the adapter active again keeps them frozen
    assert not module.frozen_embedding.requires_grad and module.trainable_embedding.requires_grad


def test_a_cartridge_from_text_is_that_text_in_context():
    """init=text: the base model's KV cache of the text, so the model with the cartridge predicts as
    the base model does after reading the text."""
    text = [5, 9, 17, 33, 2]
    model = peftlab.attach(llama(), f"cartridge[length=5,init=text,init_ids={text}]".replace(" ", ""))
    ids = batch()
    base = llama()
    in_context = logits(base, torch.cat([torch.tensor(text).expand(3, -1), ids], 1))[:, 5:]
    torch.testing.assert_close(logits(model, ids), in_context, rtol=1e-5, atol=1e-5)


def test_text_init_needs_a_model_with_a_kv_cache_and_ids_in_its_vocabulary():
    with pytest.raises(peftlab.TargetError, match="KV cache"):
        peftlab.attach(bert(), "cartridge[length=2,init=text,init_ids=[5,6]]")
    with pytest.raises(peftlab.ConfigError, match="vocabulary"):
        peftlab.attach(llama(), f"cartridge[length=2,init=text,init_ids=[{VOCAB}]]")


def test_join_prefix_undoes_split_prefix():
    shape = PrefixShape(llama().config)
    flat = torch.randn(4, shape.flat)
    torch.testing.assert_close(join_prefix(split_prefix(flat, shape), shape), flat, rtol=0, atol=0)


def test_generate_with_the_cache_equals_greedy_decoding_without():
    model = moved(peftlab.attach(llama(), "cartridge[length=4]"))
    ids = batch(rows=2)
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                   do_sample=False, pad_token_id=0)
    torch.testing.assert_close(generated, greedy_by_full_forwards(model, ids, 4), rtol=0, atol=0)


# ---- HF PEFT's CARTRIDGE files, both ways ------------------------------------------------------------

def peft_cartridge(factory, task, **settings):
    config = peft.CartridgeConfig(task_type=task, num_virtual_tokens=4, **settings)
    model = peft.get_peft_model(factory(), config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


@pytest.mark.parametrize("frozen", [1, 0, 2])
def test_peftlab_file_loads_in_peft_with_the_same_outputs(frozen, tmp_path):
    ours = moved(peftlab.attach(llama(), f"cartridge[length=4,frozen={frozen}]"))
    peftlab.save(ours, tmp_path)
    ids = batch()
    torch.testing.assert_close(peft_logits(llama, tmp_path, ids), logits(ours, ids), rtol=1e-5, atol=1e-5)
    assert peft.PeftConfig.from_pretrained(tmp_path).num_frozen_tokens == frozen


@pytest.mark.parametrize("frozen", [1, 3])
def test_peft_file_loads_in_peftlab_with_the_same_outputs(frozen, tmp_path):
    theirs = peft_cartridge(llama, "CAUSAL_LM", num_frozen_tokens=frozen)
    ids = batch()
    expected = logits(theirs, ids)
    theirs.save_pretrained(tmp_path)
    ours = peftlab.load(llama(), tmp_path)
    torch.testing.assert_close(logits(ours, ids), expected, rtol=1e-5, atol=1e-5)
    config = peftlab.core.state.get_state(ours).configs["default"][0]
    assert (config.method, config.length, config.frozen) == ("cartridge", 4, frozen)
    assert peftlab.summary(ours)["trainable"] == (4 - frozen) * LAYERS * 2 * KV_HEADS * HEAD_DIM


def test_the_files_are_pefts_own(tmp_path):
    peft_cartridge(llama, "CAUSAL_LM", num_frozen_tokens=2).save_pretrained(tmp_path / "peft")
    peftlab.save(peftlab.attach(llama(), "cartridge[length=4,frozen=2]"), tmp_path / "ours")
    configs = [json.loads((tmp_path / side / "adapter_config.json").read_text()) for side in ("peft", "ours")]
    tensors = [load_file(tmp_path / side / "adapter_model.safetensors") for side in ("peft", "ours")]
    assert {k: v.shape for k, v in tensors[0].items()} == {k: v.shape for k, v in tensors[1].items()}
    assert configs[1].pop("peft_version") == PEFT_VERSION and configs[0].pop("peft_version") == peft.__version__
    assert configs[1] == configs[0]


def test_classifier_with_its_head_both_ways(tmp_path):
    ids = batch()
    ours = moved(peftlab.attach(bert(), "cartridge[length=4,modules_to_save=[classifier]]"))
    peftlab.save(ours, tmp_path / "ours")
    assert "base_model.classifier.weight" in load_file(tmp_path / "ours" / "adapter_model.safetensors")
    torch.testing.assert_close(logits(peftlab.load(bert(), tmp_path / "ours"), ids), logits(ours, ids), rtol=0, atol=0)
    skip_if(peft_prefix_classification_problem())
    torch.testing.assert_close(peft_logits(bert, tmp_path / "ours", ids), logits(ours, ids), rtol=1e-5, atol=1e-5)
    theirs = peft_cartridge(bert, "SEQ_CLS")
    theirs.save_pretrained(tmp_path / "peft")
    loaded = peftlab.load(bert(), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded, ids), logits(theirs, ids), rtol=1e-5, atol=1e-5)


def test_bad_files_fail_clearly(tmp_path):
    peftlab.save(moved(peftlab.attach(llama(), "cartridge[length=4]")), tmp_path)
    config_path, weights_path = tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors"
    good = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**good, "num_frozen_tokens": 5}))
    with pytest.raises(peftlab.AdapterFormatError, match="frozen"):
        peftlab.load(llama(), tmp_path)
    config_path.write_text(json.dumps({**good, "num_virtual_tokens": 6}))
    with pytest.raises(peftlab.IncompatibleBaseError, match="prompt_embeddings"):
        peftlab.load(llama(), tmp_path)
    config_path.write_text(json.dumps(good))
    save_file({"other": torch.zeros(1)}, str(weights_path))
    with pytest.raises(peftlab.AdapterFormatError, match="prompt_embeddings"):
        peftlab.load(llama(), tmp_path)
