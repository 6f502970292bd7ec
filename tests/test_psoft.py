"""PSOFT: an r x r orthogonal transform trained inside the weight's principal subspace,
delta W = s B (R - I) A with (A, B) from the top-r SVD; merging, routing, and HF PEFT's PSOFT format
checked against the real ``peft`` package both ways."""
from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from conftest import assert_peft_adapter_loads_and_goes_back, logits, make_bert, make_gpt2, make_llama, peft_logits

import peftlab
from peftlab.core.layer import AdapterLayer

Q0, K0, DOWN0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"


def strong_bert():
    """The tiny BERT with weights at a pretrained scale, so its logits feel a subspace rotation."""
    return make_bert(initializer_range=0.2)


def move(model, seed: int = 0, std: float = 0.1):
    """Every trained PSOFT number (peftlab's or peft's) moved off its start, so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "psoft_R" in name:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def adapter(model, name=Q0):
    return model.get_submodule(name).adapters["default"]


def cayley_by_hand(a, r) -> torch.Tensor:
    """(I + Q)(I - Q)^-1 in float64 for the skew Q whose upper triangle (row by row) is ``a``."""
    Q = torch.zeros(r, r, dtype=torch.float64)
    k = 0
    for i in range(r):
        for j in range(i + 1, r):
            Q[i, j], Q[j, i] = a[k], -a[k]
            k += 1
    eye = torch.eye(r, dtype=torch.float64)
    return (eye + Q) @ torch.linalg.inv(eye - Q)


# ---- the method --------------------------------------------------------------------------------

def test_an_orthogonal_transform_inside_the_principal_subspace():
    """The defining property, against the SVD and the Cayley map written out: A = V_r^T (orthonormal
    rows), B = U_r S_r / s, R = diag(b) cayley(Q) diag(a); delta W = U_r S_r (R - I) V_r^T, so the
    principal part U_r S_r V_r^T becomes U_r S_r R V_r^T and the rest of W is untouched; with a = b = 1,
    R is orthogonal and keeps the principal coordinates' geometry ((R A)^T (R A) = A^T A)."""
    model = move(peftlab.attach(make_llama(), "psoft[r=8,alpha=4]"))
    for name in (Q0, DOWN0):
        a = adapter(model, name)
        W = model.get_submodule(name).base_layer.weight.detach()
        U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
        U, S, Vh = U[:, :8].double(), S[:8].double(), Vh[:8].double()
        torch.testing.assert_close(a.psoft_A.double(), Vh, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.psoft_B.double() * (4 / 8), U * S, rtol=1e-5, atol=1e-6)
        rotation = cayley_by_hand(a.psoft_R.weight.detach().double(), 8)
        torch.testing.assert_close(rotation.T @ rotation, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-10)
        R = a.psoft_R.vector_b.double()[:, None] * rotation * a.psoft_R.vector_a.double()[None, :]
        torch.testing.assert_close(a.psoft_R.matrix().double(), R, rtol=1e-5, atol=1e-6)
        expected = U @ torch.diag(S) @ (R - torch.eye(8, dtype=torch.float64)) @ Vh
        torch.testing.assert_close(a.delta_weight().double(), expected, rtol=1e-4, atol=1e-6)
        # outside the principal subspace nothing moves: (W + delta W) V_rest = W V_rest
        rest = torch.linalg.svd(W.double(), full_matrices=True)[2][8:].T
        torch.testing.assert_close(a.delta_weight().double() @ rest, torch.zeros(W.shape[0], rest.shape[1],
                                   dtype=torch.float64), rtol=0, atol=1e-5)
        RA = rotation @ Vh
        torch.testing.assert_close(RA.T @ RA, Vh.T @ Vh, rtol=0, atol=1e-8)
        assert sum(p.numel() for p in a.parameters()) == 8 * 7 // 2 + 2 * 8
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".psoft_R." in n for n in trainable)


@pytest.mark.parametrize("spec,count", [("psoft[r=6,init=pissa]", 15 + 12), ("psoft[r=6,orth=false,mag_a=false]", 36 + 6),
                                         ("psoft[r=6,use_cayley_neumann=true,num_cayley_neumann_terms=4]", 15 + 12)])
def test_options_change_what_trains_and_how(spec, count):
    model = move(peftlab.attach(make_llama(), spec), std=0.05)
    a = adapter(model)
    assert sum(p.numel() for p in a.parameters()) == count
    W = model.get_submodule(Q0).base_layer.weight.detach().float()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    if "pissa" in spec:  # sqrt(S / s) on both sides, s = 32 / 6
        root = torch.sqrt(S[:6] / (32 / 6))
        torch.testing.assert_close(a.psoft_A, root[:, None] * Vh[:6], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.psoft_B, U[:, :6] * root, rtol=1e-5, atol=1e-6)
    if "orth=false" in spec:
        assert a.psoft_R.vector_a is None
        torch.testing.assert_close(a.psoft_R.matrix(), a.psoft_R.vector_b[:, None] * a.psoft_R.weight)
    if "neumann" in spec:  # I + 2Q + 2Q^2 + Q^3, the series of (I + Q)(I - Q)^-1
        from peftlab.methods.oft import skew
        Q = skew(a.psoft_R.weight[None], 6)[0]
        series = torch.eye(6) + 2 * Q + 2 * Q @ Q + Q @ Q @ Q
        torch.testing.assert_close(a.psoft_R.matrix(), a.psoft_R.vector_b[:, None] * series * a.psoft_R.vector_a)


@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_layer_adds_delta_w_x(routed):
    model = move(peftlab.attach(make_llama(), "psoft[r=8]"))
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


def test_gradients_reach_r_and_both_vectors_and_not_the_base():
    model = move(peftlab.attach(make_llama(), "psoft[r=8]"), std=0.05)
    model.train()
    layer = model.get_submodule(Q0)
    layer(torch.randn(2, 5, 32)).pow(2).sum().backward()
    for name, p in layer.adapters["default"].named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
    assert layer.base_layer.weight.grad is None


def test_starts_exactly_as_the_base(ids):
    model = peftlab.attach(make_llama(), "psoft")
    assert torch.count_nonzero(adapter(model).psoft_R.weight) == 0
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=0)


def test_merge_equals_unmerged_and_unmerge_restores(ids):
    model = move(peftlab.attach(make_llama(), "psoft[r=8]"))
    layer = model.get_submodule(Q0)
    W = layer.base_layer.weight.detach().clone()
    unmerged = logits(model, ids)
    peftlab.merge(model)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", ["psoft[r=8,mag_a=false]", "psoft"], ids=["hf-file", "narrowed-native"])
def test_save_load_round_trip_is_exact(spec, ids, tmp_path):
    model = move(peftlab.attach(make_llama(), spec))
    expected = logits(model, ids)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peftlab.save(model, tmp_path)
    kind = json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"]
    assert kind == ("PSOFT" if "r=8" in spec else "PEFTLAB")
    if kind == "PEFTLAB":
        assert any("narrower than r=32" in str(w.message) for w in caught)
    loaded = peftlab.load(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)


def test_defaults_attach_to_tiny_widths():
    model = peftlab.attach(make_llama(), "psoft")
    assert len([m for m in model.modules() if isinstance(m, AdapterLayer)]) == 14
    assert adapter(model, K0).r == 16 and adapter(model, Q0).r == 32  # k_proj has 16 outputs


@pytest.mark.parametrize("setting,match", [("r=0", "rank"), ("alpha=0", "alpha"), ("dropout=1.5", "dropout"),
                                           ("init=lora", "init"), ("svd=fast", "svd"), ("svd_niter=0", "svd_niter"),
                                           ("num_cayley_neumann_terms=0", "terms"), ("cayley_neumann_eps=1.5", "eps"),
                                           ("orth=maybe", "orth"), ("colour=3", "unknown setting")])
def test_bad_settings_are_config_errors(setting, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), f"psoft[{setting}]")


def test_gpt2_conv1d_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="Conv1D.*nn.Linear layers only"):
        peftlab.attach(make_gpt2(), "psoft")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [
    ("llama-r16", make_llama, "psoft[r=16]"),
    ("llama-options", make_llama, "psoft[r=8,alpha=16,init=pissa,orth=false,mag_b=false,targets=[q_proj,v_proj,down_proj]]"),
    ("llama-neumann-lowrank", make_llama, "psoft[r=8,svd=lowrank,svd_niter=4,random_seed=3,use_cayley_neumann=true,"
                                          "cayley_neumann_eps=0.9,targets=[q_proj,o_proj]]"),
    ("bert-head", strong_bert, "psoft[r=8,targets=[query,value,dense],modules_to_save=[classifier]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_psoft_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = move(peftlab.attach(factory(), spec))
    expected = logits(model, ids)
    assert not torch.allclose(expected, logits(factory(), ids), atol=1e-3), "the adapter should matter"
    peftlab.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PSOFT" and config["init_weights"] is True
    torch.testing.assert_close(peft_logits(factory, tmp_path, ids), expected, rtol=0, atol=1e-5)


PEFTS = [
    ("llama-q-v", make_llama, dict(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    ("llama-all-options", make_llama, dict(r=4, psoft_alpha=8, ab_svd_init="pissa_init", psoft_mag_a=False,
                                           use_cayley_neumann=True, num_cayley_neumann_terms=3,
                                           target_modules="all-linear", task_type="CAUSAL_LM")),
    ("llama-lowrank-free", make_llama, dict(r=6, psoft_svd="lowrank", random_seed=7, psoft_orth=False,
                                            target_modules=["k_proj", "up_proj"], task_type="CAUSAL_LM")),
    ("bert-seq-cls", strong_bert, dict(r=8, target_modules=["query", "value", "dense"], task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_psoft_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = move(peft.get_peft_model(factory(), peft.PsoftConfig(**kwargs)).eval(), seed=3)
        expected = logits(theirs, ids)
        theirs.save_pretrained(str(tmp_path))
    assert not torch.allclose(expected, logits(factory(), ids), atol=1e-3), "the adapter should matter"
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected)


def test_files_that_contradict_their_config_are_format_errors(tmp_path):
    peftlab.save(peftlab.attach(make_llama(), "psoft[r=8,targets=[q_proj]]"), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for changed, match in ((dict(r=6), "do not belong together"), (dict(psoft_mag_a=False), "do not belong together"),
                           (dict(psoft_orth=False), "do not belong together"), (dict(ab_svd_init="eva"), "ab_svd_init"),
                           (dict(fan_in_fan_out=True), "fan_in_fan_out")):
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **changed}))
        fresh = make_llama()
        with pytest.raises(peftlab.AdapterFormatError, match=match):
            peftlab.load(fresh, tmp_path)
        assert not [m for m in fresh.modules() if isinstance(m, AdapterLayer)]


def test_info_reads_a_psoft_file(tmp_path):
    from peftlab.cli import adapter_info

    model = peftlab.attach(make_llama(), "psoft[r=8,targets=[q_proj,down_proj]]")
    peftlab.save(model, tmp_path)
    info = adapter_info(tmp_path)
    assert info["method"] == "psoft" and info["r"] == 8 and info["adapted_modules"] == 4
    assert info["adapter_parameters"] == peftlab.summary(model)["adapters"]["default"] == 4 * (28 + 16)
