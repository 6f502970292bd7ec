"""TinyLoRA: frozen truncated-SVD factors of W around an r x r core mixed from fixed random matrices by
a tiny trained vector shared across weight-tying groups, merging, and HF PEFT's TINYLORA format checked
against the real ``peft`` package both ways (with P saved, and regenerated from the seed)."""
from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from conftest import (
    assert_config_edit_is_a_format_error, assert_peft_adapter_loads_and_goes_back,
    assert_peftlab_file_loads_in_peft, logits, make_bert, make_gpt2, make_llama, peft_adapter_file,
    peft_logits, read_adapter_config,
)
from safetensors.torch import load_file, save_file

import peftlab
from peftlab.core import adapters as core
from peftlab.core.layer import AdapterLayer
from peftlab.methods import tinylora

Q0, K0, DOWN0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"


def randomize(model, seed: int = 0, std: float = 0.5):
    """Every trained vector (peftlab's or peft's) to random values, so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "tinylora_v" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def adapter(model, name=Q0):
    return model.get_submodule(name).adapters["default"]


def expected_update(a, W) -> torch.Tensor:
    """B R A computed by hand from W's SVD, the layer's P and its vector."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    r = a.r
    R = sum(a.v()[i] * a.tinylora_P[i] for i in range(a.u))
    return U[:, :r] @ torch.diag(S[:r].sqrt()) @ R @ torch.diag(S[:r].sqrt()) @ Vh[:r]


def trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ---- the method --------------------------------------------------------------------------------

def test_the_update_is_b_r_a_around_the_frozen_svd_and_only_v_trains(ids):
    """The defining property: A and B are W's top-r singular directions (B A is W's best rank-r
    approximation, A A^T = diag(S_r)), frozen; R = sum v_i P_i; only v trains."""
    model = randomize(peftlab.attach(make_llama(), "tinylora[r=3,u=5]"))
    layer = model.get_submodule(DOWN0)
    a, W = layer.adapters["default"], layer.base_layer.weight.detach()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(a.tinylora_B @ a.tinylora_A, U[:, :3] @ torch.diag(S[:3]) @ Vh[:3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.tinylora_A @ a.tinylora_A.T, torch.diag(S[:3]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.delta_weight(), expected_update(a, W), rtol=1e-5, atol=1e-5)
    assert a.tinylora_P.shape == (5, 3, 3) and a.v().shape == (5,)
    assert set(trainable(model)) == {n for n in trainable(model) if n.endswith("tinylora_v")}
    assert sum(p.numel() for p in trainable(model).values()) == 14 * 5  # every layer its own vector
    model.train()
    frozen = [(t, t.clone()) for t in (a.tinylora_A, a.tinylora_B, a.tinylora_P)]
    optimizer = torch.optim.SGD(list(trainable(model).values()), lr=1.0)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert all(torch.equal(t, before) for t, before in frozen)


@pytest.mark.parametrize("tying,groups", [(0.0, 14), (0.5, 7), (0.9, 1), (1.0, 1), (0.3, 10)])
def test_weight_tying_shares_one_vector_per_group_as_peft(tying, groups):
    """round(N (1 - tying)) groups of N // groups consecutive layers, the last taking the rest:
    the same trained count as PEFT's, and one storage per group."""
    model = peftlab.attach(make_llama(), f"tinylora[u=4,weight_tying={tying}]")
    adapters = [a for _, a in core.all_adapters(model)]
    assert len(trainable(model)) == groups and sum(p.numel() for p in trainable(model).values()) == 4 * groups
    size = 14 // groups
    for index, a in enumerate(adapters):
        owner = adapters[min(index // size, groups - 1) * size]
        assert a.v() is owner.v()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_llama(), peft.TinyLoraConfig(u=4, weight_tying=tying, target_modules="all-linear"))
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == 4 * groups


def test_factors_and_projections_are_pefts_for_the_same_seed():
    """P of the k-th adapted layer is N(0, 1/r) from seed + k; A and B the same SVD split."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_llama(), peft.TinyLoraConfig(r=3, u=6, projection_seed=9, target_modules="all-linear"))
    ours = peftlab.attach(make_llama(), "tinylora[r=3,u=6,projection_seed=9]")
    for index, (module_name, layer) in enumerate(core.adapter_layers(ours)):
        a, their = layer.adapters["default"], theirs.base_model.model.get_submodule(module_name)
        for key in ("tinylora_A", "tinylora_B", "tinylora_P"):
            torch.testing.assert_close(getattr(a, key), getattr(their, key)["default"], rtol=0, atol=0)
    g = torch.Generator().manual_seed(9 + 13)
    torch.testing.assert_close(a.tinylora_P, torch.randn(6, 3, 3, generator=g) / 3 ** 0.5, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_layer_adds_the_update(routed):
    model = randomize(peftlab.attach(make_llama(), "tinylora[u=8]"))
    layer = model.get_submodule(K0)  # 16 x 32
    a = layer.adapters["default"]
    x = torch.randn(3, 5, 32)
    update = expected_update(a, layer.base_layer.weight.detach())
    with torch.no_grad():
        expected = layer.base_layer(x) + x @ update.T
        if routed:
            with peftlab.routing(model, ["default", None, "default"]):
                out = layer(x)
            expected[1] = layer.base_layer(x[1])
        else:
            out = layer(x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a(x, None), x @ update.T, rtol=1e-5, atol=1e-5)  # the unfused route


def test_fused_gradients_match_the_plain_formula():
    model = randomize(peftlab.attach(make_llama(), "tinylora[u=8]"))
    model.train()
    layer = model.get_submodule(DOWN0)
    a = layer.adapters["default"]
    x = torch.randn(2, 5, 64, requires_grad=True)
    weights = torch.randn(2, 5, 32)
    (layer(x) * weights).sum().backward()
    got = [x.grad.clone(), a.v().grad.clone()]
    x.grad, a.v().grad = None, None
    W = layer.base_layer.weight
    (torch.nn.functional.linear(x, W + a.tinylora_B @ tinylora.core_matrix(a.v(), a.tinylora_P) @ a.tinylora_A,
                                layer.base_layer.bias) * weights).sum().backward()
    torch.testing.assert_close(got[0], x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], a.v().grad, rtol=1e-4, atol=1e-5)


def test_starts_as_the_base_and_v_gets_a_gradient(ids):
    model = peftlab.attach(make_llama(), "tinylora")
    assert all(torch.count_nonzero(p) == 0 for p in trainable(model).values())
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=0)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) for p in trainable(model).values())
    uniform = peftlab.attach(make_llama(), "tinylora[init=uniform,init_v_bound=0.05]")
    v = adapter(uniform).v()
    assert torch.count_nonzero(v) == v.numel() and v.abs().max() <= 0.05


def test_merge_adds_the_update_and_equals_unmerged(ids):
    model = randomize(peftlab.attach(make_llama(), "tinylora[weight_tying=0.5]"))
    layer = model.get_submodule(Q0)
    W = layer.base_layer.weight.detach().clone()
    unmerged = logits(model, ids)
    update = expected_update(layer.adapters["default"], W)
    peftlab.merge(model)
    torch.testing.assert_close(layer.base_layer.weight, W + update, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", ["tinylora[weight_tying=0.5,projection_seed=3]", "tinylora[r=4,save_projection=false]"])
def test_save_load_round_trip_is_exact(ids, tmp_path, spec):
    model = randomize(peftlab.attach(make_llama(), spec))
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    loaded = peftlab.load(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)


def test_spec_string_and_defaults_attach_to_tiny_widths():
    model = peftlab.attach(make_llama(), "tinylora")
    a = adapter(model)
    assert (a.r, a.u) == (2, 64)
    assert len([m for m in model.modules() if isinstance(m, AdapterLayer)]) == 14
    wide = peftlab.attach(make_llama(), "tinylora[r=100,targets=[k_proj]]")
    assert adapter(wide, K0).r == 16 and adapter(wide, K0).tinylora_P.shape == (64, 16, 16)  # capped at min(16, 32)


def test_two_adapters_have_their_own_vectors(ids):
    model = peftlab.attach(make_llama(), "tinylora[u=4,targets=q_proj]")
    peftlab.attach(model, "tinylora[u=8,weight_tying=1,targets=[q_proj,v_proj]]", name="other")
    layer = model.get_submodule(Q0)
    assert layer.adapters["default"].v().shape == (4,) and layer.adapters["other"].v().shape == (8,)


@pytest.mark.parametrize("setting,match", [("r=0", "r must"), ("u=-1", "u must"), ("weight_tying=2", "weight_tying"),
                                           ("projection_seed=x", "projection_seed"), ("init=gaussian", "init"),
                                           ("init_v_bound=0", "init_v_bound"), ("dropout=1", "dropout"),
                                           ("save_projection=2", "save_projection"), ("colour=3", "unknown setting")])
def test_bad_settings_are_config_errors(setting, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), f"tinylora[{setting}]")


def test_gpt2_conv1d_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="Conv1D.*nn.Linear layers only"):
        peftlab.attach(make_gpt2(), "tinylora")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [
    ("llama-defaults", make_llama, "tinylora"),
    ("llama-tied-no-projection", make_llama,
     "tinylora[r=3,u=16,weight_tying=0.6,projection_seed=7,save_projection=false,targets=[q_proj,v_proj,down_proj]]"),
    ("bert-head", make_bert, "tinylora[u=8,weight_tying=1,modules_to_save=[classifier]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_tinylora_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = randomize(peftlab.attach(factory(), spec))
    config = assert_peftlab_file_loads_in_peft(model, factory, ids, tmp_path, "TINYLORA")
    assert "tinylora_dropout" in config
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert any(k.endswith("tinylora_P") for k in keys) == config["save_projection"]
    assert "base_model.tinylora_v.0" in keys


PEFTS = [
    ("llama-q-v", make_llama, dict(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    ("llama-all-linear-tied", make_llama, dict(r=4, u=13, weight_tying=0.5, projection_seed=11, init_weights="uniform",
                                               target_modules="all-linear", task_type="CAUSAL_LM")),
    ("llama-no-projection", make_llama, dict(u=8, save_projection=False, projection_seed=2,
                                             target_modules=["k_proj", "down_proj"], task_type="CAUSAL_LM")),
    ("bert-seq-cls", make_bert, dict(u=16, weight_tying=1.0, target_modules=["query", "value", "dense"], task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_tinylora_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    expected = peft_adapter_file(factory, peft.TinyLoraConfig, kwargs, tmp_path, ids, randomize=randomize, std=4.0)
    # peft warns when it regenerates P from the seed
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected, quiet=True)


def test_the_files_factors_are_used_as_saved(ids, tmp_path):
    """A, B and P come from the file (as in PEFT), not from the base's SVD or the seed."""
    model = randomize(peftlab.attach(make_llama(), "tinylora[u=4]"))
    with torch.no_grad():
        for _, a in core.all_adapters(model):
            a.tinylora_A.mul_(-1.5)
            a.tinylora_P.mul_(2)
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    torch.testing.assert_close(logits(peftlab.load(make_llama(), tmp_path), ids), expected, rtol=0, atol=0)
    torch.testing.assert_close(peft_logits(make_llama, tmp_path, ids), expected, rtol=0, atol=1e-5)


def test_info_reads_the_layers(tmp_path):
    from peftlab.cli import adapter_info

    model = peftlab.attach(make_llama(), "tinylora[targets=[q_proj,v_proj],weight_tying=0.5]")
    peftlab.save(model, tmp_path)
    info = adapter_info(tmp_path)
    assert info["method"] == "tinylora" and info["adapted_modules"] == 4
    assert info["parameters"] == peftlab.summary(model)["adapters"]["default"] == 2 * 64  # the vectors, not A, B, P


def _saved(tmp_path, spec="tinylora[u=4,weight_tying=0.5]"):
    peftlab.save(randomize(peftlab.attach(make_llama(), spec)), tmp_path)
    return read_adapter_config(tmp_path), load_file(tmp_path / "adapter_model.safetensors")


def test_missing_vectors_or_bias_training_are_format_errors(tmp_path):
    config, tensors = _saved(tmp_path)
    save_file({k: v for k, v in tensors.items() if k != "base_model.tinylora_v.3"}, tmp_path / "adapter_model.safetensors")
    fresh = make_llama()
    with pytest.raises(peftlab.AdapterFormatError, match="do not belong together"):
        peftlab.load(fresh, tmp_path)
    assert not [m for m in fresh.modules() if isinstance(m, AdapterLayer)]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    assert_config_edit_is_a_format_error(tmp_path, config, {"weight_tying": 0.0}, "share 14")
    assert_config_edit_is_a_format_error(tmp_path, config, {"bias": "tinylora_only"}, "bias")


def test_tensors_that_contradict_the_config_are_format_errors(tmp_path):
    config, tensors = _saved(tmp_path)
    assert_config_edit_is_a_format_error(tmp_path, config, {"u": 8}, "do not belong together")
    save_file({k: v for k, v in tensors.items() if not k.endswith(f"{Q0}.tinylora_B")}, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(peftlab.AdapterFormatError, match="lacks tinylora_B"):
        peftlab.load(make_llama(), tmp_path)
