"""KronA: the Kronecker update, computed without forming the product; merge; shape errors."""
from __future__ import annotations

import pytest
import torch
from conftest import logits, make_gpt2, make_llama, randomize_adapters

import peftlab
from peftlab.methods import krona
from peftlab.methods.lora import base_weight

Q0 = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("a_shape,b_shape,rows", [((2, 3), (5, 4), (7,)), ((4, 4), (8, 8), (2, 3)), ((1, 6), (3, 1), (2, 2, 2))])
def test_reshape_trick_equals_torch_kron(a_shape, b_shape, rows):
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(*a_shape, generator=g), torch.randn(*b_shape, generator=g)
    x = torch.randn(*rows, a_shape[1] * b_shape[1], generator=g)
    torch.testing.assert_close(krona.kron_apply(x, A, B), x @ torch.kron(A, B).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factory,name", [(make_llama, Q0), (make_gpt2, "transformer.h.0.attn.c_attn")])
def test_layer_adds_scaled_kronecker_product(factory, name, monkeypatch):
    model = randomize_adapters(peftlab.attach(factory(), "krona[a_shape=[4,2],scale=3]"))
    layer = model.get_submodule(name)
    a = layer.adapters["default"]
    out_features, in_features = base_weight(layer.base_layer).shape
    assert a.krona_A.shape == (4, 2) and a.krona_B.shape == (out_features // 4, in_features // 2)
    update = 3 * torch.kron(a.krona_A, a.krona_B).detach()
    x = torch.randn(2, 5, in_features)
    with torch.no_grad():
        expected = layer.base_layer(x) + x @ update.T
        monkeypatch.setattr(torch, "kron", lambda *args: pytest.fail("the forward formed the Kronecker product"))
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_starts_as_the_base_with_a_zero_and_b_random():
    model = peftlab.attach(make_llama(), "krona[a_shape=[4,4]]")
    a = model.get_submodule(Q0).adapters["default"]
    assert torch.count_nonzero(a.krona_A) == 0 and torch.count_nonzero(a.krona_B) == a.krona_B.numel()


def test_merge_forms_the_product_and_equals_unmerged(ids):
    model = randomize_adapters(peftlab.attach(make_llama(), "krona[a_shape=[8,8],scale=2,targets=[queries,values]]"))
    layer = model.get_submodule(Q0)
    a = layer.adapters["default"]
    W = layer.base_layer.weight.detach().clone()
    unmerged = logits(model, ids)
    peftlab.merge(model)
    torch.testing.assert_close(layer.base_layer.weight, W + 2 * torch.kron(a.krona_A, a.krona_B), rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=1e-6)


def test_update_can_have_full_rank_with_few_parameters():
    """The point of KronA: rank(A kron B) = rank(A) rank(B), beyond a LoRA of the same size."""
    model = randomize_adapters(peftlab.attach(make_llama(), "krona[a_shape=[4,4],targets=q_proj]"))
    a = model.get_submodule(Q0).adapters["default"]
    assert a.krona_A.numel() + a.krona_B.numel() == 16 + 64  # a rank-1 LoRA of 32 x 32 has 64
    assert torch.linalg.matrix_rank(a.delta_weight().detach()) == 32


def test_a_shape_that_does_not_divide_names_the_module_and_sizes():
    with pytest.raises(peftlab.ConfigError, match=r"a_shape=\[3,4\] does not divide 'model.layers.0.self_attn.q_proj'.*32 x 32"):
        peftlab.attach(make_llama(), "krona[a_shape=[3,4]]")


@pytest.mark.parametrize("setting", ["a_shape=[4]", "a_shape=[4,0]", "a_shape=[2.5,2]", "scale=-1"])
def test_bad_settings(setting):
    with pytest.raises(peftlab.ConfigError, match=setting.split("=")[0]):
        peftlab.attach(make_llama(), f"krona[{setting}]")
