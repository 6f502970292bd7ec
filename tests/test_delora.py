"""DeLoRA: a normalized low-rank update scaled by a trained boundary lambda and the weight's column
norms (||delta W|| <= lambda ||W||), merging, and HF PEFT's DELORA format checked against the real
``peft`` package both ways."""
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
from peftlab.core.layer import AdapterLayer
from peftlab.methods import delora

Q0, K0, DOWN0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"


def randomize(model, seed: int = 0, std: float = 1.0):
    """B (peftlab's or peft's) off zero, so the adapter matters; A and lambda kept."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "delora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def adapter(model, name=Q0):
    return model.get_submodule(name).adapters["default"]


def by_hand(a, W) -> torch.Tensor:
    """(lambda / r) sum_i b_i a_i^T / (||b_i|| ||a_i||), then column j times ||W[:, j]|| (float64)."""
    A, B, lam = a.delora_A.detach().double(), a.delora_B.detach().double(), float(a.delora_lambda)
    update = sum(torch.outer(B[:, i], A[i]) / (B[:, i].norm() * A[i].norm()) for i in range(a.r))
    return lam / a.r * update * W.double().norm(dim=0)


# ---- the method --------------------------------------------------------------------------------

def test_update_is_the_normalized_low_rank_product_within_the_boundary():
    """The defining property: delta W as the paper / PEFT write it, and ||delta W||_F <= lambda ||W||_F
    (also <= lambda max_j ||W[:, j]||) whatever A and B are; only lambda and the factors train."""
    model = randomize(peftlab.attach(make_llama(), "delora[r=4,lambda_init=3]"), std=5.0)
    for name in (Q0, K0, DOWN0):
        layer = model.get_submodule(name)
        a, W = layer.adapters["default"], layer.base_layer.weight.detach()
        torch.testing.assert_close(a.delta_weight().double(), by_hand(a, W), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a.delora_w_norm, W.norm(dim=0), rtol=0, atol=0)
        norm = a.delta_weight().double().norm()
        assert norm <= 3 * W.double().norm() and norm <= 3 * W.double().norm(dim=0).max() + 1e-9
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("delora_A", "delora_B", "delora_lambda")) for n in trainable)


def test_rank_one_update_has_exactly_lambda_times_the_column_weighted_norm():
    """r = 1: delta W = lambda b^ (a^ * w)^T, so ||delta W||_F = lambda ||a^ * w||; with unit columns, exactly lambda."""
    model = randomize(peftlab.attach(make_llama(), "delora[r=1,lambda_init=2.5]"))
    layer = model.get_submodule(Q0)
    a = layer.adapters["default"]
    A = a.delora_A.detach().double()[0]
    expected = 2.5 * (A / A.norm() * a.delora_w_norm.double()).norm()
    torch.testing.assert_close(a.delta_weight().double().norm(), expected)
    with torch.no_grad():
        a.delora_w_norm.fill_(1.0)
    torch.testing.assert_close(a.delta_weight().double().norm(), torch.tensor(2.5, dtype=torch.float64))


def test_angle_and_strength_are_decoupled():
    """Rescaling a factor's rows / columns leaves delta W unchanged (direction only); lambda scales it linearly."""
    a = adapter(randomize(peftlab.attach(make_llama(), "delora[r=3]")))
    before = a.delta_weight().detach().clone()
    with torch.no_grad():
        a.delora_A.mul_(torch.tensor([[7.0], [0.5], [3.0]]))
        a.delora_B.mul_(torch.tensor([[0.2, 9.0, 1.5]]))
    torch.testing.assert_close(a.delta_weight(), before, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        a.delora_lambda.mul_(2)
    torch.testing.assert_close(a.delta_weight(), 2 * before, rtol=1e-5, atol=1e-7)


def test_the_bound_holds_after_reckless_training():
    """A hundred steps at learning rate 10 on A and B: the update still stays within lambda ||W||."""
    model = peftlab.attach(make_llama(), "delora[r=2,lambda_init=0.5]")
    model.train()
    a = adapter(model)
    opt = torch.optim.SGD([a.delora_A, a.delora_B], lr=10.0)
    ids = torch.randint(3, 96, (2, 6))
    for _ in range(100):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    W = model.get_submodule(Q0).base_layer.weight.double()
    assert 0 < a.delta_weight().double().norm() <= 0.5 * W.norm()


@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_layer_adds_delta_w_x(routed):
    model = randomize(peftlab.attach(make_llama(), "delora[r=4]"))
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


def test_gradients_match_the_dense_update():
    model = randomize(peftlab.attach(make_llama(), "delora[r=3,lambda_init=4]"))
    model.train()
    layer = model.get_submodule(Q0)
    a = layer.adapters["default"]
    x, weights = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    (layer(x) * weights).sum().backward()
    A, B, lam = (t.detach().double().requires_grad_() for t in (a.delora_A, a.delora_B, a.delora_lambda))
    dense = delora.delta_weight(A, B, lam, 3, a.delora_w_norm.double())
    ((x.double() @ dense.T) * weights.double()).sum().backward()
    for ours, theirs in ((a.delora_A, A), (a.delora_B, B), (a.delora_lambda, lam)):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-4, atol=1e-6)


def test_starts_as_the_base_with_a_zero_b(ids):
    model = peftlab.attach(make_llama(), "delora")
    a = adapter(model)
    assert torch.count_nonzero(a.delora_B) == 0 and torch.count_nonzero(a.delora_A) == a.delora_A.numel()
    assert float(a.delora_lambda) == 1.0 and a.r == 8
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=0)
    random = peftlab.attach(make_llama(), "delora[init=random]")  # PEFT's init_weights=False
    assert not torch.allclose(logits(random, ids), logits(make_llama(), ids), atol=1e-3)


def test_merge_adds_the_update_and_unmerge_restores(ids):
    model = randomize(peftlab.attach(make_llama(), "delora[r=4,lambda_init=2]"))
    layer = model.get_submodule(Q0)
    W = layer.base_layer.weight.detach().clone()
    w_norm = layer.adapters["default"].delora_w_norm.clone()
    unmerged = logits(model, ids)
    peftlab.merge(model)
    torch.testing.assert_close(layer.base_layer.weight, W + layer.adapters["default"].delta_weight(), rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.adapters["default"].delora_w_norm, w_norm, rtol=0, atol=0)  # taken once, kept
    peftlab.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)


def test_save_load_round_trip_is_exact(ids, tmp_path):
    model = randomize(peftlab.attach(make_llama(), "delora[r=3,lambda_init=6]"))
    with torch.no_grad():
        adapter(model).delora_lambda.fill_(4.25)  # trained lambda travels in the tensors
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    loaded = peftlab.load(make_llama(), tmp_path)
    assert float(adapter(loaded).delora_lambda) == 4.25
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)


def test_defaults_attach_and_patterns_are_per_module():
    model = peftlab.attach(make_llama(), "delora")
    assert len([m for m in model.modules() if isinstance(m, AdapterLayer)]) == 14
    config = delora.DeloraConfig(r=4, rank_pattern={"down_proj": 2}, lambda_pattern={"k_proj": 7.5})
    model = peftlab.attach(make_llama(), config)
    assert (adapter(model).r, adapter(model, DOWN0).r) == (4, 2)
    assert (float(adapter(model).delora_lambda), float(adapter(model, K0).delora_lambda)) == (1.0, 7.5)


@pytest.mark.parametrize("setting,match", [("r=0", "rank"), ("lambda_init=nan", "lambda_init"), ("dropout=1.5", "dropout"),
                                           ("init=zeros", "init"), ("rank_pattern=3", "rank_pattern"),
                                           ("lambda_pattern=3", "lambda_pattern"), ("colour=3", "unknown setting")])
def test_bad_settings_are_config_errors(setting, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), f"delora[{setting}]")


def test_gpt2_conv1d_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="Conv1D.*nn.Linear layers only"):
        peftlab.attach(make_gpt2(), "delora")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [
    ("llama-defaults", make_llama, "delora"),
    ("llama-patterns", make_llama, delora.DeloraConfig(r=4, lambda_init=3, rank_pattern={"down_proj": 2},
                                                       lambda_pattern={"k_proj": 5.0}, targets=["q_proj", "k_proj", "down_proj"])),
    ("bert-head", make_bert, "delora[r=2,lambda_init=10,modules_to_save=[classifier]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_delora_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = randomize(peftlab.attach(factory(), spec), std=0.3)
    with torch.no_grad():
        for _, a in peftlab.core.adapters.all_adapters(model):
            a.delora_lambda.mul_(0.7)  # a trained lambda, not the config's
    config = assert_peftlab_file_loads_in_peft(model, factory, ids, tmp_path, "DELORA")
    assert config["init_weights"] is True
    if label == "llama-patterns":
        assert config["r"] == 4 and config["rank_pattern"] == {DOWN0: 2, "model.layers.1.mlp.down_proj": 2}


PEFTS = [
    ("llama-q-v", make_llama, dict(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    ("llama-patterns", make_llama, dict(r=6, delora_lambda=8, target_modules="all-linear", rank_pattern={"k_proj": 2},
                                        lambda_pattern={r"layers\.1\.mlp\.down_proj": 3}, task_type="CAUSAL_LM")),
    ("bert-seq-cls", make_bert, dict(r=2, delora_lambda=40, target_modules=["query", "value", "dense"], task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_delora_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    expected = peft_adapter_file(factory, peft.DeloraConfig, kwargs, tmp_path, ids, randomize=randomize, std=0.3)
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected)


def test_bad_files_are_format_errors(tmp_path):
    peftlab.save(peftlab.attach(make_llama(), "delora[r=4]"), tmp_path)
    config = read_adapter_config(tmp_path)
    for bad, match in (({"r": 2}, "do not belong together"), ({"bias": "all"}, "bias"), ({"r": 0}, "invalid values")):
        assert_config_edit_is_a_format_error(tmp_path, config, bad, match)


def test_peftlab_info_reads_the_file(tmp_path):
    from peftlab.cli import adapter_info

    model = peftlab.attach(make_llama(), "delora[r=2,targets=[k_proj,v_proj,down_proj]]")
    peftlab.save(model, tmp_path)
    info = adapter_info(tmp_path)
    assert info["peft_type"] == "DELORA" and info["method"] == "delora" and info["adapted_modules"] == 6
    assert info["parameters"] == peftlab.summary(model)["adapters"]["default"]  # the saved column norms are frozen
