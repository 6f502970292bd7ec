"""The soft-prompt family against the real HF PEFT package: same files, same outputs, both ways.

peftlab's adapters load with ``peft.PeftModel.from_pretrained`` and give PEFT's outputs (PEFT's
causal-LM logits include the virtual positions: the real tokens' ones are compared), and
``generate`` gives PEFT's tokens; adapters PEFT saved load with ``peftlab.load`` and give its
outputs. The configs and tensors written are PEFT's own, key for key.
"""
from __future__ import annotations

import functools
import json

import pytest
import torch
from conftest import VOCAB, make_bert, make_llama
from safetensors import safe_open

import peftlab
from peftlab.formats.hf_common import PEFT_VERSION

peft = pytest.importorskip("peft")

SCALE = dict(initializer_range=0.2)
CAUSAL = [  # peftlab spec, PEFT config class, its settings
    ("prompt[length=4]", "PromptTuningConfig", dict(prompt_tuning_init="SAMPLE_VOCAB")),
    ("prompt[length=4,init=random]", "PromptTuningConfig", dict(prompt_tuning_init="RANDOM")),
    ("ptuning[length=4,hidden=16]", "PromptEncoderConfig", dict(encoder_hidden_size=16)),
    ("ptuning[length=4,encoder=lstm,hidden=8,encoder_layers=1]", "PromptEncoderConfig",
     dict(encoder_hidden_size=8, encoder_reparameterization_type="LSTM", encoder_num_layers=1)),
    ("prefix[length=4,hidden=16]", "PrefixTuningConfig", dict(prefix_projection=True, encoder_hidden_size=16)),
    ("ptuning2[length=4]", "PrefixTuningConfig", dict()),
]
CLASSIFY = [case for case in CAUSAL if "lstm" not in case[0] and "random" not in case[0]]


def llama():
    return make_llama(**SCALE)


def bert():
    return make_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **SCALE)


def inputs(rows=3, length=6):
    ids = torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(2))
    return ids, torch.ones_like(ids)


def trained(model, seed=0):
    """Every trainable parameter moved off its init, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def peft_model(factory, peft_class, settings, task):
    config = getattr(peft, peft_class)(task_type=task, num_virtual_tokens=4, **settings)
    return trained(peft.get_peft_model(factory(), config)).eval()


def logits(model, ids, mask, virtual=0, **inputs):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **inputs).logits[:, virtual:]


def virtual_positions(spec):
    """How many positions PEFT's causal-LM logits have in front of the real tokens."""
    return 0 if spec.startswith(("prefix", "ptuning2")) else 4


# ---- what the installed peft can do ---------------------------------------------------------------
# peft 0.21.2 looks for the KV cache under ``past_key_values``: in ``prepare_inputs_for_generation``
# (so it knows when decoding has started) and in the sequence-classification prefix path. transformers
# 5.24 renamed that argument ``cache``. These probes ask peft itself, so the comparisons run wherever
# peft works and say why they cannot wherever it does not; peftlab's own side is tested either way
# (test_prompting.py compares its cached generation with uncached greedy decoding).

UPSTREAM = ("upstream: peft {peft} looks for the KV cache under `past_key_values`, which transformers {tf} calls "
            "`cache`, so {what}; nothing to compare against until peft follows the rename")


@functools.cache
def peft_generation_problem() -> str | None:
    """Why peft's own prompt-tuning ``generate`` cannot be a reference here, or None when it can: it
    must equal greedy decoding by full forwards of the same peft model."""
    import transformers

    model = peft.get_peft_model(llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    ids, mask = inputs(rows=2)
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
        greedy = ids
        for _ in range(3):
            step = model(input_ids=greedy, attention_mask=torch.ones_like(greedy)).logits[:, -1]
            greedy = torch.cat([greedy, step.argmax(-1, keepdim=True)], 1)
    if torch.equal(generated[:, -3:], greedy[:, -3:]):
        return None
    return UPSTREAM.format(peft=peft.__version__, tf=transformers.__version__,
                           what="its generate adds the virtual tokens again at every decoding step")


@functools.cache
def peft_prefix_classification_problem() -> str | None:
    """Why peft cannot run a prefix-tuned BERT classifier here, or None when it can."""
    import transformers

    model = peft.get_peft_model(bert(), peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4)).eval()
    ids, mask = inputs()
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    except ValueError as error:
        if "past key values" not in str(error):
            raise
        return UPSTREAM.format(peft=peft.__version__, tf=transformers.__version__,
                               what=f"its prefix-tuned classifiers refuse to run ({error})")
    return None


def skip_if(problem: str | None) -> None:
    if problem:
        pytest.skip(problem)


def read(folder):
    config = json.loads((folder / "adapter_config.json").read_text())
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}
    return config, shapes


# ---- causal LM -------------------------------------------------------------------------------

def saved_and_loaded_in_peft(spec, folder):
    ours = trained(peftlab.attach(llama(), spec))
    peftlab.save(ours, folder)
    return ours, peft.PeftModel.from_pretrained(llama(), folder).eval()


@pytest.mark.parametrize("spec,peft_class,settings", CAUSAL, ids=[c[0] for c in CAUSAL])
def test_peftlab_adapter_loads_in_peft_with_the_same_outputs(spec, peft_class, settings, tmp_path):
    ours, theirs = saved_and_loaded_in_peft(spec, tmp_path)
    ids, mask = inputs()
    torch.testing.assert_close(logits(theirs, ids, mask, virtual_positions(spec)), logits(ours, ids, mask),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec,peft_class,settings", CAUSAL, ids=[c[0] for c in CAUSAL])
def test_peftlab_adapter_generates_in_peft_as_in_peftlab(spec, peft_class, settings, tmp_path):
    skip_if(peft_generation_problem())
    ours, theirs = saved_and_loaded_in_peft(spec, tmp_path)
    ids, mask = inputs()
    with torch.no_grad():
        expected = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        generated = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(generated, expected, rtol=0, atol=0)


@pytest.mark.parametrize("spec,peft_class,settings", CAUSAL, ids=[c[0] for c in CAUSAL])
def test_peft_adapter_loads_in_peftlab_with_the_same_outputs(spec, peft_class, settings, tmp_path):
    theirs = peft_model(llama, peft_class, settings, "CAUSAL_LM")
    ids, mask = inputs()
    expected = logits(theirs, ids, mask, virtual_positions(spec))
    theirs.save_pretrained(tmp_path)
    ours = peftlab.load(llama(), tmp_path)
    torch.testing.assert_close(logits(ours, ids, mask), expected, rtol=1e-5, atol=1e-5)
    method = spec.split("[")[0]
    assert peftlab.core.state.get_state(ours).configs["default"][0].method == method


@pytest.mark.parametrize("spec,peft_class,settings", CAUSAL, ids=[c[0] for c in CAUSAL])
def test_the_files_are_pefts_own(spec, peft_class, settings, tmp_path):
    theirs = peft_model(llama, peft_class, settings, "CAUSAL_LM")
    theirs.save_pretrained(tmp_path / "peft")
    peftlab.save(peftlab.attach(llama(), spec), tmp_path / "ours")
    (their_config, their_tensors), (our_config, our_tensors) = read(tmp_path / "peft"), read(tmp_path / "ours")
    assert our_tensors == their_tensors
    # peft_version names the release that wrote the file: the installed peft's, or the one peftlab's
    # format follows; every other field is the format itself
    assert our_config.pop("peft_version") == PEFT_VERSION and their_config.pop("peft_version") == peft.__version__
    assert our_config == their_config


def test_left_padded_generation_matches_peft_on_each_rows_own_run(tmp_path):
    """PEFT ignores position ids for input prompts, so a padded batch in PEFT is not each row alone;
    peftlab's padded rows are: they equal PEFT's run of each row unpadded."""
    skip_if(peft_generation_problem())
    ours = trained(peftlab.attach(llama(), "prompt[length=4]"))
    peftlab.save(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(llama(), tmp_path).eval()
    ids, mask = inputs()
    mask[1, :2] = 0
    with torch.no_grad():
        batched = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        for row in range(3):
            real = ids[row:row + 1, int((mask[row] == 0).sum()):]
            alone = theirs.generate(input_ids=real, attention_mask=torch.ones_like(real), max_new_tokens=4,
                                    do_sample=False, pad_token_id=0)
            torch.testing.assert_close(batched[row, -4:], alone[0, -4:], rtol=0, atol=0)


def test_left_padded_prefix_generation_matches_peft(tmp_path):
    """For prefixes PEFT shifts the position ids as peftlab does, so padded batches agree too."""
    skip_if(peft_generation_problem())
    ours = trained(peftlab.attach(llama(), "ptuning2[length=4]"))
    peftlab.save(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(llama(), tmp_path).eval()
    ids, mask = inputs()
    mask[1, :2] = 0
    mask[2, :4] = 0
    with torch.no_grad():
        expected = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        generated = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(generated, expected, rtol=0, atol=0)


# ---- BERT sequence classification ------------------------------------------------------------

@pytest.mark.parametrize("spec,peft_class,settings", CLASSIFY, ids=[c[0] for c in CLASSIFY])
def test_classifier_with_its_head_both_ways(spec, peft_class, settings, tmp_path):
    if peft_class == "PrefixTuningConfig":
        skip_if(peft_prefix_classification_problem())
    ours = trained(peftlab.attach(bert(), spec.replace("]", ",modules_to_save=[classifier]]")))
    ids, mask = inputs()
    mask[2, -2:] = 0
    segments = dict(token_type_ids=(torch.arange(6) >= 3).long().expand(3, -1))  # sentence pairs
    peftlab.save(ours, tmp_path / "ours")
    assert "base_model.classifier.weight" in read(tmp_path / "ours")[1]
    theirs = peft.PeftModel.from_pretrained(bert(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs, ids, mask, **segments), logits(ours, ids, mask, **segments),
                               rtol=1e-5, atol=1e-5)

    theirs = peft_model(bert, peft_class, settings, "SEQ_CLS")
    theirs.save_pretrained(tmp_path / "peft")
    loaded = peftlab.load(bert(), tmp_path / "peft")
    assert peftlab.core.state.get_state(loaded).configs["default"][0].modules_to_save == ["classifier"]
    torch.testing.assert_close(logits(loaded, ids, mask), logits(theirs, ids, mask), rtol=1e-5, atol=1e-5)


# ---- LLaMA-Adapter (ADAPTION_PROMPT) ---------------------------------------------------------

def test_llama_adapter_both_ways(tmp_path):
    ids, mask = inputs()
    ours = trained(peftlab.attach(llama(), "llama_adapter[length=3,layers=1]"))
    peftlab.save(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs, ids, mask), logits(ours, ids, mask), rtol=1e-5, atol=1e-5)

    config = peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=3, adapter_layers=2)
    theirs = trained(peft.get_peft_model(llama(), config)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    (their_config, their_tensors), (our_config, our_tensors) = read(tmp_path / "peft"), read(tmp_path / "ours")
    assert set(our_config) == set(their_config) and our_config["target_modules"] == their_config["target_modules"]
    assert set(our_tensors) < set(their_tensors)  # ours adapts the top block only
    loaded = peftlab.load(llama(), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded, ids, mask), logits(theirs, ids, mask), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        expected = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        generated = loaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(generated, expected, rtol=0, atol=0)


def test_llama_adapter_on_chosen_blocks_is_saved_in_peftlabs_format(tmp_path):
    model = trained(peftlab.attach(make_llama(num_hidden_layers=3), "llama_adapter[length=2,layers=[0]]"))
    peftlab.save(model, tmp_path)
    assert read(tmp_path)[0]["peft_type"] == "PEFTLAB", "PEFT can only say 'the top N blocks'"
    ids, mask = inputs()
    loaded = peftlab.load(make_llama(num_hidden_layers=3), tmp_path)
    torch.testing.assert_close(logits(loaded, ids, mask), logits(model, ids, mask), rtol=0, atol=0)


# ---- bad files ------------------------------------------------------------------------------

def test_a_prompt_for_another_model_is_a_clear_error(tmp_path):
    peftlab.save(peftlab.attach(llama(), "prompt[length=4]"), tmp_path)
    with pytest.raises(peftlab.IncompatibleBaseError, match="different shape"):
        peftlab.load(make_llama(hidden_size=64), tmp_path, check_base=False)
    peftlab.save(peftlab.attach(llama(), "prefix[length=4]"), tmp_path)
    with pytest.raises(peftlab.IncompatibleBaseError, match="saved for another base model"):
        peftlab.load(make_llama(num_hidden_layers=3), tmp_path, check_base=False)


def test_a_text_initialized_peft_prompt_loads_without_its_tokenizer(tmp_path):
    ours = trained(peftlab.attach(llama(), "prompt[length=4]"))
    peftlab.save(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config.update(prompt_tuning_init="TEXT", prompt_tuning_init_text="hello", tokenizer_name_or_path="not/available")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    loaded = peftlab.load(llama(), tmp_path)
    ids, mask = inputs()
    torch.testing.assert_close(logits(loaded, ids, mask), logits(ours, ids, mask), rtol=0, atol=0)
    saved = peftlab.core.state.get_state(loaded).configs["default"][0]
    assert (saved.init, saved.init_text, saved.tokenizer) == ("text", "hello", "not/available")
