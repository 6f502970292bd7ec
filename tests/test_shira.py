"""SHiRA: r * (in + out) trained entries of W at a fixed random mask, a sparse but high-rank update,
merging, and HF PEFT's SHIRA format checked against the real ``peft`` package both ways."""
from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import (
    assert_peft_adapter_loads_and_goes_back, assert_peftlab_file_loads_in_peft, logits, make_bert, make_gpt2,
    make_llama, peft_adapter_file, peft_logits, read_adapter_config,
)
from peft.tuners.shira.mask_functions import random_mask as peft_random_mask
from safetensors.torch import load_file, save_file

import peftlab
from peftlab.core.layer import AdapterLayer
from peftlab.methods import shira

Q0, K0, DOWN0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"


def randomize(model, seed: int = 0, std: float = 1.0):
    """Every SHiRA value (peftlab's or peft's) to random values, so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "shira_weight" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def adapter(model, name=Q0):
    return model.get_submodule(name).adapters["default"]


def hand_dense(a) -> torch.Tensor:
    """S written entry by entry from the (row, column, value) triples."""
    S = torch.zeros(a.out_features, a.in_features, dtype=torch.float64)
    for (i, j), v in zip(a.shira_indices.T.tolist(), a.shira_weight.detach().double().tolist()):
        S[i, j] = v
    return S


# ---- the method --------------------------------------------------------------------------------

def test_only_the_masked_entries_change_and_the_update_is_high_rank():
    """The defining property: merging changes exactly the r * (in + out) masked entries of W, by the
    trained values, and the sparse update has far higher rank than r."""
    model = randomize(peftlab.attach(make_llama(), "shira[r=4,random_seed=3]"))
    before = {n: model.get_submodule(n).base_layer.weight.detach().clone() for n in (Q0, K0, DOWN0)}
    S = {n: hand_dense(adapter(model, n)) for n in before}
    peftlab.merge(model)
    for name, W in before.items():
        a = adapter(model, name)
        out_f, in_f = W.shape
        assert a.shira_weight.numel() == 4 * (in_f + out_f) == sum(p.numel() for p in a.parameters())
        changed = model.get_submodule(name).base_layer.weight.detach() != W
        mask = torch.zeros(out_f, in_f, dtype=torch.bool)
        mask[a.shira_indices[0], a.shira_indices[1]] = True
        assert torch.equal(changed, mask) and int(mask.sum()) == 4 * (in_f + out_f)
        torch.testing.assert_close(model.get_submodule(name).base_layer.weight.double() - W.double(), S[name],
                                   rtol=0, atol=1e-6)
        assert torch.linalg.matrix_rank(S[name]) == min(out_f, in_f) > 4  # full rank, not rank r
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("shira_weight") for n in trainable)


@pytest.mark.parametrize("seed", [None, 0, 11])
def test_mask_is_peft_random_mask_for_the_same_seed(seed):
    layer = torch.nn.Linear(32, 64)
    expected = torch.stack(torch.where(peft_random_mask(layer, 3, random_seed=seed) == 1))
    torch.testing.assert_close(shira.random_mask(64, 32, 3 * 96, seed), expected, rtol=0, atol=0)
    flat = torch.randperm(64 * 32, generator=torch.Generator().manual_seed(seed if seed is not None else 67280421310721))
    flat = flat[:288].sort().values
    torch.testing.assert_close(expected, torch.stack([flat // 32, flat % 32]), rtol=0, atol=0)


@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_layer_adds_s_x(routed):
    model = randomize(peftlab.attach(make_llama(), "shira[r=2]"))
    layer = model.get_submodule(DOWN0)
    a = layer.adapters["default"]
    S = hand_dense(a).float()
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        expected = layer.base_layer(x) + x @ S.T
        if routed:
            with peftlab.routing(model, ["default", None, "default"]):
                out = layer(x)
            expected[1] = layer.base_layer(x[1])
        else:
            out = layer(x)
        torch.testing.assert_close(a(x, None), x @ S.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_gradients_are_the_dense_gradient_at_the_mask():
    model = randomize(peftlab.attach(make_llama(), "shira[r=3]"))
    model.train()
    layer = model.get_submodule(Q0)
    a = layer.adapters["default"]
    x, weights = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    (layer(x) * weights).sum().backward()
    G = torch.einsum("bto,bti->oi", weights, x)  # d loss / d W
    torch.testing.assert_close(a.shira_weight.grad, G[a.shira_indices[0], a.shira_indices[1]], rtol=1e-4, atol=1e-5)


def test_starts_as_the_base_with_zero_values(ids):
    model = peftlab.attach(make_llama(), "shira")
    assert torch.count_nonzero(adapter(model).shira_weight) == 0
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=0)
    gaussian = peftlab.attach(make_llama(), "shira[init=gaussian]")  # PEFT's init_weights=False
    assert torch.count_nonzero(adapter(gaussian).shira_weight) == 8 * 64


def test_merge_equals_unmerged_and_unmerge_restores(ids):
    model = randomize(peftlab.attach(make_llama(), "shira[r=5]"), std=0.3)
    layer = model.get_submodule(Q0)
    W = layer.base_layer.weight.detach().clone()
    unmerged = logits(model, ids)
    peftlab.merge(model)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)


def test_save_load_round_trip_is_exact(ids, tmp_path):
    model = randomize(peftlab.attach(make_llama(), "shira[r=6,random_seed=2]"))
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    loaded = peftlab.load(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)
    torch.testing.assert_close(adapter(loaded).shira_indices, adapter(model).shira_indices, rtol=0, atol=0)


def test_defaults_attach_to_tiny_widths():
    """r=8: q_proj (32 x 32) trains 512 entries, k_proj (16 x 32) 384, down_proj (32 x 64) 768."""
    model = peftlab.attach(make_llama(), "shira")
    assert len([m for m in model.modules() if isinstance(m, AdapterLayer)]) == 14
    assert [adapter(model, n).shira_weight.numel() for n in (Q0, K0, DOWN0)] == [512, 384, 768]


@pytest.mark.parametrize("setting,match", [("r=0", "r must"), ("random_seed=1.5", "random_seed"), ("init=ones", "init"),
                                           ("r=11", r"r=11 asks for .* 528 entries of a 16 x 32 layer.*r <= 10"),
                                           ("colour=3", "unknown setting")])
def test_bad_settings_are_config_errors(setting, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), f"shira[{setting}]")


def test_gpt2_conv1d_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="Conv1D.*nn.Linear layers only"):
        peftlab.attach(make_gpt2(), "shira")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [
    ("llama-defaults", make_llama, "shira"),
    ("llama-seeded", make_llama, "shira[r=3,random_seed=7,targets=[q_proj,v_proj,down_proj]]"),
    ("bert-head", make_bert, "shira[r=4,modules_to_save=[classifier]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_shira_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = randomize(peftlab.attach(factory(), spec), std=0.3)
    config = assert_peftlab_file_loads_in_peft(model, factory, ids, tmp_path, "SHIRA")
    assert config["mask_type"] == "random" and config["init_weights"] is True
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert all(v.dtype == torch.int32 for k, v in tensors.items() if k.endswith("shira_indices"))


PEFTS = [
    ("llama-q-v", make_llama, dict(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    ("llama-all-seeded", make_llama, dict(r=5, random_seed=4, target_modules="all-linear", task_type="CAUSAL_LM")),
    ("llama-gaussian", make_llama, dict(r=1, init_weights=False, target_modules=["o_proj"], task_type="CAUSAL_LM")),
    ("bert-seq-cls", make_bert, dict(r=3, target_modules=["query", "value"], task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_shira_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    expected = peft_adapter_file(factory, peft.ShiraConfig, kwargs, tmp_path, ids,
                                 randomize=randomize if kwargs.get("init_weights", True) else None, std=0.3)
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected)


def test_positions_are_read_from_the_file_not_redrawn(ids, tmp_path):
    """A PEFT file whose mask came from elsewhere (a custom mask_fn) loads with its own positions."""
    model = randomize(peftlab.attach(make_llama(), "shira[r=2,targets=[q_proj]]"), std=0.3)
    peftlab.save(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = f"base_model.model.{Q0}.shira_indices"
    flat = torch.arange(128) * 7 % 1024  # 128 distinct positions no seed draws
    tensors[key] = torch.stack([flat // 32, flat % 32]).to(torch.int32)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    config = read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "mask_type": "custom"}))
    ours = peftlab.load(make_llama(), tmp_path)
    torch.testing.assert_close(adapter(ours).shira_indices, tensors[key].long(), rtol=0, atol=0)
    torch.testing.assert_close(logits(ours, ids), peft_logits(make_llama, tmp_path, ids), rtol=0, atol=1e-5)


def test_bad_files_are_clear_errors(tmp_path):
    peftlab.save(peftlab.attach(make_llama(), "shira[r=2,targets=[q_proj]]"), tmp_path)
    config = read_adapter_config(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = f"base_model.model.{Q0}.shira_indices"

    def load_with(new_config=None, **changes):
        (tmp_path / "adapter_config.json").write_text(json.dumps(new_config or config))
        save_file({**tensors, **changes}, tmp_path / "adapter_model.safetensors")
        fresh = make_llama()
        try:
            peftlab.load(fresh, tmp_path)
        finally:
            assert not [m for m in fresh.modules() if isinstance(m, AdapterLayer)]

    with pytest.raises(peftlab.AdapterFormatError, match="do not belong together"):
        load_with({**config, "r": 3})
    with pytest.raises(peftlab.IncompatibleBaseError, match="outside a 32 x 32 weight"):
        load_with(**{key: tensors[key] + 40})
    with pytest.raises(peftlab.AdapterFormatError, match="twice"):
        load_with(**{key: torch.zeros_like(tensors[key])})
    with pytest.raises(peftlab.AdapterFormatError, match="needs both"):
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))
        save_file({k: v for k, v in tensors.items() if k != key}, tmp_path / "adapter_model.safetensors")
        peftlab.load(make_llama(), tmp_path)
    with pytest.raises(peftlab.AdapterFormatError, match="fan_in_fan_out"):
        load_with({**config, "fan_in_fan_out": True})


def test_peftlab_info_counts_values_not_positions(tmp_path, capsys):
    from peftlab.cli import main

    model = peftlab.attach(make_llama(), "shira[r=2,targets=[k_proj,v_proj,down_proj]]")
    peftlab.save(model, tmp_path / "adapter")
    assert main(["info", str(tmp_path / "adapter"), "--json"]) in (0, None)
    info = json.loads(capsys.readouterr().out)
    assert info["peft_type"] == "SHIRA" and info["method"] == "shira" and info["adapted_modules"] == 6
    assert info["parameters"] == peftlab.summary(model)["adapters"]["default"] == 2 * 2 * (48 + 48 + 96)
