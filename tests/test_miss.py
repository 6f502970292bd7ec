"""MiSS: every r-wide shard of a layer's inputs gets the same trained update (balance, mini), or
block affine updates that read the frozen weight (bat); the start at the base, merging, narrow
layers; and HF PEFT's MISS format checked against the real ``peft`` package both ways."""
from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import (
    assert_config_edit_is_a_format_error, assert_peft_adapter_loads_and_goes_back,
    assert_peftlab_file_loads_in_peft, logits, make_bert, make_gpt2, make_llama, peft_adapter_file,
    peft_logits, read_adapter_config,
)

import peftlab
from peftlab.core import adapters as core
from peftlab.core.layer import AdapterLayer

Q0, K0, DOWN0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"


def randomize(model, seed: int = 0, std: float = 0.1):
    """Every MiSS block (peftlab's or peft's) to random values, so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "miss_block" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def adapter(model, name=Q0):
    return model.get_submodule(name).adapters["default"]


def shared_update_by_hand(D, in_features):
    """delta W (out x in), column by column: column j is row j mod r of D."""
    return torch.stack([D[j % D.shape[0]] for j in range(in_features)], dim=1)


def block_affine_by_hand(W, B):
    """W' block by block: W'_ji = W_ji + W_ji B_j + B_j for each r x r block (j: output block)."""
    r = B.shape[-1]
    out = W.clone()
    for j in range(W.shape[0] // r):
        for i in range(W.shape[1] // r):
            block = W[j * r:(j + 1) * r, i * r:(i + 1) * r]
            out[j * r:(j + 1) * r, i * r:(i + 1) * r] = block + block @ B[j] + B[j]
    return out


# ---- the method --------------------------------------------------------------------------------

@pytest.mark.parametrize("r", [8, 12], ids=["dividing", "remainder"])
def test_every_shard_of_the_inputs_gets_the_same_update(r):
    """The defining property: delta W = [D^T D^T ... D^T] (the last shard cut short when r does not
    divide the width), so the layer adds D^T (x_1 + x_2 + ...): one r x out matrix for all shards."""
    model = randomize(peftlab.attach(make_llama(), f"miss[r={r}]"))
    layer = model.get_submodule(DOWN0)  # 32 x 64
    a = layer.adapters["default"]
    D = a.miss_block.detach()
    assert D.shape == (r, 32)
    expected = shared_update_by_hand(D, 64)
    torch.testing.assert_close(a.delta_weight(), expected, rtol=0, atol=0)
    assert torch.linalg.matrix_rank(expected) <= r
    x = torch.randn(3, 64)
    slices = torch.nn.functional.pad(x, (0, -64 % r)).split(r, dim=-1)
    torch.testing.assert_close(a(x, None), sum(slices) @ D, rtol=0, atol=1e-5)
    W = layer.base_layer.weight.detach().clone()
    peftlab.merge(model)
    torch.testing.assert_close(layer.base_layer.weight, W + expected, rtol=0, atol=0)
    peftlab.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=1e-6)


def test_mini_repeats_one_block_along_the_outputs():
    model = randomize(peftlab.attach(make_llama(), "miss[r=8,init=mini,mini_r=4]"))
    a = adapter(model, DOWN0)
    block = a.miss_block.detach()
    assert block.shape == (8, 4)
    expected = torch.stack([torch.stack([block[j % 8, o % 4] for j in range(64)]) for o in range(32)])
    torch.testing.assert_close(a.delta_weight(), expected, rtol=0, atol=0)


def test_bat_updates_each_block_through_the_frozen_weight():
    """Bone's block affine: W'_ji = W_ji + W_ji B_j + B_j, exact to merge and to undo."""
    model = randomize(peftlab.attach(make_llama(), "miss[r=8,init=bat]"))
    layer = model.get_submodule(DOWN0)
    a = layer.adapters["default"]
    assert a.miss_block.shape == (4, 8, 8)
    W = layer.base_layer.weight.detach().clone()
    expected = block_affine_by_hand(W, a.miss_block.detach())
    torch.testing.assert_close(W + a.delta_weight(), expected, rtol=0, atol=1e-6)
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, expected, layer.base_layer.bias),
                                   rtol=0, atol=1e-5)
    peftlab.merge(model)
    torch.testing.assert_close(layer.base_layer.weight, expected, rtol=0, atol=1e-6)
    peftlab.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", ["miss[r=8]", "miss[r=8,init=bat]", "miss[r=16,init=mini,mini_r=2]"])
@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_layer_output_is_base_plus_update(spec, routed):
    model = randomize(peftlab.attach(make_llama(), spec))
    layer = model.get_submodule(K0)  # 16 x 32
    a = layer.adapters["default"]
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, layer.base_layer.weight + a.delta_weight(), layer.base_layer.bias)
        if routed:
            with peftlab.routing(model, ["default", None, "default"]):
                out = layer(x)
            expected[1] = layer.base_layer(x[1])
        else:
            out = layer(x)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", ["miss[r=12]", "miss[r=8,init=bat]", "miss[r=8,init=mini,mini_r=8]"])
def test_gradients_match_the_dense_formula(spec):
    model = randomize(peftlab.attach(make_llama(), spec))
    model.train()
    layer = model.get_submodule(DOWN0)
    a = layer.adapters["default"]
    x = torch.randn(2, 5, 64, requires_grad=True)
    weights = torch.randn(2, 5, 32)
    (layer(x) * weights).sum().backward()
    got = [p.grad.clone() for p in (x, a.miss_block)]
    for p in (x, a.miss_block):
        p.grad = None
    W = layer.base_layer.weight
    if a.init == "bat":
        dense = block_affine_by_hand(W, a.miss_block)
    else:
        D = a.miss_block.repeat(1, 32 // a.miss_block.shape[1]) if a.init == "mini" else a.miss_block
        dense = W + shared_update_by_hand(D, 64)
    (torch.nn.functional.linear(x, dense, layer.base_layer.bias) * weights).sum().backward()
    for mine, reference in zip(got, [x.grad, a.miss_block.grad]):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", ["miss", "miss[r=8,init=bat]", "miss[r=8,init=mini]"])
def test_starts_as_the_base_exactly(spec, ids):
    model = peftlab.attach(make_llama(), spec)
    assert all(torch.count_nonzero(a.miss_block) == 0 for _, a in core.all_adapters(model))
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=0)
    random = peftlab.attach(make_llama(), "miss[r=8,init=random]")
    assert not torch.allclose(logits(random, ids), logits(make_llama(), ids), atol=1e-3)


@pytest.mark.parametrize("spec", ["miss", "miss[r=12,init=random]", "miss[r=8,init=bat]", "miss[r=4,init=mini,mini_r=8]"])
def test_merge_equals_unmerged_and_unmerge_restores(spec, ids):
    model = randomize(peftlab.attach(make_llama(), spec))
    layer = model.get_submodule(Q0)
    W = layer.base_layer.weight.detach().clone()
    unmerged = logits(model, ids)
    peftlab.merge(model)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)


def test_dropout_acts_in_training_only():
    model = randomize(peftlab.attach(make_llama(), "miss[r=8,dropout=0.5]"))
    layer = model.get_submodule(Q0)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        evaluated = layer(x)
        torch.testing.assert_close(evaluated, torch.nn.functional.linear(
            x, layer.base_layer.weight + layer.adapters["default"].delta_weight()), rtol=0, atol=1e-5)
        model.train()
        torch.manual_seed(0)
        assert not torch.allclose(layer(x), evaluated, atol=1e-4)


def test_defaults_attach_to_tiny_widths_and_save_in_peftlabs_format(ids, tmp_path):
    """r=64 (PEFT's default) on 32-wide layers: those use r=32; the layers' r then differ, which
    PEFT's file cannot say, so the adapter is saved in peftlab's format, with a warning."""
    model = randomize(peftlab.attach(make_llama(), "miss"))
    assert len([m for m in model.modules() if isinstance(m, AdapterLayer)]) == 14
    assert adapter(model).miss_block.shape == (32, 32) and adapter(model, DOWN0).miss_block.shape == (64, 32)
    expected = logits(model, ids)
    with pytest.warns(UserWarning, match=r"miss: layers narrower than r=64 use their width \(r=\[32\]\).*at most 32"):
        peftlab.save(model, tmp_path)
    assert read_adapter_config(tmp_path)["peft_type"] == "PEFTLAB"
    torch.testing.assert_close(logits(peftlab.load(make_llama(), tmp_path), ids), expected, rtol=0, atol=0)
    # all layers narrowed alike: PEFT's file, with that r
    model = randomize(peftlab.attach(make_llama(), "miss[targets=[q_proj,v_proj]]"))
    peftlab.save(model, tmp_path / "uniform")
    assert json.loads((tmp_path / "uniform" / "adapter_config.json").read_text())["r"] == 32
    torch.testing.assert_close(peft_logits(make_llama, tmp_path / "uniform", ids), logits(model, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec,match", [("miss[r=0]", "r must be a positive integer"),
                                        ("miss[r=12,init=bat]", "r=12 does not divide both"),
                                        ("miss[r=32,init=bat]", r"'model.layers.0.self_attn.k_proj' is 16 x 32 and r=32"),
                                        ("miss[init=mini,mini_r=3]", "mini_r=3 does not divide the 32 outputs"),
                                        ("miss[dropout=1]", r"dropout must be in \[0, 1\)"),
                                        ("miss[init=lora]", "init must be one of balance, bat, mini, random"),
                                        ("miss[colour=3]", "unknown setting")])
def test_bad_settings_are_config_errors(spec, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), spec)



@pytest.mark.parametrize("spec", ["miss[r=4]", "miss[r=8,init=bat]"])
def test_a_bfloat16_base_trains_and_merges(spec, ids):
    """CPU has no half-precision QR or solves: those small pieces run in float32, the rest in bfloat16."""
    model = randomize(peftlab.attach(make_llama().to(torch.bfloat16), spec))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    a = adapter(model)
    assert a.miss_block.dtype == torch.bfloat16 and a.miss_block.grad.abs().max() > 0
    model.eval()
    unmerged = logits(model, ids).float()
    W = model.get_submodule(Q0).base_layer.weight.detach().clone()
    peftlab.merge(model)
    torch.testing.assert_close(logits(model, ids).float(), unmerged, rtol=0, atol=2e-2)
    peftlab.unmerge(model)
    torch.testing.assert_close(model.get_submodule(Q0).base_layer.weight, W, rtol=0, atol=5e-3)

def test_gpt2_conv1d_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="Conv1D.*nn.Linear layers only"):
        peftlab.attach(make_gpt2(), "miss[r=8]")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [
    ("llama-balance", make_llama, "miss[r=16]"),
    ("llama-remainder-dropout", make_llama, "miss[r=12,dropout=0.1,targets=[q_proj,v_proj,down_proj]]"),
    ("llama-bat", make_llama, "miss[r=8,init=bat]"),
    ("llama-mini", make_llama, "miss[r=16,init=mini,mini_r=4,targets=[k_proj,up_proj]]"),
    ("bert-head", make_bert, "miss[r=8,modules_to_save=[classifier]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_miss_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = randomize(peftlab.attach(factory(), spec))
    config = assert_peftlab_file_loads_in_peft(model, factory, ids, tmp_path, "MISS")
    assert config["init_weights"] in (True, "bat", "mini")


PEFTS = [
    ("llama-all-linear", make_llama, dict(r=32, target_modules="all-linear", task_type="CAUSAL_LM")),
    ("llama-remainder", make_llama, dict(r=12, miss_dropout=0.05, target_modules=["q_proj", "o_proj", "down_proj"],
                                         task_type="CAUSAL_LM")),
    ("llama-bat", make_llama, dict(r=8, init_weights="bat", target_modules=["q_proj", "k_proj", "down_proj"],
                                   task_type="CAUSAL_LM")),
    ("llama-mini", make_llama, dict(r=16, init_weights="mini", mini_r=8, target_modules=["v_proj", "gate_proj"],
                                    task_type="CAUSAL_LM")),
    ("bert-seq-cls", make_bert, dict(r=16, init_weights=False, target_modules=["query", "value"], task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_miss_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    expected = peft_adapter_file(factory, peft.MissConfig, kwargs, tmp_path, ids, randomize=randomize)
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected)


def test_bad_files_are_format_errors(tmp_path):
    peftlab.save(peftlab.attach(make_llama(), "miss[r=8]"), tmp_path)
    config = read_adapter_config(tmp_path)
    assert_config_edit_is_a_format_error(tmp_path, config, {"r": 16}, "do not belong together")
    assert_config_edit_is_a_format_error(tmp_path, config, {"init_weights": "pissa"}, "init_weights='pissa'")
    assert_config_edit_is_a_format_error(tmp_path, config, {"bias": "MiSS_only"}, "bias")
    assert_config_edit_is_a_format_error(tmp_path, config, {"init_weights": "bat", "r": 12}, "r=12 does not divide")


def test_peftlab_info_reads_the_file(tmp_path):
    from peftlab.cli import adapter_info

    peftlab.save(peftlab.attach(make_llama(), "miss[r=8,init=bat,targets=[q_proj,down_proj]]"), tmp_path)
    info = adapter_info(tmp_path)
    assert info["method"] == "miss" and info["peft_type"] == "MISS" and info["adapted_modules"] == 4
    assert info["adapter_parameters"] == 2 * (32 // 8 + 32 // 8) * 8 * 8
