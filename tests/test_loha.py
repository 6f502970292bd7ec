"""LoHa: the Hadamard product of two rank-r products (an update of rank up to r^2), its two forward
routes, merging, and HF PEFT's LOHA format checked against the real ``peft`` package both ways."""
from __future__ import annotations


import peft
import pytest
import torch
from conftest import (
    assert_config_edit_is_a_format_error, assert_peft_adapter_loads_and_goes_back,
    assert_peftlab_file_loads_in_peft, logits, make_bert, make_gpt2, make_llama, peft_adapter_file,
    peft_logits, read_adapter_config,
)

import peftlab
from peftlab.core.layer import AdapterLayer
from peftlab.methods import loha

Q0, DOWN0 = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"


def randomize(model, seed: int = 0, std: float = 0.3):
    """Every LoHa factor (peftlab's or peft's) to random values, so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "hada_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def adapter(model, name=Q0):
    return model.get_submodule(name).adapters["default"]


def expected_update(a) -> torch.Tensor:
    return (a.hada_w1_a @ a.hada_w1_b) * (a.hada_w2_a @ a.hada_w2_b) * a.scaling


# ---- the method --------------------------------------------------------------------------------

@pytest.mark.parametrize("r,factored", [(2, True), (8, False)], ids=["khatri-rao", "dense"])
@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_layer_adds_the_scaled_hadamard_product(r, factored, routed):
    """down_proj is 32 x 64: r=2 runs as a rank-4 product, r=8 (2 * 64 * 96 > 32 * 64) forms the update."""
    model = randomize(peftlab.attach(make_llama(), f"loha[r={r},alpha=3]"))
    layer = model.get_submodule(DOWN0)
    a = layer.adapters["default"]
    assert a.factored is factored and a.scaling == 3 / r
    assert a.hada_w1_a.shape == (32, r) and a.hada_w1_b.shape == (r, 64) and a.hada_w2_a.shape == (32, r)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        expected = layer.base_layer(x) + x @ expected_update(a).T
        if routed:
            with peftlab.routing(model, ["default", None, "default"]):
                out = layer(x)
            expected[1] = layer.base_layer(x[1])
        else:
            out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.delta_weight(), expected_update(a))


@pytest.mark.parametrize("r", [2, 8], ids=["khatri-rao", "dense"])
def test_gradients_match_the_plain_formula(r):
    """Both forward routes (LoRA's fused kernel over the Khatri-Rao factors; one matmul with W + delta W)
    give the factors and the input the gradients of ``x (W + s (W1a W1b) * (W2a W2b))^T``."""
    model = randomize(peftlab.attach(make_llama(), f"loha[r={r},alpha=3]"))
    model.train()
    layer = model.get_submodule(DOWN0)
    a = layer.adapters["default"]
    x = torch.randn(2, 5, 64, requires_grad=True)
    weights = torch.randn(2, 5, 32)
    (layer(x) * weights).sum().backward()
    got = [p.grad.clone() for p in (x, *a.parameters())]
    for p in (x, *a.parameters()):
        p.grad = None
    (torch.nn.functional.linear(x, layer.base_layer.weight + expected_update(a), layer.base_layer.bias) * weights).sum().backward()
    for mine, plain in zip(got, [p.grad for p in (x, *a.parameters())]):
        torch.testing.assert_close(mine, plain, rtol=1e-4, atol=1e-5)


def test_khatri_rao_factors_give_the_hadamard_product():
    g = torch.Generator().manual_seed(0)
    w1a, w2a, w1b, w2b = (torch.randn(*s, generator=g) for s in ((7, 3), (7, 3), (3, 5), (3, 5)))
    A, B = loha.khatri_rao_factors(w1a, w1b, w2a, w2b)
    assert A.shape == (9, 5) and B.shape == (7, 9)
    torch.testing.assert_close(B @ A, (w1a @ w1b) * (w2a @ w2b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("r", [2, 4])
def test_rank_r_factors_give_an_update_of_rank_r_squared(r):
    """The defining property: rank-r factors, 2 r (out + in) parameters (the budget of a rank-2r LoRA), reach rank r^2."""
    model = randomize(peftlab.attach(make_llama(), f"loha[r={r},targets=q_proj]"))
    a = adapter(model)
    assert sum(p.numel() for p in a.parameters()) == 2 * r * (32 + 32)
    delta = a.delta_weight().detach()
    assert torch.linalg.matrix_rank(delta) == r * r
    # no rank-r matrix comes near it, and from r = 3 on no rank-2r one either (a LoRA of the same size)
    S = torch.linalg.svdvals(delta)
    assert S[r:].norm() > 0.1 * S.norm()
    if r > 2:
        assert S[2 * r:].norm() > 0.05 * S.norm()


def test_r2_represents_a_given_rank_4_target_exactly():
    """A rank-4 target (x1 y1^T + x2 y2^T) * (u1 v1^T + u2 v2^T) is a LoHa of r=2, and no rank-2 LoRA."""
    g = torch.Generator().manual_seed(1)
    X, Y, U, V = (torch.randn(32, 2, generator=g) for _ in range(4))
    target = (X @ Y.T) * (U @ V.T)
    assert torch.linalg.matrix_rank(target) == 4
    model = peftlab.attach(make_llama(), "loha[r=2,alpha=2,targets=q_proj]")  # scale 1
    a = adapter(model)
    with torch.no_grad():
        a.hada_w1_a.copy_(X), a.hada_w1_b.copy_(Y.T), a.hada_w2_a.copy_(U), a.hada_w2_b.copy_(V.T)
    torch.testing.assert_close(a.delta_weight(), target, rtol=1e-5, atol=1e-5)
    assert torch.linalg.svdvals(target)[2:].norm() > 1e-2


def test_starts_as_the_base_with_only_w2_b_zero(ids):
    model = peftlab.attach(make_llama(), "loha")
    a = adapter(model)
    assert torch.count_nonzero(a.hada_w2_b) == 0
    assert all(torch.count_nonzero(p) == p.numel() for p in (a.hada_w1_a, a.hada_w1_b, a.hada_w2_a))
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=0)


def test_merge_adds_the_update_and_equals_unmerged(ids):
    model = randomize(peftlab.attach(make_llama(), "loha[r=4,alpha=8]"))
    layer = model.get_submodule(Q0)
    W = layer.base_layer.weight.detach().clone()
    unmerged = logits(model, ids)
    peftlab.merge(model)
    torch.testing.assert_close(layer.base_layer.weight, W + expected_update(layer.adapters["default"]), rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)


def test_save_load_round_trip_is_exact(ids, tmp_path):
    model = randomize(peftlab.attach(make_llama(), "loha[r=4,alpha=16,targets=all-linear]"))
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    loaded = peftlab.load(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)


def test_spec_string_sets_rank_and_scale():
    model = peftlab.attach(make_llama(), "loha[r=8,alpha=16]")
    a = adapter(model)
    assert a.r == 8 and a.scaling == 2.0 and a.hada_w1_a.shape == (32, 8)
    layers = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    assert len(layers) == 14  # all-linear: 7 projections x 2 blocks


def test_rank_and_alpha_patterns_are_per_module():
    config = loha.LohaConfig(r=4, alpha=4, rank_pattern={"down_proj": 2}, alpha_pattern={r"layers\.1\..*q_proj": 1})
    model = peftlab.attach(make_llama(), config)
    assert adapter(model, DOWN0).r == 2 and adapter(model).r == 4 and adapter(model).scaling == 1
    assert adapter(model, "model.layers.1.self_attn.q_proj").scaling == 1 / 4


def test_dropouts_act_in_training_only():
    model = randomize(peftlab.attach(make_llama(), "loha[r=2,rank_dropout=0.5,module_dropout=0.5,targets=q_proj]"))
    layer, base = model.get_submodule(Q0), make_llama().get_submodule(Q0)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        full = layer(x) - base(x)
        layer.train()
        torch.manual_seed(0)
        seen = [layer(x) - base(x) for _ in range(20)]
    assert any(torch.count_nonzero(d) == 0 for d in seen), "module dropout skips the adapter for some calls"
    partial = [d for d in seen if 0 < torch.count_nonzero(d.abs().sum((0, 1)) > 1e-7) < 32]
    assert partial, "rank dropout zeroes some output rows of the update"
    kept = partial[0].abs().sum((0, 1)) > 1e-7
    ratio = partial[0][..., kept] / full[..., kept]
    torch.testing.assert_close(ratio, torch.full_like(ratio, 32 / int(kept.sum())), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("setting,match", [("r=0", "rank"), ("alpha=-1", "alpha"), ("rank_dropout=1.5", "rank_dropout"),
                                           ("module_dropout=-0.1", "module_dropout"), ("rank_pattern=3", "rank_pattern"),
                                           ("colour=3", "unknown setting")])
def test_bad_settings_are_config_errors(setting, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), f"loha[{setting}]")


def test_gpt2_conv1d_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="Conv1D.*adapts nn.Linear, nn.Conv1d and nn.Conv2d"):
        peftlab.attach(make_gpt2(), "loha")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [
    ("llama-defaults", make_llama, "loha"),
    ("llama-r2-q-v", make_llama, "loha[r=2,alpha=5,targets=[q_proj,v_proj]]"),
    ("bert-head", make_bert, "loha[r=4,alpha=8,modules_to_save=[classifier]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_loha_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = randomize(peftlab.attach(factory(), spec))
    config = assert_peftlab_file_loads_in_peft(model, factory, ids, tmp_path, "LOHA")
    assert "alpha" in config and "lora_alpha" not in config


def test_per_module_ranks_and_alphas_are_written_as_patterns(ids, tmp_path):
    config = loha.LohaConfig(r=4, alpha=4, rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3})
    model = randomize(peftlab.attach(make_llama(), config))
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    written = read_adapter_config(tmp_path)
    assert written["r"] == 4 and set(written["rank_pattern"].values()) == {2} and set(written["alpha_pattern"].values()) == {3}
    torch.testing.assert_close(peft_logits(make_llama, tmp_path, ids), expected, rtol=0, atol=1e-5)


PEFTS = [
    ("llama-defaults", make_llama, dict(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    ("llama-patterns", make_llama, dict(r=4, alpha=6, target_modules="all-linear", rank_pattern={"down_proj": 2},
                                        alpha_pattern={r"layers\.1\.self_attn\.k_proj": 1}, task_type="CAUSAL_LM")),
    ("bert-seq-cls", make_bert, dict(r=2, alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_loha_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    expected = peft_adapter_file(factory, peft.LoHaConfig, kwargs, tmp_path, ids, randomize=randomize, std=0.5)
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected)


def test_tensors_that_contradict_the_config_are_a_format_error(tmp_path):
    peftlab.save(peftlab.attach(make_llama(), "loha[r=4]"), tmp_path)
    config = read_adapter_config(tmp_path)
    assert_config_edit_is_a_format_error(tmp_path, config, {"r": 2}, "do not belong together")
