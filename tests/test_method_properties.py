"""Properties every registered method must have, generated from the registry.

For each method, on a tiny Llama-style decoder and a tiny BERT-style encoder, at the method's
defaults (``EXAMPLE_SETTINGS`` in its file adds settings a tiny model needs; ``ARCHITECTURES`` names
the ones of the two a method supports, e.g. ``("llama",)``; ``EXAMPLE_PREREQUISITES`` maps names to
specs of adapters the method builds on, attached and given random values first: AdapterFusion's
task adapters; ``EXAMPLE_MODEL_SETTINGS`` overrides the tiny models' config, see ``base_model``):

- the output equals the base model at init, where the method promises it (``IDENTITY_AT_INIT``);
- a save / load round trip gives exactly the same outputs;
- merging gives the unmerged outputs where the method is mergeable, and a clear error where not;
- ``disabled()`` is exactly the base model;
- a training step changes the method's parameters and nothing else;
- a few steps on a toy batch lower the loss;
- every setting in the method's ``INVALID_SETTINGS`` fails with a ConfigError that names it.

A method file opts into nothing here: adding it to the registry is enough.
"""
from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_bert, make_llama

import peftlab
from peftlab.core import adapters as core
from peftlab.methods import METHODS
from peftlab.train import TrainConfig, train

ARCHS = {"llama": make_llama,
         "bert": lambda **config: make_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **config)}
CASES = [(method, arch) for method in METHODS for arch in ARCHS if arch in getattr(METHODS[method], "ARCHITECTURES", ARCHS)]
IDS = pytest.mark.parametrize("method,arch", CASES, ids=[f"{m}-{a}" for m, a in CASES])


def spec_of(method: str) -> str:
    settings = getattr(METHODS[method], "EXAMPLE_SETTINGS", "")
    return f"{method}[{settings}]" if settings else method


def batch(arch: str, rows: int = 4, length: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, :2] = 0  # one left-padded row
    labels = torch.randint(0, 3, (rows,), generator=g) if arch == "bert" else ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def outputs(model, arch: str) -> torch.Tensor:
    data = batch(arch)
    with torch.no_grad():
        return model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits


def perturb(model, seed: int = 0, std: float = 0.05) -> None:
    """Move every adapter parameter off its init, so no adapter is a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in core.all_adapters(model):
            for p in adapter.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def base_model(method: str, arch: str):
    """The tiny model, with the config overrides the method's ``EXAMPLE_MODEL_SETTINGS`` asks for (e.g. an
    ``initializer_range`` nearer pretrained weights' scale, for adapters that read a sub-layer's output)."""
    return ARCHS[arch](**getattr(METHODS[method], "EXAMPLE_MODEL_SETTINGS", {}))


def attached(method: str, arch: str):
    model = base_model(method, arch)
    prerequisites = getattr(METHODS[method], "EXAMPLE_PREREQUISITES", {})
    for name, spec in prerequisites.items():
        peftlab.attach(model, spec, name=name)
    if prerequisites:
        perturb(model)  # adapters another method builds on are trained ones
    peftlab.attach(model, spec_of(method))
    return model


@IDS
def test_output_equals_the_base_at_init(method, arch):
    if not getattr(METHODS[method], "IDENTITY_AT_INIT", True):
        pytest.skip(f"{method} changes the output from the start (IDENTITY_AT_INIT = False)")
    base = outputs(base_model(method, arch), arch)
    torch.testing.assert_close(outputs(attached(method, arch), arch), base, rtol=0, atol=1e-5)


@IDS
def test_save_load_round_trip_is_exact(method, arch, tmp_path):
    model = attached(method, arch)
    perturb(model)
    expected = outputs(model, arch)
    loaded = base_model(method, arch)
    for name in getattr(METHODS[method], "EXAMPLE_PREREQUISITES", {}):
        peftlab.load(loaded, peftlab.save(model, tmp_path / name, name), name)
    peftlab.save(model, tmp_path / "default")
    peftlab.load(loaded, tmp_path / "default")
    torch.testing.assert_close(outputs(loaded, arch), expected, rtol=0, atol=1e-6)
    if hasattr(METHODS[method], "fold"):  # saved folded (prefix tuning's MLP, p-tuning's encoder): count that
        METHODS[method].fold(model)
    assert peftlab.summary(loaded)["adapters"] == peftlab.summary(model)["adapters"]


@IDS
def test_merge_equals_unmerged_or_refuses_clearly(method, arch):
    model = attached(method, arch)
    perturb(model)
    expected = outputs(model, arch)
    if not METHODS[method].MERGEABLE:
        with pytest.raises(peftlab.StateError, match="cannot be merged"):
            peftlab.merge(model)
        return
    peftlab.merge(model)
    torch.testing.assert_close(outputs(model, arch), expected, rtol=1e-4, atol=1e-5)
    peftlab.unmerge(model)
    torch.testing.assert_close(outputs(model, arch), expected, rtol=1e-4, atol=1e-5)


@IDS
def test_disabled_is_exactly_the_base(method, arch):
    base = outputs(base_model(method, arch), arch)
    model = attached(method, arch)
    perturb(model)
    with peftlab.disabled(model):
        torch.testing.assert_close(outputs(model, arch), base, rtol=0, atol=1e-6)
    assert not torch.allclose(outputs(model, arch), base, atol=1e-6), "the perturbed adapter should change the output"


@IDS
def test_a_training_step_changes_only_the_methods_parameters(method, arch):
    model = attached(method, arch)
    model.train()
    mine = {id(p) for _, adapter in core.all_adapters(model) for p in adapter.parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(id(p) in mine for p in trainable)
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    model(**batch(arch)).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "a step should change the adapter"
    assert all(id(p) in mine for n, p in model.named_parameters() if n in changed), sorted(changed)


def train_a_few_steps(model, arch: str = "llama", lr: float = 1e-2):
    """12 full-batch steps at a constant rate on the 4 rows of ``batch(arch)``."""
    rows = [{k: v[i] for k, v in batch(arch, seed=0).items()} for i in range(4)]
    return train(model, rows, TrainConfig(lr=lr, steps=12, batch_size=4, warmup_steps=0, schedule="constant",
                                          progress=False, device="cpu"))


@IDS
def test_a_few_steps_lower_the_loss(method, arch):
    # the method's recommended rate, but at least 1e-3: 12 steps on a tiny random model move less than a
    # real budget does (MAM recommends 1e-4 for ~100+ steps on a real model); EXAMPLE_LR where a method
    # says the tiny models need more (as EXAMPLE_SETTINGS says what settings they need)
    lr = getattr(METHODS[method], "EXAMPLE_LR", max(getattr(METHODS[method], "DEFAULT_LR", 1e-2), 1e-3))
    result = train_a_few_steps(attached(method, arch), arch, lr)
    assert result.losses[-1] < result.losses[0] * 0.97, result.losses


@pytest.mark.parametrize("method", list(METHODS))
def test_invalid_settings_fail_clearly(method):
    invalid = getattr(METHODS[method], "INVALID_SETTINGS", ())
    assert invalid, f"{method} should list a few INVALID_SETTINGS for this test"
    for setting in invalid:
        key = setting.split("=", 1)[0]
        with pytest.raises(peftlab.ConfigError, match=key):
            peftlab.attach(make_llama(), f"{method}[{setting}]")


@pytest.mark.parametrize("method", list(METHODS))
def test_method_file_states_its_facts(method):
    kind = METHODS[method]
    assert kind.CATEGORY in ("additive", "selective", "reparameterized", "hybrid")
    assert "et al." in kind.PAPER or "&" in kind.PAPER or "(" in kind.PAPER
    assert isinstance(kind.MERGEABLE, bool)
    assert kind.__doc__ and len(kind.__doc__) > 200, "each method file explains itself and cites its paper"
