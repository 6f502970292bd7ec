"""Super-Tuning: trained values at the largest-magnitude entries of W (or the smallest), optionally beside a
LoRA ("Supra"), merging, and HF PEFT's SUPERTUNING format checked against the real ``peft`` package both
ways (with the positions saved, and chosen again from the base)."""
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
from peftlab.methods import supertuning

Q0, K0, DOWN0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomize(model, seed: int = 0, std: float = 0.3):
    """Every trained tensor (peftlab's or peft's) moved by random values, so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "supertuning_" in name:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def adapter(model, name=Q0):
    return model.get_submodule(name).adapters["default"]


def trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def expected_update(a) -> torch.Tensor:
    """S (the values at their flat positions) plus (alpha / r) B A, by hand."""
    S = torch.zeros(a.out_features * a.in_features)
    for position, value in zip(a.supertuning_indices.tolist(), a.supertuning_values):
        S[position] += value
    S = S.view(a.out_features, a.in_features)
    return S + a.scale * a.supertuning_lora_B @ a.supertuning_lora_A if a.r else S


# ---- the method --------------------------------------------------------------------------------

@pytest.mark.parametrize("top", [True, False])
def test_the_trained_entries_are_the_largest_or_smallest_of_w_and_nothing_else_moves(top):
    """The defining property: a layer trains the k = int(out in (1 - sparsity)) entries of largest
    (or smallest) |W|, and after a step W + S differs from W exactly there."""
    model = peftlab.attach(make_llama(), f"supertuning[sparsity=0.9,select_top={str(top).lower()}]")
    layer = model.get_submodule(DOWN0)
    a, W = layer.adapters["default"], layer.base_layer.weight.detach().clone()
    k = int(32 * 64 * (1 - 0.9))
    assert a.supertuning_values.shape == (k,)
    magnitudes = sorted(range(W.numel()), key=lambda p: W.flatten()[p].abs().item(), reverse=top)
    assert set(a.supertuning_indices.tolist()) == set(magnitudes[:k])
    chosen = W.flatten().abs()[a.supertuning_indices]
    others = W.flatten().abs()[[p for p in range(W.numel()) if p not in set(a.supertuning_indices.tolist())]]
    assert (chosen.min() >= others.max()) if top else (chosen.max() <= others.min())
    assert set(trainable(model)) == {n for n in trainable(model) if n.endswith("supertuning_values")}
    model.train()
    optimizer = torch.optim.SGD(list(trainable(model).values()), lr=1.0)
    ids = torch.randint(3, 96, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    changed = (a.adapted_weight(W) != W).flatten().nonzero().squeeze(1)
    assert len(changed) and set(changed.tolist()) <= set(a.supertuning_indices.tolist())
    assert torch.equal(layer.base_layer.weight, W), "the base weight itself never changes"


def test_selection_is_pefts_in_order():
    """The same positions in the same order as PEFT's topk, on every layer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_llama(), peft.SupertuningConfig(sparsity=0.95, target_modules=ALL))
    ours = peftlab.attach(make_llama(), "supertuning[sparsity=0.95]")
    for module_name, layer in core.adapter_layers(ours):
        their = theirs.base_model.model.get_submodule(module_name).supertuning_indices["default"]
        assert torch.equal(layer.adapters["default"].supertuning_indices, their.long())


@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
@pytest.mark.parametrize("spec", ["supertuning[sparsity=0.8]", "supertuning[r=4,alpha=6]"])
def test_layer_adds_the_update(spec, routed):
    model = randomize(peftlab.attach(make_llama(), spec))
    layer = model.get_submodule(K0)
    a = layer.adapters["default"]
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        expected = layer.base_layer(x) + x @ expected_update(a).T
        if routed:
            with peftlab.routing(model, ["default", None, "default"]):
                out = layer(x)
            expected[1] = layer.base_layer(x[1])
        else:
            out = layer(x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a(x, None), x @ expected_update(a).T, rtol=1e-5, atol=1e-5)  # the unfused route
    torch.testing.assert_close(a.delta_weight(), expected_update(a), rtol=1e-6, atol=1e-6)


def test_supra_adds_a_lora_scaled_alpha_over_r_and_both_train(ids):
    model = peftlab.attach(make_llama(), "supertuning[r=4]")
    a = adapter(model)
    assert a.scale == 2.0 and a.supertuning_lora_A.shape == (4, 32) and a.supertuning_lora_B.shape == (32, 4)
    assert torch.count_nonzero(a.supertuning_lora_B) == 0 and torch.count_nonzero(a.supertuning_lora_A)
    assert {n.rsplit(".", 1)[-1] for n in trainable(model)} == {"supertuning_values", "supertuning_lora_A",
                                                                 "supertuning_lora_B"}
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=0)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert torch.count_nonzero(a.supertuning_values.grad) and torch.count_nonzero(a.supertuning_lora_B.grad)


def test_fused_gradients_match_the_plain_formula():
    model = randomize(peftlab.attach(make_llama(), "supertuning[sparsity=0.9,r=2]"))
    model.train()
    layer = model.get_submodule(DOWN0)
    a = layer.adapters["default"]
    x = torch.randn(2, 5, 64, requires_grad=True)
    weights = torch.randn(2, 5, 32)
    params = (x, a.supertuning_values, a.supertuning_lora_A, a.supertuning_lora_B)
    (layer(x) * weights).sum().backward()
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    W = layer.base_layer.weight
    (torch.nn.functional.linear(x, W + a.current_delta(), layer.base_layer.bias) * weights).sum().backward()
    for mine, plain in zip(got, [p.grad for p in params]):
        torch.testing.assert_close(mine, plain, rtol=1e-4, atol=1e-5)


def test_starts_as_the_base(ids):
    model = peftlab.attach(make_llama(), "supertuning")
    assert all(torch.count_nonzero(p) == 0 for p in trainable(model).values())
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=0)
    assert torch.count_nonzero(adapter(peftlab.attach(make_llama(), "supertuning[init=random]")).supertuning_values)


@pytest.mark.parametrize("spec", ["supertuning[sparsity=0.9]", "supertuning[r=4,sparsity=0.95]"])
def test_merge_adds_the_update_and_equals_unmerged(ids, spec):
    model = randomize(peftlab.attach(make_llama(), spec))
    layer = model.get_submodule(Q0)
    W = layer.base_layer.weight.detach().clone()
    unmerged = logits(model, ids)
    peftlab.merge(model)
    torch.testing.assert_close(layer.base_layer.weight, W + expected_update(layer.adapters["default"]), rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", ["supertuning[sparsity=0.9,select_top=false]", "supertuning[r=2,save_indices=false]"])
def test_save_load_round_trip_is_exact(ids, tmp_path, spec):
    model = randomize(peftlab.attach(make_llama(), spec))
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    torch.testing.assert_close(logits(peftlab.load(make_llama(), tmp_path), ids), expected, rtol=0, atol=0)


def test_spec_string_and_defaults_attach_to_tiny_widths():
    model = peftlab.attach(make_llama(), "supertuning")
    assert len([m for m in model.modules() if isinstance(m, AdapterLayer)]) == 14
    assert adapter(model, K0).supertuning_values.numel() == int(16 * 32 * 0.01) == 5  # PEFT's float rounding
    assert supertuning.entries_to_train(1024, 0.99) == 10


@pytest.mark.parametrize("setting,match", [("sparsity=1", "sparsity"), ("sparsity=0.999", "no entry"), ("r=0", "r "),
                                           ("alpha=4", "needs r"), ("init=ones", "init"), ("dropout=1", "dropout"),
                                           ("select_top=2", "select_top"), ("save_indices=2", "save_indices"),
                                           ("colour=3", "unknown setting")])
def test_bad_settings_are_config_errors(setting, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), f"supertuning[{setting}]")


def test_gpt2_conv1d_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="Conv1D.*nn.Linear layers only"):
        peftlab.attach(make_gpt2(), "supertuning")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [
    ("llama-defaults", make_llama, "supertuning"),
    ("llama-supra-no-indices", make_llama,
     "supertuning[sparsity=0.9,r=4,alpha=3,save_indices=false,select_top=false,targets=[q_proj,v_proj,down_proj]]"),
    ("bert-head", make_bert, "supertuning[sparsity=0.8,modules_to_save=[classifier]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_supertuning_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = randomize(peftlab.attach(factory(), spec), std=1.0)
    config = assert_peftlab_file_loads_in_peft(model, factory, ids, tmp_path, "SUPERTUNING")
    assert "lora_dropout" in config
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert any(k.endswith("supertuning_indices") for k in keys) == config["save_precomputed_indices"]


PEFTS = [
    ("llama-q-v", make_llama, dict(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    ("llama-supra", make_llama, dict(sparsity=0.9, r=4, lora_alpha=8, init_weights=False, target_modules=ALL,
                                     task_type="CAUSAL_LM")),
    ("llama-no-indices", make_llama, dict(sparsity=0.95, select_top=False, save_precomputed_indices=False,
                                          target_modules=["k_proj", "down_proj"], task_type="CAUSAL_LM")),
    ("bert-seq-cls", make_bert, dict(sparsity=0.8, r=2, target_modules=["query", "value", "dense"], task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_supertuning_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    expected = peft_adapter_file(factory, peft.SupertuningConfig, kwargs, tmp_path, ids, randomize=randomize, std=1.0)
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected)


def test_the_files_positions_are_used_as_saved(ids, tmp_path):
    """Positions in the file win over the base's magnitudes (as in PEFT), so any positions load."""
    model = randomize(peftlab.attach(make_llama(), "supertuning[sparsity=0.9]"), std=1.0)
    with torch.no_grad():
        for _, a in core.all_adapters(model):
            a.supertuning_indices.copy_(a.supertuning_indices.flip(0) // 3)
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    torch.testing.assert_close(logits(peftlab.load(make_llama(), tmp_path), ids), expected, rtol=0, atol=0)
    torch.testing.assert_close(peft_logits(make_llama, tmp_path, ids), expected, rtol=0, atol=1e-5)


def test_info_reads_the_layers(tmp_path):
    from peftlab.cli import adapter_info

    model = peftlab.attach(make_llama(), "supertuning[r=2,targets=[q_proj,v_proj]]")
    peftlab.save(model, tmp_path)
    info = adapter_info(tmp_path)
    assert info["method"] == "supertuning" and info["adapted_modules"] == 4
    assert info["parameters"] == peftlab.summary(model)["adapters"]["default"]


def _saved(tmp_path, spec="supertuning[sparsity=0.9,r=2]"):
    peftlab.save(randomize(peftlab.attach(make_llama(), spec)), tmp_path)
    return read_adapter_config(tmp_path), load_file(tmp_path / "adapter_model.safetensors")


def test_incomplete_files_are_format_errors(tmp_path):
    config, tensors = _saved(tmp_path)
    save_file({k: v for k, v in tensors.items() if not k.endswith(f"{Q0}.supertuning_lora_B.weight")},
              tmp_path / "adapter_model.safetensors")
    fresh = make_llama()
    with pytest.raises(peftlab.AdapterFormatError, match="lacks supertuning_lora_B"):
        peftlab.load(fresh, tmp_path)
    assert not [m for m in fresh.modules() if isinstance(m, AdapterLayer)]
    save_file({k: v for k, v in tensors.items() if not k.endswith("supertuning_values")}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(peftlab.AdapterFormatError, match="no Super-Tuning tensors"):
        peftlab.load(make_llama(), tmp_path)


def test_tensors_that_contradict_the_config_or_the_base_are_errors(tmp_path):
    config, tensors = _saved(tmp_path)
    assert_config_edit_is_a_format_error(tmp_path, config, {"sparsity": 0.8}, "do not belong together")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    key = f"base_model.model.{Q0}.supertuning_indices"
    save_file({**tensors, key: tensors[key] + 5000}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(peftlab.IncompatibleBaseError, match="points past"):
        peftlab.load(make_llama(), tmp_path)
