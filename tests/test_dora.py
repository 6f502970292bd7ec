"""DoRA: magnitude init, the forward against the paper's formula, merge / unmerge."""
from __future__ import annotations

import pytest
import torch
from conftest import logits, make_bert, make_gpt2, make_llama, randomize_adapters

import peftlab
from peftlab.core.layer import AdapterLayer
from peftlab.methods.lora import base_weight

CASES = [
    (make_llama, "model.layers.0.self_attn.q_proj", "dora[r=4,targets=[q_proj,down_proj]]"),
    (make_gpt2, "transformer.h.1.attn.c_attn", "dora[r=4,alpha=4,rslora=true]"),
    (make_bert, "bert.encoder.layer.0.attention.self.query", "dora[r=2,targets=[query,dense]]"),
]


@pytest.mark.parametrize("factory,name,spec", CASES)
def test_magnitude_starts_at_row_norms(factory, name, spec):
    original = factory().get_submodule(name)
    W = original.weight.t() if type(original).__name__ == "Conv1D" else original.weight
    model = peftlab.attach(factory(), spec)
    m = model.get_submodule(name).adapters["default"].lora_magnitude_vector
    assert m.shape == (W.shape[0],) and m.requires_grad
    torch.testing.assert_close(m.detach(), W.detach().norm(dim=1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("factory,name,spec", CASES)
def test_forward_is_the_papers_formula(factory, name, spec):
    """y = x (m * (W + s B A) / ||W + s B A||_row)^T + b."""
    model = peftlab.attach(factory(), spec)
    randomize_adapters(model)
    layer = model.get_submodule(name)
    a = layer.adapters["default"]
    W = base_weight(layer.base_layer).detach()
    V = W + a.scaling * a.lora_B.weight @ a.lora_A.weight
    W2 = a.lora_magnitude_vector[:, None] * V / V.norm(dim=1, keepdim=True)
    x = torch.randn(3, 5, W.shape[1])
    bias = layer.base_layer.bias if layer.base_layer.bias is not None else 0
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ W2.T + bias, rtol=0, atol=1e-5)


def test_magnitude_and_direction_both_train(ids):
    model = peftlab.attach(make_llama(), "dora[r=4,targets=[q_proj,v_proj]]")
    randomize_adapters(model)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert any("lora_magnitude_vector" in n for n in grads)


@pytest.mark.parametrize("factory,name,spec", CASES)
def test_merge_matches_and_unmerge_restores(factory, name, spec, ids):
    model = peftlab.attach(factory(), spec)
    randomize_adapters(model, std=0.2)
    weights = {n: base_weight(m.base_layer).detach().clone() for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
    unmerged = logits(model, ids)
    layer = model.get_submodule(name)
    peftlab.merge(model)
    a = layer.adapters["default"]
    merged_w = base_weight(layer.base_layer)
    # the merged weight has exactly the magnitude vector as its row norms
    torch.testing.assert_close(merged_w.norm(dim=1), a.lora_magnitude_vector.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    for n, m in model.named_modules():
        if isinstance(m, AdapterLayer):
            torch.testing.assert_close(base_weight(m.base_layer), weights[n], rtol=0, atol=1e-5, msg=n)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    assert not any("_merged_norm" in k for k in model.state_dict())


def test_dora_dropout_train_mode_matches_formula():
    """With dropout in train mode DoRA recomputes the base product on the dropped input (as PEFT)."""
    model = peftlab.attach(make_llama(), "dora[r=4,dropout=0.3,targets=q_proj]")
    randomize_adapters(model)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    a = layer.adapters["default"]
    model.train()
    x = torch.randn(2, 4, 32)
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    xd = torch.nn.functional.dropout(x, 0.3, training=True)
    W = layer.base_layer.weight
    V = W + a.scaling * a.lora_B.weight @ a.lora_A.weight
    scale = a.lora_magnitude_vector / V.norm(dim=1)
    expected = x @ W.T + (scale - 1) * (xd @ W.T) + scale * (a.scaling * (xd @ a.lora_A.weight.T) @ a.lora_B.weight.T)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
