"""FRoD: every adapted weight written in a basis shared by its category, W' = U (S + diag(lambda)) V^T
with a sparse off-diagonal S and the diagonal trained; merging, routing, and HF PEFT's FROD format
checked against the real ``peft`` package both ways."""
from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from conftest import assert_peft_adapter_loads_and_goes_back, logits, make_bert, make_gpt2, make_llama, peft_logits
from safetensors.torch import load_file, save_file

import peftlab
from peftlab.core.layer import AdapterLayer
from peftlab.methods import frod

Q0, Q1, DOWN0, DOWN1 = ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")


def move(model, seed: int = 0, std: float = 0.05):
    """Every trained FRoD number (peftlab's or peft's) moved off its start, so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "frod_lambda" in name:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def adapter(model, name=Q0):
    return model.get_submodule(name).adapters["default"]


def check_joint_decomposition(V, weights, alpha) -> None:
    """V is R^T E for the stacked weights' QR = Q R (float64, written out here) and E orthonormal
    eigenvectors of T = mean_l (Q_l^T Q_l + alpha I)^-1, Q_l the rows of Q that belong to layer l:
    E = R^-T V must be orthogonal and must diagonalise T (eigenvectors are fixed only up to sign and,
    where eigenvalues repeat, rotation, so E is checked by what it does, not entry by entry)."""
    stacked = torch.cat([w.double() for w in weights])
    Q, R = torch.linalg.qr(stacked)
    n, start, T = R.shape[1], 0, torch.zeros(R.shape[1], R.shape[1], dtype=torch.float64)
    for w in weights:
        Ql = Q[start:start + w.shape[0]]
        start += w.shape[0]
        T += torch.linalg.inv(Ql.T @ Ql + alpha * torch.eye(n, dtype=torch.float64)) / len(weights)
    E = torch.linalg.solve(R.T, V.double())
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(E.T @ E, eye, rtol=0, atol=1e-3)
    D = E.T @ T @ E
    off = D - torch.diag(torch.diagonal(D))
    assert off.abs().max() < 1e-3 * D.abs().max()


# ---- the method --------------------------------------------------------------------------------

def test_each_weight_is_written_in_its_categorys_shared_basis():
    """The defining property: a category's layers share one V (the joint decomposition of their
    weights), each layer's U diag(lambda_0) V^T is its weight, U's columns are unit vectors, and the
    adapted weight is U (S + diag(lambda)) V^T with S trained at floor(rate n^2) off-diagonal places."""
    model = move(peftlab.attach(make_llama(), "frod[sparse_rate=0.05]"))
    a0, a1 = adapter(model, DOWN0), adapter(model, DOWN1)
    assert a1.projection()[0] is a0.projection()[0]  # one tensor for the category
    assert adapter(model, Q0).projection()[0].shape == (32, 32) and a0.projection()[0].shape == (64, 64)
    weights = [model.get_submodule(n).base_layer.weight.detach() for n in (DOWN0, DOWN1)]
    V = a0.projection()[0].double()
    check_joint_decomposition(V, weights, 1e-3)
    for a, W in zip((a0, a1), weights):
        U = a.frod_U.double()
        torch.testing.assert_close(U.norm(dim=0), torch.ones(64, dtype=torch.float64), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(U @ torch.diag(a.lambda_0.double()) @ V.T, W.double(), rtol=1e-4, atol=1e-5)
        places = a.projection()[1]
        assert places.shape == (2, int(64 * 64 * 0.05)) and bool((places[0] != places[1]).all())
        S = torch.zeros(64, 64, dtype=torch.float64)
        for k in range(places.shape[1]):
            S[places[0, k], places[1, k]] += a.frod_lambda_s_values[k].double()
        adapted = U @ (S + torch.diag(a.frod_lambda_l.double())) @ V.T  # what PEFT's layer uses as the weight
        torch.testing.assert_close(W.double() + a.delta_weight().double(), adapted, rtol=1e-4, atol=1e-5)
        assert torch.linalg.matrix_rank(a.delta_weight().double()) == 32  # full rank (down_proj is 32 x 64)
        assert sum(p.numel() for p in a.parameters()) == 64 + places.shape[1]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".frod_lambda_" in n for n in trainable)


def test_bases_and_places_are_peft_s():
    """The same model and key give PEFT's bases and places (so save_projection=false files agree)."""
    ours = peftlab.attach(make_llama(), "frod[sparse_rate=0.03,projection_prng_key=5]")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_llama(), peft.FrodConfig(target_modules="all-linear", sparse_rate=0.03,
                                                                   projection_prng_key=5, progressbar=False))
    for name in (Q0, DOWN1, "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.gate_proj"):
        cat = frod.category(name)
        V, places, size = adapter(ours, name).projection()
        assert torch.equal(V, theirs.base_model.frod_V[cat]["default"])
        assert torch.equal(places, theirs.base_model.frod_s_indices[cat]["default"])
        assert torch.equal(size, theirs.base_model.frod_s_size[cat]["default"])


def test_categories_and_blocks_follow_module_names():
    assert frod.category("model.layers.3.self_attn.q_proj") == "self_attn_q_proj"
    assert frod.category("bert.encoder.layer.0.attention.output.dense") == "attention_output"
    assert frod.category("bert.encoder.layer.0.output.dense") == "output_dense"
    assert frod.category("transformer.h.0.c_attn") == "c_attn" and frod.category("classifier") == "classifier"
    assert frod.block_index("model.layers.3.mlp.up_proj", 9) == 3
    assert frod.block_index("bert.encoder.layer.11.attention.self.query", 0) == 11
    assert frod.block_index("classifier.dense", 7) == 7


@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_layer_adds_delta_w_x(routed):
    model = move(peftlab.attach(make_llama(), "frod[sparse_rate=0.1,targets=[down_proj]]"))
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
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_gradients_reach_lambda_and_s_and_not_the_base():
    model = peftlab.attach(make_llama(), "frod[sparse_rate=0.1]")
    model.train()
    layer = model.get_submodule(Q0)
    layer(torch.randn(2, 5, 32)).pow(2).sum().backward()
    a = layer.adapters["default"]
    assert torch.count_nonzero(a.frod_lambda_l.grad) > 0 and torch.count_nonzero(a.frod_lambda_s_values.grad) > 0
    assert layer.base_layer.weight.grad is None


def test_starts_exactly_as_the_base(ids):
    model = peftlab.attach(make_llama(), "frod")
    a = adapter(model)
    assert torch.count_nonzero(a.frod_lambda_s_values) == 0 and torch.equal(a.frod_lambda_l, a.lambda_0)
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=0)


def test_merge_equals_unmerged_and_unmerge_restores(ids):
    model = move(peftlab.attach(make_llama(), "frod[sparse_rate=0.05]"))
    layer = model.get_submodule(Q0)
    W = layer.base_layer.weight.detach().clone()
    unmerged = logits(model, ids)
    peftlab.merge(model)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", ["frod[sparse_rate=0.05]", "frod[save_projection=false]",
                                  "frod[targets=[q_proj,down_proj]]|lora[r=2,targets=[v_proj]]"],
                         ids=["hf-file", "no-projection", "native-union"])
def test_save_load_round_trip_is_exact(spec, ids, tmp_path):
    model = move(peftlab.attach(make_llama(), spec))
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    loaded = peftlab.load(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)


def test_defaults_attach_to_tiny_widths():
    model = peftlab.attach(make_llama(), "frod")
    assert len([m for m in model.modules() if isinstance(m, AdapterLayer)]) == 14
    assert adapter(model).frod_lambda_s_values.numel() == int(32 * 32 * 0.01)


@pytest.mark.parametrize("setting,match", [("sparse_rate=1.5", "sparse_rate"), ("regularization_alpha=-1", "regular"),
                                           ("dropout=1.5", "dropout"), ("projection_prng_key=1.5", "seed"),
                                           ("save_projection=maybe", "save_projection"), ("colour=3", "unknown setting")])
def test_bad_settings_are_config_errors(setting, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), f"frod[{setting}]")


def test_gpt2_conv1d_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="Conv1D.*nn.Linear layers only"):
        peftlab.attach(make_gpt2(), "frod")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [
    ("llama-defaults", make_llama, "frod"),
    ("llama-dense-no-projection", make_llama, "frod[sparse_rate=0.1,save_projection=false,projection_prng_key=3,"
                                              "targets=[q_proj,v_proj,down_proj]]"),
    ("bert-head", make_bert, "frod[sparse_rate=0.05,targets=[query,value,dense],modules_to_save=[classifier]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_frod_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = move(peftlab.attach(factory(), spec))
    expected = logits(model, ids)
    assert not torch.allclose(expected, logits(factory(), ids), atol=1e-3), "the adapter should matter"
    peftlab.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "FROD" and config["init_weights"] is True
    torch.testing.assert_close(peft_logits(factory, tmp_path, ids), expected, rtol=0, atol=1e-5)


PEFTS = [
    ("llama-q-v", make_llama, dict(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    ("llama-all-no-projection", make_llama, dict(target_modules="all-linear", sparse_rate=0.08, save_projection=False,
                                                 projection_prng_key=11, task_type="CAUSAL_LM")),
    ("bert-seq-cls", make_bert, dict(target_modules=["query", "value", "dense"], sparse_rate=0.05,
                                     regularization_alpha=1e-2, task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_frod_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = move(peft.get_peft_model(factory(), peft.FrodConfig(progressbar=False, **kwargs)).eval(), seed=3)
        expected = logits(theirs, ids)
        theirs.save_pretrained(str(tmp_path))
    assert not torch.allclose(expected, logits(factory(), ids), atol=1e-3), "the adapter should matter"
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected)


def test_files_that_contradict_their_config_are_format_errors(tmp_path):
    peftlab.save(peftlab.attach(make_llama(), "frod[targets=[q_proj,down_proj]]"), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "sparse_rate": 0.05}))
    fresh = make_llama()
    with pytest.raises(peftlab.AdapterFormatError, match="do not belong together"):
        peftlab.load(fresh, tmp_path)
    assert not [m for m in fresh.modules() if isinstance(m, AdapterLayer)]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v for k, v in tensors.items() if "frod_V" not in k}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(peftlab.AdapterFormatError, match="incomplete"):
        peftlab.load(make_llama(), tmp_path)
    broken = dict(tensors)
    broken["base_model.frod_s_indices.self_attn_q_proj"] = broken["base_model.frod_s_indices.self_attn_q_proj"] + 40
    save_file(broken, tmp_path / "adapter_model.safetensors")
    with pytest.raises(peftlab.AdapterFormatError, match="outside"):
        peftlab.load(make_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "bias": "all"}))
    with pytest.raises(peftlab.AdapterFormatError, match="bias"):
        peftlab.load(make_llama(), tmp_path)


def test_info_counts_the_trained_numbers_not_the_shared_bases(tmp_path):
    from peftlab.cli import adapter_info

    model = peftlab.attach(make_llama(), "frod[targets=[q_proj,down_proj]]")
    peftlab.save(model, tmp_path)
    info = adapter_info(tmp_path)
    assert info["method"] == "frod" and info["adapted_modules"] == 4
    assert info["adapter_parameters"] == peftlab.summary(model)["adapters"]["default"] == 2 * (32 + 10) + 2 * (64 + 40)
