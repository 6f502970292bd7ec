"""PEANuT: the update is a small network applied to the frozen weight, delta W = f(W); merging, and
HF PEFT's PEANUT format checked against the real ``peft`` package both ways."""
from __future__ import annotations


import peft
import pytest
import torch
from conftest import (
    assert_config_edit_is_a_format_error, assert_peft_adapter_loads_and_goes_back,
    assert_peftlab_file_loads_in_peft, logits, make_bert, make_gpt2, make_llama, peft_adapter_file,
    read_adapter_config,
)

import peftlab
from peftlab.core.layer import AdapterLayer
from peftlab.methods import peanut

Q0, K0, DOWN0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"


def randomize(model, seed: int = 0, std: float = 0.3):
    """Every PEANuT weight (peftlab's or peft's) to random values, so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "peanut_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def adapter(model, name=Q0):
    return model.get_submodule(name).adapters["default"]


def tweaker_by_hand(W, a, act) -> torch.Tensor:
    """The paper's f(W) column by column (float64): each column w_j of W goes A, (encoders), (decoders
    with the skip from the matching encoder input), B; the columns of delta W are the outputs."""
    A, B = a.peanut_A.weight.double(), a.peanut_B.weight.double()
    Es = [e.weight.double() for e in a.peanut_encoders]
    Ds = [d.weight.double() for d in a.peanut_decoders]
    columns = []
    for j in range(W.shape[1]):
        h = act(A @ W[:, j].double())
        stack = []
        for E in Es:
            stack.append(h)
            h = act(E @ h)
        for D in Ds:
            h = act(D @ h) + stack.pop()
        columns.append(B @ h * a.scaling)
    return torch.stack(columns, dim=1)


# ---- the method --------------------------------------------------------------------------------

@pytest.mark.parametrize("depth,act_fn,act", [(0, "relu", torch.relu), (2, "gelu", torch.nn.functional.gelu),
                                              (1, "tanh", torch.tanh)])
def test_update_is_the_tweaker_network_applied_to_the_frozen_weight(depth, act_fn, act):
    """The defining property, against the network written out column by column."""
    model = randomize(peftlab.attach(make_llama(), f"peanut[r=6,depth={depth},act_fn={act_fn},scaling=0.7]"))
    for name in (Q0, K0, DOWN0):
        a = adapter(model, name)
        W = model.get_submodule(name).base_layer.weight
        torch.testing.assert_close(a.delta_weight().double(), tweaker_by_hand(W, a, act), rtol=1e-5, atol=1e-6)
        assert sum(p.numel() for p in a.parameters()) == 6 * a.out_features * 2 + depth * 2 * 36
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".peanut_" in n for n in trainable)


def test_the_update_is_weight_aware():
    """Same tweaker, other weight, other update: with a linear activation and depth 0 the update is
    exactly s B A W (a low-rank map of W itself), and a zero weight gets no update at all."""
    a = adapter(randomize(peftlab.attach(make_llama(), "peanut[r=4,act_fn=linear,scaling=2]")))
    W = a.__dict__["_base_ref"].weight
    BA = a.peanut_B.weight @ a.peanut_A.weight
    torch.testing.assert_close(a.delta_weight(), 2 * BA @ W, rtol=1e-5, atol=1e-6)
    other = torch.randn_like(W)
    torch.testing.assert_close(a.delta_weight(other), 2 * BA @ other, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(a.delta_weight(torch.zeros_like(W))) == 0
    relu = adapter(randomize(peftlab.attach(make_llama(), "peanut[r=4]")))  # non-linear: not additive in W
    assert not torch.allclose(relu.delta_weight(W + other), relu.delta_weight(W) + relu.delta_weight(other), atol=1e-3)


@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_layer_adds_delta_w_x(routed):
    model = randomize(peftlab.attach(make_llama(), "peanut[r=8,depth=1]"), std=0.1)
    layer = model.get_submodule(DOWN0)
    a = layer.adapters["default"]
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        expected = layer.base_layer(x) + x @ a.delta_weight().T
        if routed:
            with peftlab.routing(model, ["default", None, "default"]):
                out = layer(x)
            expected[1] = layer.base_layer(x[1])
        else:
            out = layer(x)
        torch.testing.assert_close(a(x, None), x @ a.delta_weight().T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_tweaker_layer_and_not_the_base():
    model = randomize(peftlab.attach(make_llama(), "peanut[r=4,depth=2,act_fn=silu]"), std=0.2)
    model.train()
    layer = model.get_submodule(Q0)
    layer(torch.randn(2, 5, 32)).pow(2).sum().backward()
    for name, p in layer.adapters["default"].named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
    assert layer.base_layer.weight.grad is None


def test_starts_as_the_base_with_b_at_zero(ids):
    model = peftlab.attach(make_llama(), "peanut")
    assert torch.count_nonzero(adapter(model).peanut_B.weight) == 0
    assert torch.count_nonzero(adapter(model).peanut_A.weight) > 0
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=0)
    kaiming = peftlab.attach(make_llama(), "peanut[init=kaiming]")  # PEFT's init_weights=False
    assert torch.count_nonzero(adapter(kaiming).peanut_B.weight) > 0


def test_merge_adds_the_update_of_the_unmerged_weight_and_unmerge_restores(ids):
    model = randomize(peftlab.attach(make_llama(), "peanut[r=8,depth=1]"), std=0.1)
    layer = model.get_submodule(Q0)
    W = layer.base_layer.weight.detach().clone()
    delta = layer.adapters["default"].delta_weight().detach()
    unmerged = logits(model, ids)
    peftlab.merge(model)
    torch.testing.assert_close(layer.base_layer.weight, W + delta, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)


def test_save_load_round_trip_is_exact(ids, tmp_path):
    model = randomize(peftlab.attach(make_llama(), "peanut[r=5,depth=2,act_fn=gelu,scaling=0.5]"))
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    loaded = peftlab.load(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)


def test_defaults_attach_to_tiny_widths():
    model = peftlab.attach(make_llama(), "peanut")
    assert len([m for m in model.modules() if isinstance(m, AdapterLayer)]) == 14
    a = adapter(model, K0)  # r=32 wider than k_proj's 16 outputs: allowed, as in PEFT
    assert a.peanut_A.weight.shape == (32, 16) and a.peanut_B.weight.shape == (16, 32) and a.r == 32


@pytest.mark.parametrize("setting,match", [("r=0", "r "), ("depth=-1", "depth"), ("act_fn=swishy", "act_fn"),
                                           ("scaling=0", "scaling"), ("init=ones", "init"), ("colour=3", "unknown setting")])
def test_bad_settings_are_config_errors(setting, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), f"peanut[{setting}]")


def test_gpt2_conv1d_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="Conv1D.*nn.Linear layers only"):
        peftlab.attach(make_gpt2(), "peanut")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [
    ("llama-defaults", make_llama, "peanut"),
    ("llama-deep", make_llama, "peanut[r=6,depth=2,act_fn=gelu,scaling=0.5,targets=[q_proj,v_proj,down_proj]]"),
    ("bert-head", make_bert, "peanut[r=8,depth=1,act_fn=tanh,modules_to_save=[classifier]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_peanut_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = randomize(peftlab.attach(factory(), spec), std=0.2)
    config = assert_peftlab_file_loads_in_peft(model, factory, ids, tmp_path, "PEANUT")
    assert config["init_weights"] is True


PEFTS = [
    ("llama-q-v", make_llama, dict(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    ("llama-deep", make_llama, dict(r=4, depth=3, act_fn="silu", scaling=2.0, target_modules="all-linear",
                                    task_type="CAUSAL_LM")),
    ("bert-seq-cls", make_bert, dict(r=6, depth=1, scaling=20.0, target_modules=["query", "value"], init_weights=False,
                                     task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_peanut_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    expected = peft_adapter_file(factory, peft.PeanutConfig, kwargs, tmp_path, ids, randomize=randomize, std=0.2)
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected)


def test_tensors_that_contradict_the_config_are_a_format_error(tmp_path):
    peftlab.save(peftlab.attach(make_llama(), "peanut[r=4,depth=1]"), tmp_path)
    config = read_adapter_config(tmp_path)
    assert_config_edit_is_a_format_error(tmp_path, config, {"depth": 0}, "do not belong together")
    assert_config_edit_is_a_format_error(tmp_path, config, {"r": 5}, "do not belong together")
    assert_config_edit_is_a_format_error(tmp_path, config, {"act_fn": "nope"}, "act_fn")
