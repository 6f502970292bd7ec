"""Uni-LoRA: one trained vector theta_d, projected by a fixed isometric P into every layer's LoRA
factors; merging; and HF PEFT's UNILORA format checked against the real ``peft`` package both ways
(with indices saved, and regenerated from ``proj_seed``)."""
from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from conftest import (
    assert_config_edit_is_a_format_error, assert_peft_adapter_loads_and_goes_back,
    assert_peftlab_file_loads_in_peft, logits, make_bert, make_gpt2, make_llama, peft_adapter_file,
    read_adapter_config,
)

import peftlab
from peftlab.core import adapters as core
from peftlab.core.layer import AdapterLayer
from peftlab.methods import unilora

Q0, K0, DOWN0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"


def randomize(model, seed: int = 0, std: float = 0.5):
    """theta_d (peftlab's or peft's) to larger random values, so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "unilora_theta_d" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def adapter(model, name=Q0):
    return model.get_submodule(name).adapters["default"]


def projection(adapters, d: int) -> torch.Tensor:
    """P (D x d) built by hand from the layers' indices: position i reads entry j with weight 1 / sqrt(n_j)."""
    index = torch.cat([t.flatten() for a in adapters for t in (a.unilora_indices_A, a.unilora_indices_B)])
    counts = torch.bincount(index, minlength=d).float()
    P = torch.zeros(len(index), d)
    P[torch.arange(len(index)), index] = counts[index].rsqrt()
    return P


# ---- the method --------------------------------------------------------------------------------

def test_every_lora_factor_is_one_isometric_projection_of_one_vector():
    """The defining property: the flattened [A_1, B_1, ..., A_L, B_L] of the whole model equals
    P theta_d, with P^T P = I (an isometry: ||P theta|| = ||theta||); theta_d is the only trained
    tensor, stored once, and each entry is used floor(D/d) or ceil(D/d) times."""
    d = 100
    model = peftlab.attach(make_llama(), f"unilora[r=4,theta_d_length={d}]")
    adapters = [a for _, a in core.all_adapters(model)]
    assert len(adapters) == 14
    theta = adapters[0].theta()
    assert theta.shape == (d,) and all(a.theta() is theta for a in adapters)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert [n.rsplit(".", 1)[-1] for n, _ in trainable] == ["unilora_theta_d"] and trainable[0][1].numel() == d
    P = projection(adapters, d)
    D = P.shape[0]
    assert D == sum(4 * (a.in_features + a.out_features) for a in adapters)
    uses = torch.bincount(torch.cat([a.unilora_indices_A.flatten() for a in adapters] +
                                    [a.unilora_indices_B.flatten() for a in adapters]), minlength=d)
    assert set(uses.tolist()) <= {D // d, D // d + 1}
    torch.testing.assert_close(P.T @ P, torch.eye(d), rtol=0, atol=1e-6)
    with torch.no_grad():
        flat = torch.cat([f.flatten() for a in adapters for f in a.factors()[:2]])
        torch.testing.assert_close(flat, P @ theta, rtol=0, atol=1e-7)
        torch.testing.assert_close(flat.norm(), theta.norm(), rtol=1e-5, atol=0)
    # the gradient of theta is P^T times the LoRA-space gradient: one step moves every layer's factors
    model.train()
    model(input_ids=torch.randint(3, 96, (2, 5)), labels=torch.randint(3, 96, (2, 5))).loss.backward()
    assert torch.count_nonzero(theta.grad) == d


def test_the_assignment_is_peft_s():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_llama(), peft.UniLoraConfig(r=4, proj_seed=7, target_modules="all-linear"))
    ours = peftlab.attach(make_llama(), "unilora[r=4,proj_seed=7]")
    for name, mine in core.adapter_layers(ours, "default"):
        a, layer = mine.adapters["default"], theirs.base_model.model.get_submodule(name)
        for key in ("indices_A", "indices_B", "scales_A", "scales_B"):
            torch.testing.assert_close(getattr(a, f"unilora_{key}"), getattr(layer, f"unilora_{key}")["default"],
                                       rtol=0, atol=0)
    index = unilora.assign(10, 4, seed=0)  # 10 positions over 4 entries: two used 3 times, two twice
    assert sorted(index.bincount().tolist()) == [2, 2, 3, 3]
    assert torch.equal(index, peft.tuners.unilora.model.UniLoraModel.generate_index(10, 4, 0))


@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_layer_adds_the_product_read_off_theta(routed):
    model = randomize(peftlab.attach(make_llama(), "unilora[r=6]"))
    layer = model.get_submodule(K0)
    a = layer.adapters["default"]
    theta = a.theta()
    A = theta[a.unilora_indices_A] * a.unilora_scales_A
    B = theta[a.unilora_indices_B] * a.unilora_scales_B
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        expected = layer.base_layer(x) + x @ (B @ A).T
        if routed:
            with peftlab.routing(model, ["default", None, "default"]):
                out = layer(x)
            expected[1] = layer.base_layer(x[1])
        else:
            out = layer(x)
        torch.testing.assert_close(a(x, None), x @ (B @ A).T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_fused_gradients_match_the_plain_formula():
    model = randomize(peftlab.attach(make_llama(), "unilora[r=4]"))
    model.train()
    layer = model.get_submodule(DOWN0)
    a = layer.adapters["default"]
    x = torch.randn(2, 5, 64, requires_grad=True)
    weights = torch.randn(2, 5, 32)
    (layer(x) * weights).sum().backward()
    got = [x.grad.clone(), a.theta().grad.clone()]
    x.grad, a.theta().grad = None, None
    W = layer.base_layer.weight + a.delta_weight()
    (torch.nn.functional.linear(x, W, layer.base_layer.bias) * weights).sum().backward()
    for mine, plain in zip(got, [x.grad, a.theta().grad]):
        torch.testing.assert_close(mine, plain, rtol=1e-4, atol=1e-5)


def test_starts_near_the_base_with_theta_uniform_in_the_bound(ids):
    model = peftlab.attach(make_llama(), "unilora[init_theta_d_bound=0.01]")
    theta = adapter(model).theta()
    assert theta.abs().max() <= 0.01 and theta.abs().min() > 0
    base = logits(make_llama(), ids)
    assert 0 < (logits(model, ids) - base).abs().max() < 1e-3


def test_merge_equals_unmerged_and_unmerge_restores(ids):
    model = randomize(peftlab.attach(make_llama(), "unilora[r=4]"))
    layer = model.get_submodule(Q0)
    W = layer.base_layer.weight.detach().clone()
    unmerged = logits(model, ids)
    peftlab.merge(model)
    torch.testing.assert_close(layer.base_layer.weight, W + layer.adapters["default"].delta_weight(), rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=1e-6)


@pytest.mark.parametrize("save_indices", [False, True])
def test_save_load_round_trip_is_exact(ids, tmp_path, save_indices):
    model = randomize(peftlab.attach(make_llama(), f"unilora[r=4,proj_seed=3,save_indices={save_indices}]"))
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    torch.testing.assert_close(logits(peftlab.load(make_llama(), tmp_path), ids), expected, rtol=0, atol=0)


def test_spec_string_and_defaults_attach_to_tiny_widths():
    model = peftlab.attach(make_llama(), "unilora")
    assert adapter(model).theta().shape == (256,) and adapter(model).unilora_indices_A.shape == (4, 32)
    assert len([m for m in model.modules() if isinstance(m, AdapterLayer)]) == 14
    assert peftlab.summary(model)["adapters"]["default"] == 256


def test_two_unilora_adapters_have_their_own_vectors():
    model = peftlab.attach(make_llama(), "unilora[targets=q_proj]")
    peftlab.attach(model, "unilora[theta_d_length=64,targets=q_proj]", name="other")
    layer = model.get_submodule(Q0)
    assert layer.adapters["default"].theta().shape == (256,) and layer.adapters["other"].theta().shape == (64,)


@pytest.mark.parametrize("setting,match", [("r=0", "r must"), ("theta_d_length=0", "theta_d_length"),
                                           ("dropout=1.5", "dropout"), ("init_theta_d_bound=0", "init_theta_d_bound"),
                                           ("proj_seed=x", "proj_seed"), ("save_indices=2", "save_indices"),
                                           ("colour=3", "unknown setting")])
def test_bad_settings_are_config_errors(setting, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), f"unilora[{setting}]")


def test_gpt2_conv1d_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="Conv1D.*nn.Linear layers only"):
        peftlab.attach(make_gpt2(), "unilora")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [
    ("llama-defaults", make_llama, "unilora"),
    ("llama-indices", make_llama, "unilora[r=8,proj_seed=7,save_indices=true,targets=[q_proj,v_proj,down_proj]]"),
    ("llama-one-layer", make_llama, "unilora[r=2,theta_d_length=32,layers=[1]]"),
    ("bert-head", make_bert, "unilora[r=4,targets=[query,value],modules_to_save=[classifier]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_unilora_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = randomize(peftlab.attach(factory(), spec), std=3.0)
    config = assert_peftlab_file_loads_in_peft(model, factory, ids, tmp_path, "UNILORA")
    assert "unilora_dropout" in config
    from safetensors.torch import load_file
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.unilora_theta_d" in keys
    assert any(k.endswith("unilora_indices_A") for k in keys) == config["save_indices"]


PEFTS = [
    ("llama-q-v", make_llama, dict(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    ("llama-all-linear", make_llama, dict(r=8, theta_d_length=100, proj_seed=11, target_modules="all-linear",
                                          task_type="CAUSAL_LM")),
    ("llama-regex-indices", make_llama, dict(r=2, save_indices=True, target_modules=r".*\.(k_proj|down_proj)",
                                             task_type="CAUSAL_LM")),
    ("llama-layers", make_llama, dict(r=4, target_modules=["q_proj", "up_proj"], layers_to_transform=[0],
                                      task_type="CAUSAL_LM")),
    ("bert-seq-cls", make_bert, dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_unilora_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    expected = peft_adapter_file(factory, peft.UniLoraConfig, kwargs, tmp_path, ids, randomize=randomize, std=3.0)
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected)


def test_bad_files_are_format_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    peftlab.save(randomize(peftlab.attach(make_llama(), "unilora[r=4,save_indices=true,targets=q_proj]")), tmp_path)
    config = read_adapter_config(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert_config_edit_is_a_format_error(tmp_path, config, {"r": 2}, "do not belong together")
    assert_config_edit_is_a_format_error(tmp_path, config, {"theta_d_length": 8}, "integers in 0..7")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v for k, v in tensors.items() if "theta" not in k}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(peftlab.AdapterFormatError, match="lacks the trained vector"):
        peftlab.load(make_llama(), tmp_path)
    save_file({"base_model.unilora_theta_d": tensors["base_model.unilora_theta_d"]}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(peftlab.AdapterFormatError, match="save_indices=true"):
        peftlab.load(make_llama(), tmp_path)
    assert_config_edit_is_a_format_error(tmp_path, config, {"save_indices": False, "bias": "all"}, "bias")
