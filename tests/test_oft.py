"""OFT: a block-diagonal orthogonal R (Cayley transforms of skew blocks, exact or PEFT's Neumann
series) on a layer's input, so W' = W R^T keeps the angles between neurons; merging; the block-size
rules (PEFT's default 32 with its nearest-divisor fallback, clear errors for explicit sizes); and
HF PEFT's OFT format checked against the real ``peft`` package both ways."""
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
from peftlab.core import adapters as core
from peftlab.core.layer import AdapterLayer
from peftlab.methods import oft

Q0, K0, DOWN0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"


def randomize(model, seed: int = 0, std: float = 0.1):
    """Every OFT entry (peftlab's or peft's) to random values, so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "oft_R" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def adapter(model, name=Q0):
    return model.get_submodule(name).adapters["default"]


def eye_like(R):
    return torch.eye(R.shape[-1]).expand_as(R)


# ---- the method --------------------------------------------------------------------------------

def test_rotation_stays_orthogonal_after_training_like_updates():
    """The defining property: R^T R = I, exactly (to float rounding) with the exact Cayley transform
    after large updates, and within the Neumann series' truncation error after fine-tuning-sized ones."""
    model = peftlab.attach(make_llama(), "oft[block_size=8,use_cayley_neumann=false]")
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):
        model(input_ids=torch.randint(3, 96, (2, 6)), labels=torch.randint(3, 96, (2, 6))).loss.backward()
        optimizer.step()
    randomize(model, std=0.3)  # and far from the identity
    for _, a in core.all_adapters(model):
        R = a.rotation_blocks()
        assert R.shape == (a.in_features // 8, 8, 8)
        torch.testing.assert_close(R.transpose(-2, -1) @ R, eye_like(R), rtol=0, atol=1e-5)
        full = a.rotation()
        torch.testing.assert_close(full.T @ full, torch.eye(a.in_features), rtol=0, atol=1e-5)
        assert torch.count_nonzero(full - torch.block_diag(*R.unbind(0))) == 0, "block-diagonal"
    model = randomize(peftlab.attach(make_llama(), "oft"), std=1e-3)  # the default Neumann form, 32 x 32 blocks
    R = adapter(model, DOWN0).rotation_blocks()
    torch.testing.assert_close(R.transpose(-2, -1) @ R, eye_like(R), rtol=0, atol=1e-5)
    assert not torch.allclose(R, eye_like(R), atol=1e-3), "the rotation is not the identity"


def test_merged_weight_keeps_the_angles_between_neurons():
    """W' = W R^T turns every output neuron's weight row by the same R: W' W'^T = W W^T."""
    model = randomize(peftlab.attach(make_llama(), "oft[r=4,use_cayley_neumann=false]"), std=0.3)
    layer = model.get_submodule(DOWN0)
    W = layer.base_layer.weight.detach().clone()
    peftlab.merge(model)
    merged = layer.base_layer.weight.detach()
    assert not torch.allclose(merged, W, atol=1e-3)
    torch.testing.assert_close(merged @ merged.T, W @ W.T, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged, W @ layer.adapters["default"].rotation().T, rtol=0, atol=1e-6)


def test_cayley_transforms_are_the_definitions_and_peft_series():
    g = torch.Generator().manual_seed(0)
    vec = torch.randn(3, 6, generator=g) * 0.2
    Q = oft.skew(vec, 4)
    assert torch.equal(Q, -Q.transpose(-2, -1)) and torch.equal(Q[0, 0, 1:], vec[0, :3])
    eye = eye_like(Q)
    torch.testing.assert_close(oft.cayley(Q, neumann=False), (eye - Q) @ torch.linalg.inv(eye + Q), rtol=0, atol=1e-6)
    torch.testing.assert_close(oft.cayley(Q, True, 40), (eye + Q) @ torch.linalg.inv(eye - Q), rtol=0, atol=1e-6)
    from peft.tuners.oft.layer import OFTRotationModule
    for terms in range(1, 8):
        module = OFTRotationModule(3, 6, 4, 12, use_cayley_neumann=True, num_cayley_neumann_terms=terms)
        torch.testing.assert_close(oft.cayley(Q, True, terms), module._cayley_batch(vec, 4, True, terms), rtol=0, atol=1e-6)


@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_layer_turns_its_input(routed):
    model = randomize(peftlab.attach(make_llama(), "oft[block_size=8]"))
    layer = model.get_submodule(K0)  # 16 x 32: four 8 x 8 blocks on the input side
    a = layer.adapters["default"]
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        expected = layer.base_layer(x @ a.rotation())
        if routed:
            with peftlab.routing(model, ["default", None, "default"]):
                out = layer(x)
            expected[1] = layer.base_layer(x[1])
        else:
            out = layer(x)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(a(x, None), expected - layer.base_layer(x) if not routed else
                                   layer.base_layer(x @ a.rotation()) - layer.base_layer(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", ["oft[block_size=8]", "oft[r=2,use_cayley_neumann=false,block_share=true]"])
def test_gradients_match_the_dense_formula(spec):
    model = randomize(peftlab.attach(make_llama(), spec))
    model.train()
    layer = model.get_submodule(DOWN0)
    a = layer.adapters["default"]
    x = torch.randn(2, 5, 64, requires_grad=True)
    weights = torch.randn(2, 5, 32)
    (layer(x) * weights).sum().backward()
    got = [p.grad.clone() for p in (x, a.oft_R.weight)]
    for p in (x, a.oft_R.weight):
        p.grad = None
    W = layer.base_layer.weight
    (torch.nn.functional.linear(x, W @ a.rotation().T, layer.base_layer.bias) * weights).sum().backward()
    for mine, dense in zip(got, [p.grad for p in (x, a.oft_R.weight)]):
        torch.testing.assert_close(mine, dense, rtol=1e-4, atol=1e-5)


def test_starts_as_the_base_exactly(ids):
    model = peftlab.attach(make_llama(), "oft")
    assert all(torch.count_nonzero(a.oft_R.weight) == 0 for _, a in core.all_adapters(model))
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=0)


@pytest.mark.parametrize("spec", ["oft", "oft[r=4,use_cayley_neumann=false]", "oft[block_size=16,block_share=true]"])
def test_merge_equals_unmerged_and_unmerge_restores(spec, ids):
    model = randomize(peftlab.attach(make_llama(), spec), std=0.2)
    layer = model.get_submodule(Q0)
    W = layer.base_layer.weight.detach().clone()
    unmerged = logits(model, ids)
    peftlab.merge(model)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)


def test_save_load_round_trip_is_exact(ids, tmp_path):
    model = randomize(peftlab.attach(make_llama(), "oft[r=2,block_share=true]"))
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    torch.testing.assert_close(logits(peftlab.load(make_llama(), tmp_path), ids), expected, rtol=0, atol=0)


def test_spec_string_and_defaults_attach_to_tiny_widths():
    model = peftlab.attach(make_llama(), "oft")  # in-widths 32 and 64: PEFT's 32
    assert adapter(model).block_size == 32 and adapter(model, DOWN0).oft_R.weight.shape == (2, 32 * 31 // 2)
    assert len([m for m in model.modules() if isinstance(m, AdapterLayer)]) == 14
    model = peftlab.attach(make_llama(), "oft[r=8]")
    assert adapter(model).block_size == 4 and adapter(model, DOWN0).block_size == 8
    model = peftlab.attach(make_llama(), "oft[block_size=16,targets=[q_proj,down_proj]]")
    assert adapter(model).oft_R.weight.shape == (2, 120) and adapter(model, DOWN0).oft_R.weight.shape == (4, 120)
    # unset: the nearest divisor of a width 32 does not divide (PEFT's fallback): 16 for 16, 24 for 48
    model = peftlab.attach(make_llama(hidden_size=16, intermediate_size=48, head_dim=4), "oft")
    assert adapter(model).block_size == 16 and adapter(model, DOWN0).block_size == 24
    from peft.tuners.oft.layer import OFTLayer
    assert [oft.nearest_divisor(w, 32) for w in (16, 48, 40, 96, 100)] == \
        [OFTLayer.adjust_oft_parameters(None, w, 32) for w in (16, 48, 40, 96, 100)]


def test_block_share_and_coft():
    model = peftlab.attach(make_llama(), "oft[block_size=8,block_share=true]")
    assert adapter(model).oft_R.weight.shape == (1, 28) and adapter(model).rotation_blocks().shape == (4, 8, 8)
    model = randomize(peftlab.attach(make_llama(), "oft[block_size=8,coft=true,eps=0.01]"))
    a = adapter(model)
    a.rotation_blocks()  # COFT projects in place before each use, as PEFT does
    norms = torch.linalg.vector_norm(oft.skew(a.oft_R.weight.detach(), 8), dim=(1, 2))
    assert torch.all(norms <= 0.01 / 4 ** 0.5 * (1 + 1e-5))


def test_module_dropout_acts_in_training_only():
    model = randomize(peftlab.attach(make_llama(), "oft[block_size=4,module_dropout=0.5]"))
    layer = model.get_submodule(Q0)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        evaluated = layer(x)
        torch.testing.assert_close(evaluated, layer.base_layer(x @ layer.adapters["default"].rotation()), rtol=0, atol=1e-5)
        model.train()
        torch.manual_seed(0)
        assert not torch.allclose(layer(x), evaluated, atol=1e-4)


@pytest.mark.parametrize("spec,match", [("oft[block_size=24]", "block_size=24 does not divide the 32 inputs of "
                                         "'model.layers.0.self_attn.q_proj'"),
                                        ("oft[r=3]", "r=3 blocks do not divide"),
                                        ("oft[r=4,block_size=8]", "not both"),
                                        ("oft[r=-1]", "r must be"), ("oft[eps=0]", "eps"),
                                        ("oft[num_cayley_neumann_terms=0]", "num_cayley_neumann_terms"),
                                        ("oft[colour=3]", "unknown setting")])
def test_bad_settings_are_config_errors(spec, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), spec)


def test_gpt2_conv1d_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="Conv1D.*nn.Linear layers only"):
        peftlab.attach(make_gpt2(), "oft")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [
    ("llama-defaults", make_llama, "oft"),
    ("llama-r-exact", make_llama, "oft[r=4,use_cayley_neumann=false,targets=[q_proj,v_proj,down_proj]]"),
    ("llama-share-coft", make_llama, "oft[block_size=8,block_share=true,coft=true,eps=0.05,num_cayley_neumann_terms=7]"),
    ("bert-head", make_bert, "oft[block_size=16,modules_to_save=[classifier]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_oft_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = randomize(peftlab.attach(factory(), spec))
    config = assert_peftlab_file_loads_in_peft(model, factory, ids, tmp_path, "OFT")
    assert bool(config["r"]) != bool(config["oft_block_size"])


PEFTS = [
    ("llama-defaults", make_llama, dict(target_modules="all-linear", task_type="CAUSAL_LM")),
    ("llama-r-exact", make_llama, dict(r=4, oft_block_size=0, use_cayley_neumann=False, target_modules=["q_proj", "v_proj"],
                                       task_type="CAUSAL_LM")),
    ("llama-coft-share", make_llama, dict(oft_block_size=8, coft=True, eps=0.05, block_share=True,
                                          target_modules=["k_proj", "down_proj"], task_type="CAUSAL_LM")),
    ("llama-adjusted-48", lambda: make_llama(intermediate_size=48), dict(target_modules=["up_proj", "down_proj"],
                                                                         task_type="CAUSAL_LM")),
    ("bert-seq-cls", make_bert, dict(oft_block_size=16, target_modules=["query", "value"], task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_oft_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    expected = peft_adapter_file(factory, peft.OFTConfig, kwargs, tmp_path, ids, randomize=randomize, std=0.3)
    # peft warns when it adjusts a block size
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected, quiet=True)


def test_tensors_that_contradict_the_config_are_a_format_error(tmp_path):
    peftlab.save(peftlab.attach(make_llama(), "oft[block_size=8]"), tmp_path)
    config = read_adapter_config(tmp_path)
    assert_config_edit_is_a_format_error(tmp_path, config, {"oft_block_size": 16}, "do not belong together")
    assert_config_edit_is_a_format_error(tmp_path, config, {"oft_block_size": 12}, "block_size=12 does not divide")
    assert_config_edit_is_a_format_error(tmp_path, config, {"bias": "oft_only"}, "bias")
