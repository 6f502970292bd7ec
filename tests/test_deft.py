"""DeFT: a rank-r subspace of W's output space projected out and replaced by a trained injection,
W' = (I - P_proj) W + Q_P s R (PaRa: removal only), merging, and HF PEFT's DEFT format checked
against the real ``peft`` package both ways."""
from __future__ import annotations

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
from peftlab.core.layer import AdapterLayer
from peftlab.methods import deft

Q0, K0, DOWN0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"


def randomize(model, seed: int = 0, std: float = 0.3):
    """Every P and R (peftlab's or peft's) to random values, so both the removal and the injection matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "deft_P" in name or "deft_R" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def adapter(model, name=Q0):
    return model.get_submodule(name).adapters["default"]


def adapted_weight_by_hand(a, W) -> torch.Tensor:
    """(I - P_proj) W + Q_P s R in float64, the projector written out: relu: P relu(P)^T; qr: the
    orthogonal projector onto span(P), P (P^T P)^-1 P^T (no QR involved)."""
    P, W = a.deft_P.detach().double(), W.detach().double()
    if a.decomposition == "relu":
        proj, Q = P @ torch.relu(P).T, P
    else:
        proj = P @ torch.linalg.solve(P.T @ P, P.T)
        Q = deft.projection_factors(a.deft_P.detach(), "qr")[0].double()
    out = (torch.eye(P.shape[0], dtype=torch.float64) - proj) @ W
    return out if a.deft_R is None else out + Q @ (a.deft_R.detach().double() * a.scale)


# ---- the method --------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["deft[r=4]", "deft[r=4,decomposition=qr,alpha=12]", "deft[r=4,para=true]",
                                  "deft[r=4,decomposition=qr,para=true]"])
def test_adapted_weight_is_the_residual_projection_plus_injection(spec):
    """The defining property, against the projector written out by hand; only P (and R) train."""
    model = randomize(peftlab.attach(make_llama(), spec))
    for name in (Q0, K0, DOWN0):
        a = adapter(model, name)
        W = model.get_submodule(name).base_layer.weight
        torch.testing.assert_close((W + a.delta_weight()).double(), adapted_weight_by_hand(a, W), rtol=1e-5, atol=1e-5)
        assert a.deft_P.shape == (a.out_features, 4)
        assert (a.deft_R is None) == a.para and (a.para or a.deft_R.shape == (4, a.in_features))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("deft_P", "deft_R")) for n in trainable)


def test_qr_keeps_w_outside_the_subspace_and_replaces_it_inside():
    """With the orthogonal projector, the part of W orthogonal to span(P) is untouched, and what lies
    in span(P) is exactly the injection Q_P s R: DeFT's decomposition."""
    model = randomize(peftlab.attach(make_llama(), "deft[r=6,decomposition=qr,alpha=3]"))
    a = adapter(model)
    W = model.get_submodule(Q0).base_layer.weight.detach().double()
    new = W + a.delta_weight().double()
    Q = deft.projection_factors(a.deft_P.detach(), "qr")[0].double()
    torch.testing.assert_close(Q.T @ Q, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.triu(Q.T @ a.deft_P.detach().double()), Q.T @ a.deft_P.detach().double(), atol=1e-5, rtol=0)
    outside = torch.eye(32, dtype=torch.float64) - Q @ Q.T
    torch.testing.assert_close(outside @ new, outside @ W, rtol=0, atol=1e-5)
    torch.testing.assert_close(Q @ Q.T @ new, Q @ (a.deft_R.detach().double() * 0.5), rtol=0, atol=1e-5)


def test_para_reduces_the_weight_rank_by_r():
    """PaRa (qr): W' = (I - Q Q^T) W has rank out - r."""
    model = randomize(peftlab.attach(make_llama(), "deft[r=8,para=true,decomposition=qr]"))
    a = adapter(model)
    W = model.get_submodule(Q0).base_layer.weight.detach()
    assert torch.linalg.matrix_rank(W).item() == 32
    assert torch.linalg.matrix_rank(W + a.delta_weight(), atol=1e-4).item() == 24
    assert sum(p.numel() for p in a.parameters()) == 32 * 8  # P only


@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_layer_adds_delta_w_x(routed):
    model = randomize(peftlab.attach(make_llama(), "deft[decomposition=qr]"))
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


def test_gradients_match_the_hand_written_weight():
    model = randomize(peftlab.attach(make_llama(), "deft[r=4,alpha=8]"))
    model.train()
    layer = model.get_submodule(Q0)
    a = layer.adapters["default"]
    x, weights = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 5, 32, dtype=torch.float64)
    (layer(x.float()) * weights.float()).sum().backward()
    P = a.deft_P.detach().double().requires_grad_()
    R = a.deft_R.detach().double().requires_grad_()
    W = layer.base_layer.weight.detach().double()
    new = W - P @ torch.relu(P).T @ W + P @ R * 2.0
    ((x @ new.T) * weights).sum().backward()
    torch.testing.assert_close(a.deft_P.grad.double(), P.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.deft_R.grad.double(), R.grad, rtol=1e-4, atol=1e-4)


def test_starts_as_the_base_with_r_holding_b_w(ids):
    model = peftlab.attach(make_llama(), "deft[alpha=3]")
    a = adapter(model)
    W = model.get_submodule(Q0).base_layer.weight
    assert 0.01 < a.deft_P.std().item() < 0.03
    torch.testing.assert_close(a.deft_R * a.scale, torch.relu(a.deft_P) .T @ W, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=1e-5)
    for other in ("deft[init=random]", "deft[para=true]"):  # the paper's original start, and PaRa: no identity
        assert not torch.allclose(logits(peftlab.attach(make_llama(), other), ids), logits(make_llama(), ids), atol=1e-6)


def test_merge_equals_unmerged_and_unmerge_restores(ids):
    model = randomize(peftlab.attach(make_llama(), "deft[decomposition=qr,alpha=16]"))
    layer = model.get_submodule(Q0)
    W = layer.base_layer.weight.detach().clone()
    delta = layer.adapters["default"].delta_weight().detach()
    unmerged = logits(model, ids)
    peftlab.merge(model)
    torch.testing.assert_close(layer.base_layer.weight, W + delta, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    peftlab.unmerge(model)  # the update read W; unmerge uses the W it merged into, not the merged one
    torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)


def test_save_load_round_trip_is_exact(ids, tmp_path):
    model = randomize(peftlab.attach(make_llama(), "deft[r=5,decomposition=qr,alpha=10]"))
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    loaded = peftlab.load(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)


def test_defaults_attach_to_tiny_widths_with_r_capped():
    model = peftlab.attach(make_llama(), "deft")
    assert len([m for m in model.modules() if isinstance(m, AdapterLayer)]) == 14
    assert adapter(model).r == 8 and adapter(model).scale == 1.0
    wide = peftlab.attach(make_llama(), "deft[r=20]")  # k_proj has 16 outputs: r=16 there, as in PEFT
    assert adapter(wide).deft_P.shape == (32, 20) and adapter(wide, K0).deft_P.shape == (16, 16)


@pytest.mark.parametrize("setting,match", [("r=0", "r must"), ("decomposition=svd", "decomposition"),
                                           ("alpha=0", "alpha"), ("para=maybe", "para"), ("dropout=1", "dropout"),
                                           ("init=zeros", "init"), ("init_scale=0", "init_scale"),
                                           ("colour=3", "unknown setting")])
def test_bad_settings_are_config_errors(setting, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), f"deft[{setting}]")


def test_gpt2_conv1d_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="Conv1D.*nn.Linear layers only"):
        peftlab.attach(make_gpt2(), "deft")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [
    ("llama-defaults", make_llama, "deft"),
    ("llama-qr-alpha", make_llama, "deft[r=4,decomposition=qr,alpha=12,targets=[q_proj,v_proj,down_proj]]"),
    ("llama-para-capped", make_llama, "deft[r=20,para=true,init=random]"),
    ("bert-head", make_bert, "deft[r=4,modules_to_save=[classifier]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_deft_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = randomize(peftlab.attach(factory(), spec))
    config = assert_peftlab_file_loads_in_peft(model, factory, ids, tmp_path, "DEFT")
    assert config["para"] == ("para" in label)


PEFTS = [
    ("llama-q-v", make_llama, dict(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    ("llama-qr-random", make_llama, dict(r=6, decomposition_method="qr", alpha=12, init_weights=False, init_scale=0.5,
                                         target_modules="all-linear", task_type="CAUSAL_LM")),
    ("llama-para", make_llama, dict(r=20, para=True, target_modules=["k_proj", "o_proj"], task_type="CAUSAL_LM")),
    ("bert-seq-cls", make_bert, dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_deft_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    expected = peft_adapter_file(factory, peft.DeftConfig, kwargs, tmp_path, ids, randomize=randomize)
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected)


def test_peft_identity_init_is_ours(ids, tmp_path):
    """PEFT's default start (R = relu(P)^T W) read here is the base model, as ours is."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(make_llama(), peft.DeftConfig(target_modules="all-linear")).save_pretrained(str(tmp_path))
    torch.testing.assert_close(logits(peftlab.load(make_llama(), tmp_path), ids), logits(make_llama(), ids),
                               rtol=0, atol=1e-5)


def test_files_that_contradict_their_config_are_format_errors(tmp_path):
    peftlab.save(peftlab.attach(make_llama(), "deft[r=4]"), tmp_path)
    config = read_adapter_config(tmp_path)
    for bad, match in (({"r": 3}, "do not belong together"), ({"para": True}, "para=True needs"),
                       ({"bias": "all"}, "bias"), ({"decomposition_method": "svd"}, "decomposition"),
                       ({"fan_in_fan_out": True}, "Conv1D")):
        assert_config_edit_is_a_format_error(tmp_path, config, bad, match)
