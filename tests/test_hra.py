"""HRA: a layer's weight times a chain of r Householder reflections (orthogonal: the rows keep their
norms and angles; W H - W has rank <= r), the symmetric init that starts at the identity,
Gram-Schmidt (PEFT's apply_GS), merging; and HF PEFT's HRA format checked against the real
``peft`` package both ways."""
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
from peftlab.methods import hra

Q0, K0, DOWN0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"


def randomize(model, seed: int = 0):
    """Every reflection vector (peftlab's or peft's) to random values, so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "hra_u" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def adapter(model, name=Q0):
    return model.get_submodule(name).adapters["default"]


def reflections_by_hand(u):
    """prod_i (I - 2 u_i u_i^T / ||u_i||^2), left to right, one dense reflection at a time."""
    H = torch.eye(u.shape[0], dtype=torch.float64)
    for i in range(u.shape[1]):
        v = u[:, i:i + 1].double()
        H = H @ (torch.eye(u.shape[0], dtype=torch.float64) - 2 * v @ v.T / (v.T @ v))
    return H


def gram_schmidt_by_hand(u):
    """Orthonormal columns, one at a time, each made orthogonal to the ones before it."""
    cols = []
    for i in range(u.shape[1]):
        v = u[:, i].double()
        for q in cols:
            v = v - (q @ v) * q
        cols.append(v / v.norm())
    return torch.stack(cols, dim=1)


# ---- the method --------------------------------------------------------------------------------

def test_merged_weight_is_w_times_a_chain_of_reflections_and_keeps_the_rows_geometry():
    """The defining property: W' = W H_1 ... H_r with H_i = I - 2 u u^T / ||u||^2, H orthogonal, so
    every row keeps its norm and the angles between rows (W' W'^T = W W^T); W' - W has rank <= r."""
    model = randomize(peftlab.attach(make_llama(), "hra[r=4]"))
    layer = model.get_submodule(DOWN0)  # 32 x 64
    a = layer.adapters["default"]
    W = layer.base_layer.weight.detach().clone()
    H = reflections_by_hand(a.hra_u.detach())
    torch.testing.assert_close(a.reflection().double(), H, rtol=0, atol=1e-5)
    torch.testing.assert_close(H.T @ H, torch.eye(64, dtype=torch.float64), rtol=0, atol=1e-12)
    delta = a.delta_weight().detach()  # W H - W, from the unmerged base
    peftlab.merge(model)
    merged = layer.base_layer.weight.detach()
    torch.testing.assert_close(merged.double(), W.double() @ H, rtol=0, atol=1e-5)
    assert not torch.allclose(merged, W, atol=1e-2)
    torch.testing.assert_close(merged @ merged.T, W @ W.T, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged.norm(dim=1), W.norm(dim=1), rtol=0, atol=1e-5)
    assert torch.linalg.matrix_rank(merged - W, atol=1e-5) <= 4
    torch.testing.assert_close(delta, merged - W, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=1e-5)


def test_gram_schmidt_reflects_across_an_orthonormal_span_as_peft_does():
    model = randomize(peftlab.attach(make_llama(), "hra[r=5,gram_schmidt=true,init=random]"))
    a = adapter(model)
    u = a.hra_u.detach()
    Q = gram_schmidt_by_hand(u)
    H = a.reflection().double()
    torch.testing.assert_close(H, torch.eye(32, dtype=torch.float64) - 2 * Q @ Q.T, rtol=0, atol=1e-5)
    torch.testing.assert_close(H, reflections_by_hand(Q.float()), rtol=0, atol=1e-5)  # = the chain along Q
    torch.testing.assert_close(H.T @ H, torch.eye(32, dtype=torch.float64), rtol=0, atol=1e-5)
    from peft.tuners.hra.layer import HRALinear
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for gs in (False, True):
            theirs = HRALinear(torch.nn.Linear(32, 8), "default", peft.HRAConfig(r=5, apply_GS=gs, init_weights=False), r=5)
            with torch.no_grad():
                theirs.hra_u["default"].copy_(u)
            torch.testing.assert_close(hra.chain_matrix(u, gs), theirs.get_delta_weight("default"), rtol=0, atol=1e-5)
            torch.testing.assert_close(hra.chain_matrix(u, gs).T, theirs.get_delta_weight("default", reverse=True),
                                       rtol=0, atol=1e-5)


def test_symmetric_init_is_the_identity_with_a_gradient(ids):
    model = peftlab.attach(make_llama(), "hra")
    a = adapter(model)
    assert a.hra_u.shape == (32, 8) and torch.equal(a.hra_u[:, 0::2], a.hra_u[:, 1::2])
    torch.testing.assert_close(a.reflection(), torch.eye(32), rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=1e-5)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert a.hra_u.grad.abs().max() > 0, "the pairs cancel in the output but not in the gradient"
    random = peftlab.attach(make_llama(), "hra[init=random,r=3]")
    assert not torch.allclose(logits(random, ids), logits(make_llama(), ids), atol=1e-3)


@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_layer_reflects_its_input(routed):
    model = randomize(peftlab.attach(make_llama(), "hra[r=4]"))
    layer = model.get_submodule(K0)  # 16 x 32
    a = layer.adapters["default"]
    x = torch.randn(3, 5, 32)
    H = reflections_by_hand(a.hra_u.detach()).float()
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, layer.base_layer.weight @ H, layer.base_layer.bias)
        if routed:
            with peftlab.routing(model, ["default", None, "default"]):
                out = layer(x)
            expected[1] = layer.base_layer(x[1])
        else:
            out = layer(x)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(a(x, None), x @ H.T @ layer.base_layer.weight.T - x @ layer.base_layer.weight.T,
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", ["hra[r=4]", "hra[r=3,gram_schmidt=true,init=random]"])
def test_gradients_match_the_dense_formula(spec):
    model = randomize(peftlab.attach(make_llama(), spec))
    model.train()
    layer = model.get_submodule(DOWN0)
    a = layer.adapters["default"]
    x = torch.randn(2, 5, 64, requires_grad=True)
    weights = torch.randn(2, 5, 32)
    (layer(x) * weights).sum().backward()
    got = [p.grad.clone() for p in (x, a.hra_u)]
    for p in (x, a.hra_u):
        p.grad = None
    if a.gram_schmidt:  # peft's loop, differentiated
        Q = gram_schmidt_by_hand(a.hra_u).float()
        H = torch.eye(64) - 2 * Q @ Q.T
    else:
        H = torch.eye(64)
        for i in range(a.r):
            v = a.hra_u[:, i:i + 1] / a.hra_u[:, i:i + 1].norm()
            H = H - 2 * H @ v @ v.T
    (torch.nn.functional.linear(x, layer.base_layer.weight @ H, layer.base_layer.bias) * weights).sum().backward()
    for mine, dense in zip(got, [x.grad, a.hra_u.grad]):
        torch.testing.assert_close(mine, dense, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", ["hra", "hra[r=2,targets=[q_proj,down_proj]]", "hra[r=4,gram_schmidt=true,init=random]"])
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


def test_save_load_round_trip_is_exact(ids, tmp_path):
    model = randomize(peftlab.attach(make_llama(), "hra[r=6,targets=[q_proj,v_proj,up_proj]]"))
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    torch.testing.assert_close(logits(peftlab.load(make_llama(), tmp_path), ids), expected, rtol=0, atol=0)


def test_spec_string_and_defaults_attach_to_tiny_widths():
    model = peftlab.attach(make_llama(), "hra")
    assert len([m for m in model.modules() if isinstance(m, AdapterLayer)]) == 14
    assert adapter(model).hra_u.shape == (32, 8) and adapter(model, DOWN0).hra_u.shape == (64, 8)
    assert all(a.r == 8 and not a.gram_schmidt for _, a in core.all_adapters(model))
    model = peftlab.attach(make_bert(), "hra[r=40]")  # more reflections than inputs is allowed without Gram-Schmidt
    assert adapter(model, "bert.encoder.layer.0.attention.self.query").hra_u.shape == (32, 40)


@pytest.mark.parametrize("spec,match", [("hra[r=0]", "r .*must be a positive integer"),
                                        ("hra[r=5]", "r=5 is odd.*init=random"),
                                        ("hra[gram_schmidt=true]", "gram_schmidt=true cannot start from the symmetric"),
                                        ("hra[init=zeros]", "init must be one of symmetric, random"),
                                        ("hra[r=40,gram_schmidt=true,init=random]",
                                         "'model.layers.0.self_attn.q_proj' has 32 inputs and r=40"),
                                        ("hra[colour=3]", "unknown setting")])
def test_bad_settings_are_config_errors(spec, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), spec)



@pytest.mark.parametrize("spec", ["hra[r=4]", "hra[r=4,gram_schmidt=true,init=random]"])
def test_a_bfloat16_base_trains_and_merges(spec, ids):
    """CPU has no half-precision QR or solves: those small pieces run in float32, the rest in bfloat16."""
    model = randomize(peftlab.attach(make_llama().to(torch.bfloat16), spec))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    a = adapter(model)
    assert a.hra_u.dtype == torch.bfloat16 and a.hra_u.grad.abs().max() > 0
    model.eval()
    unmerged = logits(model, ids).float()
    W = model.get_submodule(Q0).base_layer.weight.detach().clone()
    peftlab.merge(model)
    torch.testing.assert_close(logits(model, ids).float(), unmerged, rtol=0, atol=2e-2)
    peftlab.unmerge(model)
    torch.testing.assert_close(model.get_submodule(Q0).base_layer.weight, W, rtol=0, atol=5e-3)

def test_gpt2_conv1d_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="Conv1D.*nn.Linear layers only"):
        peftlab.attach(make_gpt2(), "hra")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [
    ("llama-defaults", make_llama, "hra"),
    ("llama-gs", make_llama, "hra[r=4,gram_schmidt=true,init=random,targets=[q_proj,v_proj,down_proj]]"),
    ("llama-odd-random", make_llama, "hra[r=3,init=random,targets=[k_proj,up_proj]]"),
    ("bert-head", make_bert, "hra[r=6,modules_to_save=[classifier]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_hra_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = randomize(peftlab.attach(factory(), spec))
    config = assert_peftlab_file_loads_in_peft(model, factory, ids, tmp_path, "HRA")
    assert config["r"] == next(a.r for _, a in core.all_adapters(model))


PEFTS = [
    ("llama-defaults", make_llama, dict(target_modules="all-linear", task_type="CAUSAL_LM")),
    ("llama-gs", make_llama, dict(r=6, apply_GS=True, target_modules=["q_proj", "o_proj", "gate_proj"], task_type="CAUSAL_LM")),
    ("llama-odd", make_llama, dict(r=5, target_modules=["v_proj", "down_proj"], task_type="CAUSAL_LM")),
    ("bert-seq-cls", make_bert, dict(r=4, target_modules=["query", "value", "dense"], task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_hra_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    # peft warns about an odd r (peft_adapter_file silences it)
    expected = peft_adapter_file(factory, peft.HRAConfig, kwargs, tmp_path, ids, randomize=randomize)
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected)
    ours = peftlab.load(factory(), tmp_path)
    symmetric = not kwargs.get("apply_GS") and kwargs.get("r", 8) % 2 == 0
    assert {a.init for _, a in core.all_adapters(ours)} == {"symmetric" if symmetric else "random"}


def test_tensors_that_contradict_the_config_are_a_format_error(tmp_path):
    peftlab.save(peftlab.attach(make_llama(), "hra[r=4]"), tmp_path)
    config = read_adapter_config(tmp_path)
    assert_config_edit_is_a_format_error(tmp_path, config, {"r": 6}, "do not belong together")
    assert_config_edit_is_a_format_error(tmp_path, config, {"r": 0}, "invalid values.*r")
    assert_config_edit_is_a_format_error(tmp_path, config, {"bias": "hra_only"}, "bias")
    with pytest.raises(peftlab.IncompatibleBaseError, match="another base model"):
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))
        peftlab.load(make_bert(), tmp_path)


def test_peftlab_info_reads_the_file(tmp_path):
    from peftlab.cli import adapter_info

    peftlab.save(peftlab.attach(make_llama(), "hra[r=4,targets=[q_proj,down_proj]]"), tmp_path)
    info = adapter_info(tmp_path)
    assert info["method"] == "hra" and info["peft_type"] == "HRA" and info["adapted_modules"] == 4
    assert info["adapter_parameters"] == 2 * (32 + 64) * 4
