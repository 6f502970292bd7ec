"""SSF: a scale and shift after each linear layer and norm, folded into that layer on merge."""
from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import logits, make_bert, make_llama

import peftlab
from peftlab.core.layer import AdapterLayer
from peftlab.methods.ssf import ScaleShift

# weights at a pretrained model's scale, so that rescaling what a layer computes visibly changes the output
make_llama, make_bert = (partial(f, initializer_range=0.2) for f in (make_llama, make_bert))


def set_scale_shift(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ssf_scale" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "ssf_shift" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def adapter(model, name):
    return model.get_submodule(name).adapters["default"]


def test_default_targets_every_linear_layer_and_norm():
    llama = peftlab.attach(make_llama(), "ssf")
    names = [n for n, m in llama.named_modules() if isinstance(m, AdapterLayer)]
    assert len(names) == 2 * 7 + 2 * 2 + 1 and "lm_head" not in names  # linears, block norms, final norm
    assert adapter(llama, "model.norm").ssf_shift is None  # RMSNorm: no bias slot, so a scale only
    assert adapter(llama, "model.layers.0.mlp.down_proj").ssf_shift.shape == (32,)  # a shift that merging adds as a bias
    bert = peftlab.attach(make_bert(), "ssf")
    names = [n for n, m in bert.named_modules() if isinstance(m, AdapterLayer)]
    assert "bert.embeddings.LayerNorm" in names and "classifier" not in names
    assert adapter(bert, "bert.embeddings.LayerNorm").ssf_shift.shape == (32,)


def test_the_layer_outputs_gamma_times_its_output_plus_beta():
    bert = set_scale_shift(peftlab.attach(make_bert(), "ssf"))
    plain = make_bert()
    x = torch.randn(2, 5, 32)
    for name in ("bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.output.LayerNorm"):
        a = adapter(bert, name)
        with torch.no_grad():
            expected = a.ssf_scale * plain.get_submodule(name)(x) + a.ssf_shift
            torch.testing.assert_close(bert.get_submodule(name)(x), expected, rtol=0, atol=1e-5)
    llama = set_scale_shift(peftlab.attach(make_llama(), "ssf"))
    norm = make_llama().get_submodule("model.norm")
    with torch.no_grad():
        expected = adapter(llama, "model.norm").ssf_scale * norm(x)
        torch.testing.assert_close(llama.get_submodule("model.norm")(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("factory", [make_llama, make_bert], ids=["llama", "bert"])
def test_merged_into_the_layer_equals_unmerged_and_removes_the_extra_op(factory, ids, monkeypatch):
    model = set_scale_shift(peftlab.attach(factory(), "ssf"))
    expected = logits(model, ids)
    calls = []
    real = ScaleShift.forward
    monkeypatch.setattr(ScaleShift, "forward", lambda self, x, out: calls.append(1) or real(self, x, out))
    logits(model, ids)
    assert calls, "an unmerged SSF adapter runs after its layer"
    calls.clear()
    peftlab.merge(model)
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-4, atol=1e-5)
    assert not calls, "a merged SSF adapter must not run"
    plain = peftlab.unload(model)  # the merged model is a plain model: no SSF op left anywhere
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(logits(plain, ids), expected, rtol=1e-4, atol=1e-5)


def test_merge_is_the_papers_reparameterization():
    model = set_scale_shift(peftlab.attach(make_llama(), "ssf"))
    name = "model.layers.0.self_attn.q_proj"
    gamma, beta = adapter(model, name).ssf_scale.detach().clone(), adapter(model, name).ssf_shift.detach().clone()
    W = model.get_submodule(name).base_layer.weight.detach().clone()
    peftlab.merge(model)
    merged = model.get_submodule(name).base_layer
    torch.testing.assert_close(merged.weight, gamma[:, None] * W)  # W' = diag(gamma) W
    torch.testing.assert_close(merged.bias, beta)  # b' = gamma * 0 + beta: a bias-free layer gains one
    x = torch.randn(4, 32)
    torch.testing.assert_close(F.linear(x, merged.weight, merged.bias), gamma * F.linear(x, W) + beta)


def test_unmerge_gives_back_the_original_model(ids):
    original = make_llama().state_dict()
    model = set_scale_shift(peftlab.attach(make_llama(), "ssf"))
    expected = logits(model, ids)
    peftlab.merge(model)
    peftlab.unmerge(model)
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-4, atol=1e-5)
    restored = peftlab.unload(model).state_dict()
    assert restored.keys() == original.keys(), "the biases added at merge go away at unmerge"
    for key, value in original.items():
        torch.testing.assert_close(restored[key], value, rtol=1e-5, atol=1e-6)


def test_a_zero_scale_refuses_to_merge():
    model = set_scale_shift(peftlab.attach(make_bert(), "ssf"))
    with torch.no_grad():
        adapter(model, "bert.encoder.layer.1.output.dense").ssf_scale[0] = 0.0
    with pytest.raises(peftlab.StateError, match="zero"):
        peftlab.merge(model)
    assert peftlab.summary(model)["merged"] == []
