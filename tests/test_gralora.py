"""GraLoRA: a k x k grid of rank-(r/k) pairs whose update's rank exceeds r at LoRA's parameter count,
the hybrid LoRA part, merging, and HF PEFT's GRALORA format checked against the real ``peft`` package
both ways."""
from __future__ import annotations

import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_config_edit_is_a_format_error, assert_peft_adapter_loads_and_goes_back,
    assert_peftlab_file_loads_in_peft, logits, make_bert, make_gpt2, make_llama, peft_adapter_file,
    read_adapter_config,
)

import peftlab
from peftlab.core.layer import AdapterLayer
from peftlab.methods import gralora

Q0, K0, DOWN0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"


def randomize(model, seed: int = 0, std: float = 0.3):
    """Every GraLoRA parameter (peftlab's or peft's) to random values, so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gralora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def adapter(model, name=Q0):
    return model.get_submodule(name).adapters["default"]


def blockwise_by_hand(a) -> torch.Tensor:
    """The paper's update written block by block (float64): block (j, n) is B_j^(n) A_n^(j), where
    A_n^(j) is columns j s..(j+1) s of input block n's A and B_j^(n) rows n s..(n+1) s of output
    block j's B; plus the hybrid pair; times alpha / (r + hybrid_r)."""
    k, s = a.k, a.r // a.k
    A, B = a.gralora_A.detach().double(), a.gralora_B.detach().double()
    ob, ib = a.out_features // k, a.in_features // k
    delta = torch.zeros(a.out_features, a.in_features, dtype=torch.float64)
    for j in range(k):
        for n in range(k):
            A_nj = A[n][:, j * s:(j + 1) * s].T        # s x in/k
            B_jn = B[j][n * s:(n + 1) * s, :].T        # out/k x s
            delta[j * ob:(j + 1) * ob, n * ib:(n + 1) * ib] = B_jn @ A_nj
    if a.hybrid_r:
        delta += a.gralora_B_general.weight.detach().double() @ a.gralora_A_general.weight.detach().double()
    return delta * a.alpha / (a.r + a.hybrid_r)


# ---- the method --------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["gralora[r=4,gralora_k=2]", "gralora[r=8,gralora_k=4,alpha=3]",
                                  "gralora[r=4,gralora_k=2,hybrid_r=2]"])
def test_update_is_blockwise_low_rank(spec):
    """The defining property, against the blocks written out by hand."""
    model = randomize(peftlab.attach(make_llama(), spec))
    for name in (Q0, K0, DOWN0):
        a = adapter(model, name)
        torch.testing.assert_close(a.delta_weight().double(), blockwise_by_hand(a), rtol=1e-5, atol=1e-6)


def test_rank_exceeds_r_at_loras_parameter_count():
    """k r > r: a rank-4 GraLoRA with k=2 reaches rank 8 (LoRA's rank-4 update stays at 4), with
    LoRA's r (in + out) trained numbers; each block alone has rank r / k."""
    model = randomize(peftlab.attach(make_llama(), "gralora[r=4,gralora_k=2]"))
    a = adapter(model)
    delta = a.delta_weight()
    assert torch.linalg.matrix_rank(delta, rtol=1e-5) == 8  # float32 rounding: singular values below 1e-5 of the top
    assert torch.linalg.matrix_rank(delta[:16, :16], rtol=1e-5) == 2
    assert sum(p.numel() for p in a.parameters()) == 4 * (32 + 32)
    lora = peftlab.attach(make_llama(), "lora[r=4]")
    assert sum(p.numel() for p in adapter(lora).parameters()) == 4 * (32 + 32)
    four = randomize(peftlab.attach(make_llama(), "gralora[r=8,gralora_k=4]"), seed=1)
    assert torch.linalg.matrix_rank(adapter(four).delta_weight(), rtol=1e-5) == 32  # k r = 32: full rank here


@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_layer_adds_delta_w_x(routed):
    model = randomize(peftlab.attach(make_llama(), "gralora[r=8,gralora_k=2,hybrid_r=2]"))
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


def test_gradients_equal_those_of_the_dense_update():
    """The factored forward gives every pair the gradient of ``x @ delta_weight().T``."""
    model = randomize(peftlab.attach(make_llama(), "gralora[r=4,gralora_k=2,hybrid_r=2]"))
    model.train()
    a = adapter(model)
    x, weights = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    params = [a.gralora_A, a.gralora_B, a.gralora_A_general.weight, a.gralora_B_general.weight]
    factored = torch.autograd.grad((a(x, None) * weights).sum(), params)
    dense = torch.autograd.grad((F.linear(x, a.delta_weight()) * weights).sum(), params)
    for got, want in zip(factored, dense):
        assert torch.count_nonzero(want) > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".gralora_" in n for n in trainable)


def test_starts_as_the_base_with_zero_b(ids):
    model = peftlab.attach(make_llama(), "gralora[hybrid_r=4]")
    a = adapter(model)
    assert torch.count_nonzero(a.gralora_B) == 0 and torch.count_nonzero(a.gralora_B_general.weight) == 0
    assert torch.count_nonzero(a.gralora_A) == a.gralora_A.numel()
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=0)


def test_merge_adds_the_update_and_equals_unmerged(ids):
    model = randomize(peftlab.attach(make_llama(), "gralora[r=8,hybrid_r=2]"), std=0.2)
    layer = model.get_submodule(Q0)
    W = layer.base_layer.weight.detach().clone()
    unmerged = logits(model, ids)
    peftlab.merge(model)
    torch.testing.assert_close(layer.base_layer.weight, W + layer.adapters["default"].delta_weight(), rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)


def test_save_load_round_trip_is_exact(ids, tmp_path):
    model = randomize(peftlab.attach(make_llama(), "gralora[r=8,gralora_k=4,hybrid_r=3,alpha=5]"))
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    loaded = peftlab.load(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)


def test_defaults_attach_to_tiny_widths():
    model = peftlab.attach(make_llama(), "gralora")
    assert len([m for m in model.modules() if isinstance(m, AdapterLayer)]) == 14
    a = adapter(model, K0)  # 16 x 32
    assert (a.r, a.k, a.hybrid_r, a.scaling) == (32, 2, 0, 2.0)
    assert a.gralora_A.shape == (2, 16, 32) and a.gralora_B.shape == (2, 32, 8)


@pytest.mark.parametrize("setting,match", [("r=0", "rank r"), ("gralora_k=0", "gralora_k"), ("r=5", "divisible"),
                                           ("hybrid_r=-1", "hybrid_r"), ("alpha=0", "alpha"), ("dropout=1.5", "dropout"),
                                           ("colour=3", "unknown setting")])
def test_bad_settings_are_config_errors(setting, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), f"gralora[{setting}]")


def test_widths_the_grid_does_not_divide_are_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="gralora_k=3 does not divide"):
        peftlab.attach(make_llama(), "gralora[r=6,gralora_k=3]")


def test_gpt2_conv1d_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="Conv1D.*nn.Linear layers only"):
        peftlab.attach(make_gpt2(), "gralora")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [
    ("llama-defaults", make_llama, "gralora"),
    ("llama-k4-hybrid", make_llama, "gralora[r=8,gralora_k=4,hybrid_r=2,alpha=6,targets=[q_proj,v_proj,down_proj]]"),
    ("bert-head", make_bert, "gralora[r=8,hybrid_r=1,modules_to_save=[classifier]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_gralora_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = randomize(peftlab.attach(factory(), spec), std=0.1)
    assert_peftlab_file_loads_in_peft(model, factory, ids, tmp_path, "GRALORA")


PEFTS = [
    ("llama-q-v", make_llama, dict(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    ("llama-k4-hybrid", make_llama, dict(r=16, gralora_k=4, hybrid_r=4, alpha=12, target_modules="all-linear",
                                         task_type="CAUSAL_LM")),
    ("bert-seq-cls", make_bert, dict(r=4, hybrid_r=2, target_modules=["query", "value", "dense"], task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_gralora_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    expected = peft_adapter_file(factory, peft.GraloraConfig, kwargs, tmp_path, ids, randomize=randomize, std=0.1)
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected)


def test_peft_delta_weight_is_ours():
    """PEFT's merged update of the same tensors equals peftlab's delta_weight (k = 4, hybrid)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = randomize(peft.get_peft_model(make_llama(), peft.GraloraConfig(
            r=8, gralora_k=4, hybrid_r=2, alpha=3, target_modules=["down_proj"])), seed=5)
    layer = theirs.base_model.model.get_submodule(DOWN0)
    ours = randomize(peftlab.attach(make_llama(), "gralora[r=8,gralora_k=4,hybrid_r=2,alpha=3,targets=[down_proj]]"), seed=5)
    torch.testing.assert_close(adapter(ours, DOWN0).delta_weight(), layer.get_delta_weight("default"), rtol=1e-5, atol=1e-6)


def test_peftlab_info_reads_the_file(tmp_path):
    from peftlab.cli import adapter_info

    model = peftlab.attach(make_llama(), "gralora[r=4,hybrid_r=2,alpha=12,targets=[k_proj,v_proj,down_proj]]")
    peftlab.save(model, tmp_path)
    info = adapter_info(tmp_path)
    assert info["peft_type"] == "GRALORA" and info["method"] == "gralora" and info["alpha"] == 12
    assert info["scaling"] == 2.0 and info["adapted_modules"] == 6
    assert info["parameters"] == peftlab.summary(model)["adapters"]["default"]


def test_tensors_that_contradict_the_config_are_a_format_error(tmp_path):
    peftlab.save(peftlab.attach(make_llama(), "gralora[r=8]"), tmp_path)
    config = read_adapter_config(tmp_path)
    for wrong in ({"r": 4}, {"hybrid_r": 2}):
        assert_config_edit_is_a_format_error(tmp_path, config, wrong, "do not belong together")
    assert_config_edit_is_a_format_error(tmp_path, config, {"bias": "all"}, "bias")
    assert_config_edit_is_a_format_error(tmp_path, config, {"gralora_k": 3}, "divisible")
