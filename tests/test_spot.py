"""SPoT (Vu et al., 2022): prompt tuning started from a source task's prompt, and source retrieval.

The defining properties against hand computations: the target prompt starts equal to the chosen
source (an adapter of the model, a saved folder, a bare safetensors file, an HF PEFT file), then
trains on its own; ``rank_sources`` orders sources as cosines computed by hand do, for both of the
paper's metrics; a trained SPoT prompt saves as a prompt-tuning file HF PEFT loads with the same
outputs; a missing, unreadable or incompatible source fails clearly.
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import HIDDEN, VOCAB, make_llama
from safetensors.torch import save_file

import peftlab
from peftlab.core import model_adapters
from peftlab.methods.spot import rank_sources, similarity

SCALE = dict(initializer_range=0.2)


def llama():
    return make_llama(**SCALE)


def prompt_of(model, name="default"):
    (module,) = [m for _, _, m in model_adapters.model_adapters(model, name)]
    return module.prompt_embeddings


def trained_source(model, spec="prompt[length=4]", name="source", seed=3):
    peftlab.attach(model, spec, name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        prompt_of(model, name).add_(torch.randn(prompt_of(model, name).shape, generator=g))
    return model


def batch(rows=3, length=6):
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(2))


# ---- initialisation from the source ---------------------------------------------------------------

def test_the_target_prompt_starts_as_the_source_adapters_prompt_then_trains_on_its_own():
    model = trained_source(llama())
    source = prompt_of(model, "source").detach().clone()
    peftlab.attach(model, "spot[source=source]")
    target = prompt_of(model)
    assert torch.equal(target, source) and target.data_ptr() != prompt_of(model, "source").data_ptr()
    assert peftlab.core.state.get_state(model).configs["default"][0].length == 4  # the source's, recorded
    ids = batch()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert not torch.equal(prompt_of(model), source) and torch.equal(prompt_of(model, "source"), source)


def test_sources_from_saved_folders_files_and_hf_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = trained_source(llama())
    peftlab.save(model, tmp_path / "ours", "source")
    bare = tmp_path / "bare.safetensors"
    save_file({"prompt_embeddings": prompt_of(model, "source").detach().clone()}, str(bare))
    theirs = peft.get_peft_model(llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    theirs.save_pretrained(tmp_path / "peft")
    expected_peft = theirs.get_prompt_embedding_to_save("default")
    for source, expected in [(tmp_path / "ours", prompt_of(model, "source")), (bare, prompt_of(model, "source")),
                             (tmp_path / "peft", expected_peft)]:
        target = peftlab.attach(llama(), f"spot[source={source}]")
        torch.testing.assert_close(prompt_of(target), expected.detach(), rtol=0, atol=0)


def test_a_trained_spot_prompt_is_a_prompt_tuning_file_that_peft_loads(tmp_path):
    from conftest import logits, peft_logits

    model = trained_source(llama())
    peftlab.attach(model, "spot[source=source]")
    with torch.no_grad():
        prompt_of(model).add_(0.5)
    peftlab.save(model, tmp_path)
    ids = batch()
    torch.testing.assert_close(peft_logits(llama, tmp_path, ids)[:, 4:], logits(model, ids), rtol=1e-5, atol=1e-5)
    loaded = peftlab.load(llama(), tmp_path)  # no source needed
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)


# ---- retrieval ---------------------------------------------------------------------------------------

def hand_cosine(u, v):
    dot = sum(float(a) * float(b) for a, b in zip(u, v))
    return dot / math.sqrt(sum(float(a) ** 2 for a in u) * sum(float(b) ** 2 for b in v))


def test_rank_sources_is_the_hand_computed_cosine_ranking():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(3, 8, generator=g)
    sources = {"near": target[[2, 0, 1]] + 0.1 * torch.randn(3, 8, generator=g),
               "far": -target + 0.5 * torch.randn(3, 8, generator=g),
               "other": torch.randn(5, 8, generator=g)}
    for metric in ("average", "per_token"):
        by_hand = {}
        for name, prompt in sources.items():
            if metric == "average":
                by_hand[name] = hand_cosine(target.mean(0), prompt.mean(0))
            else:
                pairs = [hand_cosine(t, s) for t in target for s in prompt]
                by_hand[name] = sum(pairs) / len(pairs)
        ranking = rank_sources(target, sources, metric)
        assert [name for name, _ in ranking] == sorted(by_hand, key=lambda n: -by_hand[n])
        for name, score in ranking:
            assert score == pytest.approx(by_hand[name], abs=1e-6)
    assert rank_sources(target, sources)[0][0] == "near" and rank_sources(target, sources)[-1][0] == "far"
    assert similarity(target, target, "average") == pytest.approx(1.0)


def test_rank_sources_reads_adapters_of_a_model_and_files(tmp_path):
    model = trained_source(trained_source(llama(), name="task_a", seed=1), name="task_b", seed=2)
    peftlab.attach(model, "prompt[length=3]", name="target")
    with torch.no_grad():
        prompt_of(model, "target").copy_(prompt_of(model, "task_b")[:3] * 2)
    peftlab.save(model, tmp_path / "a", "task_a")
    ranking = rank_sources("target", {"a": tmp_path / "a", "b": "task_b"}, model=model)
    assert ranking[0][0] == "b"
    best = ranking[0][1]
    peftlab.attach(model, f"spot[source={dict({'a': tmp_path / 'a', 'b': 'task_b'})[ranking[0][0]]}]", name="spot")
    torch.testing.assert_close(prompt_of(model, "spot"), prompt_of(model, "task_b"))
    assert best == pytest.approx(similarity(prompt_of(model, "target"), prompt_of(model, "task_b")))


# ---- clear errors ---------------------------------------------------------------------------------

def test_missing_unreadable_and_incompatible_sources_fail_clearly(tmp_path):
    with pytest.raises(peftlab.ConfigError, match="source"):
        peftlab.attach(llama(), "spot")
    with pytest.raises(peftlab.ConfigError, match="not a file or folder"):
        peftlab.attach(llama(), f"spot[source={tmp_path / 'nowhere'}]")
    (tmp_path / "empty").mkdir()
    with pytest.raises(peftlab.AdapterFormatError, match="adapter_model.safetensors"):
        peftlab.attach(llama(), f"spot[source={tmp_path / 'empty'}]")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(peftlab.AdapterFormatError, match="safetensors"):
        peftlab.attach(llama(), f"spot[source={tmp_path / 'junk.safetensors'}]")
    save_file({"lora_A": torch.zeros(2, HIDDEN)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(peftlab.AdapterFormatError, match="prompt_embeddings"):
        peftlab.attach(llama(), f"spot[source={tmp_path / 'lora.safetensors'}]")
    save_file({"prompt_embeddings": torch.zeros(4, HIDDEN + 1)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(peftlab.IncompatibleBaseError, match="another base model"):
        peftlab.attach(llama(), f"spot[source={tmp_path / 'wide.safetensors'}]")
    model = trained_source(llama())
    with pytest.raises(peftlab.ConfigError, match="4 tokens"):
        peftlab.attach(model, "spot[source=source,length=6]")
    peftlab.attach(model, "ptuning2[length=2]", name="deep")
    with pytest.raises(peftlab.IncompatibleBaseError, match="prefix"):
        peftlab.attach(model, "spot[source=deep]", name="from_deep")
    with pytest.raises(peftlab.IncompatibleBaseError, match="different base models"):
        rank_sources(torch.zeros(2, HIDDEN), [torch.zeros(2, HIDDEN + 1)])
    with pytest.raises(peftlab.ConfigError, match="metric"):
        rank_sources(torch.zeros(2, HIDDEN), [torch.zeros(2, HIDDEN)], metric="max")
