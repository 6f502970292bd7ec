"""VB-LoRA: every sub-vector of A and B a top-k softmax mixture of one vector bank shared by all
layers, merging, the vector length chosen from the widths, and HF PEFT's VBLORA format checked
against the real ``peft`` package both ways (full logits and ``save_only_topk_weights``)."""
from __future__ import annotations


import peft
import pytest
import torch
from conftest import (
    assert_config_edit_is_a_format_error, assert_peft_adapter_loads_and_goes_back,
    assert_peftlab_file_loads_in_peft, logits, make_bert, make_gpt2, make_llama, peft_adapter_file,
    read_adapter_config,
)
from safetensors.torch import load_file, save_file

import peftlab
from peftlab.core import adapters as core
from peftlab.core.layer import AdapterLayer
from peftlab.methods import vblora

Q0, K0, DOWN0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"


def randomize(model, seed: int = 0):
    """Logits (std 1) and bank (std 0.3) to random values, peftlab's or peft's, so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vblora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "vector_bank" in name else 1.0))
    return model


def adapter(model, name=Q0):
    return model.get_submodule(name).adapters["default"]


def by_hand(a) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B built one sub-vector at a time, straight from the paper's definition."""
    bank, k, b = a.bank().detach(), a.topk, a.vector_length

    def sub_vector(z):
        z = z.detach()
        top = sorted(range(len(z)), key=lambda i: -float(z[i]))[:k]
        w = torch.exp(z[top] - z[top].max())
        w = w / w.sum()
        return sum(w[j] * bank[i] for j, i in enumerate(top))

    A = torch.zeros(a.r, a.in_features)
    for row in range(a.r):
        for t in range(a.in_features // b):
            A[row, t * b:(t + 1) * b] = sub_vector(a.vblora_logits_A[row, t])
    B = torch.zeros(a.out_features, a.r)
    for t in range(a.out_features // b):
        for col in range(a.r):
            B[t * b:(t + 1) * b, col] = sub_vector(a.vblora_logits_B[t, col])
    return A, B


def expected_update(a) -> torch.Tensor:
    A, B = by_hand(a)
    return B @ A


# ---- the method --------------------------------------------------------------------------------

def test_sub_vectors_are_topk_mixtures_of_one_shared_bank():
    """The defining property: every length-b piece of A's rows and B's columns is the softmax of its
    top-k logits weighting the chosen bank vectors; the bank is one trained tensor for the whole
    model; what trains is the bank plus each layer's logits."""
    model = randomize(peftlab.attach(make_llama(), "vblora[r=3,num_vectors=12,topk=3]"))
    with torch.no_grad():
        for name in (Q0, K0, DOWN0):
            a = adapter(model, name)
            A, B, _ = a.factors()
            hand_A, hand_B = by_hand(a)
            torch.testing.assert_close(A, hand_A, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(B, hand_B, rtol=1e-5, atol=1e-6)
    adapters = [a for _, a in core.all_adapters(model)]
    assert len(adapters) == 14
    bank = adapters[0].bank()
    assert bank.shape == (12, 16) and all(a.bank() is bank for a in adapters)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert [n for n in trainable if "vector_bank" in n] == [next(n for n in trainable if "vector_bank" in n)], "stored once"
    assert all(n.endswith(("vblora_logits_A", "vblora_logits_B", "vblora_vector_bank")) for n in trainable)
    logit_count = sum(3 * (a.in_features + a.out_features) // 16 * 12 for a in adapters)
    assert sum(p.numel() for p in trainable.values()) == 12 * 16 + logit_count
    model.train()
    model(input_ids=torch.randint(3, 96, (2, 5)), labels=torch.randint(3, 96, (2, 5))).loss.backward()
    assert bank.grad is not None and torch.count_nonzero(bank.grad)
    assert all(a.vblora_logits_A.grad is not None and a.vblora_logits_B.grad is not None for a in adapters)


def test_only_the_topk_vectors_count():
    """Changing a logit outside a sub-vector's top-k (keeping it out) changes nothing."""
    a = adapter(randomize(peftlab.attach(make_llama(), "vblora[num_vectors=8,topk=2,targets=q_proj]")))
    with torch.no_grad():
        before = a.delta_weight().clone()
        z = a.vblora_logits_A[0, 0]
        low = z.argsort()[:4]
        z[low] = z[low] - 5.0
        torch.testing.assert_close(a.delta_weight(), before, rtol=0, atol=0)


@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_layer_adds_the_assembled_low_rank_update(routed):
    model = randomize(peftlab.attach(make_llama(), "vblora[r=4,num_vectors=10]"))
    layer = model.get_submodule(K0)  # 16 x 32
    a = layer.adapters["default"]
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        expected = layer.base_layer(x) + x @ expected_update(a).T
        if routed:
            with peftlab.routing(model, ["default", None, "default"]):
                out = layer(x)
            expected[1] = layer.base_layer(x[1])
        else:
            out = layer(x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a(x, None), x @ expected_update(a).T, rtol=1e-5, atol=1e-5)  # the unfused route


def test_fused_gradients_match_the_plain_formula():
    model = randomize(peftlab.attach(make_llama(), "vblora[r=4,num_vectors=10]"))
    model.train()
    layer = model.get_submodule(DOWN0)
    a = layer.adapters["default"]
    params = (a.vblora_logits_A, a.vblora_logits_B, a.bank())
    x = torch.randn(2, 5, 64, requires_grad=True)
    weights = torch.randn(2, 5, 32)
    (layer(x) * weights).sum().backward()
    got = [p.grad.clone() for p in (x, *params)]
    for p in (x, *params):
        p.grad = None
    delta = vblora.delta_weight(*params, a.topk)
    (torch.nn.functional.linear(x, layer.base_layer.weight + delta, layer.base_layer.bias) * weights).sum().backward()
    for mine, plain in zip(got, [p.grad for p in (x, *params)]):
        torch.testing.assert_close(mine, plain, rtol=1e-4, atol=1e-5)


def test_init_follows_the_paper_and_stays_near_the_base(ids):
    model = peftlab.attach(make_llama(), "vblora[init_vector_bank_bound=0.05,init_logits_std=0.2]")
    a = adapter(model)
    assert a.bank().abs().max() <= 0.05 and a.bank().abs().max() > 0.04
    assert 0.15 < float(torch.cat([x.vblora_logits_A.detach().flatten() for _, x in core.all_adapters(model)]).std()) < 0.25
    assert torch.count_nonzero(a.delta_weight()), "both factors start non-zero (IDENTITY_AT_INIT = False)"
    model = peftlab.attach(make_llama(), "vblora")  # the defaults: bank in +-0.02, so B A is tiny
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=1e-2)


def test_merge_adds_the_update_and_equals_unmerged(ids):
    model = randomize(peftlab.attach(make_llama(), "vblora[r=4]"))
    layer = model.get_submodule(Q0)
    W = layer.base_layer.weight.detach().clone()
    unmerged = logits(model, ids)
    peftlab.merge(model)
    torch.testing.assert_close(layer.base_layer.weight, W + expected_update(layer.adapters["default"]), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)


def test_save_load_round_trip_is_exact(ids, tmp_path):
    model = randomize(peftlab.attach(make_llama(), "vblora[r=2,num_vectors=300]"))
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    loaded = peftlab.load(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)


def test_topk_only_files_serve_and_merge_but_refuse_training(ids, tmp_path):
    model = randomize(peftlab.attach(make_llama(), "vblora[topk=3,save_only_topk_weights=true]"))
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert f"base_model.model.{Q0}.vblora_logits_A_topk_indices" in tensors
    assert tensors[f"base_model.model.{Q0}.vblora_logits_A_topk_indices"].dtype == torch.int16  # 256 vectors
    assert tensors[f"base_model.model.{Q0}.vblora_logits_B_topk_weights"].shape[-1] == 2
    assert not any(k.endswith(("logits_A", "logits_B")) for k in tensors)
    loaded = peftlab.load(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=1e-5)
    peftlab.merge(loaded)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=1e-5)
    peftlab.unmerge(loaded)
    loaded.train()
    with pytest.raises(peftlab.PeftlabError, match="save_only_topk_weights"):
        loaded(input_ids=ids, labels=ids)


def test_vector_length_is_chosen_from_the_widths_or_checked():
    assert vblora.auto_vector_length([576, 1536]) == 192  # SmolLM2
    assert vblora.auto_vector_length([384, 1536]) == 192  # MiniLM
    assert vblora.auto_vector_length([4096, 11008]) == 256  # Llama-7B: PEFT's default
    assert adapter(peftlab.attach(make_llama(), "vblora")).vector_length == 16  # k/v project to 16
    assert adapter(peftlab.attach(make_llama(), "vblora[targets=[q_proj,o_proj]]")).vector_length == 32
    a = adapter(peftlab.attach(make_llama(), "vblora[vector_length=8]"))
    assert a.vector_length == 8 and a.vblora_logits_A.shape == (4, 4, 256) and a.bank().shape == (256, 8)
    fresh = make_llama()
    with pytest.raises(peftlab.ConfigError, match="vector_length=32 does not divide.*vector_length=16"):
        peftlab.attach(fresh, "vblora[vector_length=32]")
    assert not [m for m in fresh.modules() if isinstance(m, AdapterLayer)]


def test_two_vblora_adapters_have_their_own_banks():
    model = peftlab.attach(make_llama(), "vblora[num_vectors=4,targets=q_proj]")
    peftlab.attach(model, "vblora[num_vectors=6,targets=q_proj]", name="other")
    layer = model.get_submodule(Q0)
    assert layer.adapters["default"].bank().shape == (4, 32) and layer.adapters["other"].bank().shape == (6, 32)


@pytest.mark.parametrize("setting,match", [("r=0", "r must"), ("topk=0", "topk"), ("topk=9,num_vectors=8", "exceed"),
                                           ("num_vectors=1", "num_vectors"), ("vector_length=0", "vector_length"),
                                           ("dropout=1.5", "dropout"), ("init_logits_std=-1", "init_logits_std"), ("init_vector_bank_bound=0", "zero bank"),
                                           ("save_only_topk_weights=2", "save_only_topk_weights"),
                                           ("colour=3", "unknown setting")])
def test_bad_settings_are_config_errors(setting, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), f"vblora[{setting}]")


def test_gpt2_conv1d_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="Conv1D.*nn.Linear layers only"):
        peftlab.attach(make_gpt2(), "vblora")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [
    ("llama-defaults", make_llama, "vblora"),
    ("llama-topk-only", make_llama, "vblora[r=3,num_vectors=20,topk=3,save_only_topk_weights=true,targets=[q_proj,down_proj]]"),
    ("bert-head", make_bert, "vblora[r=2,num_vectors=40,modules_to_save=[classifier]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_vblora_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = randomize(peftlab.attach(factory(), spec)).eval()
    config = assert_peftlab_file_loads_in_peft(model, factory, ids, tmp_path, "VBLORA")
    assert config["vector_length"] == next(core.all_adapters(model))[1].vector_length and "vblora_dropout" in config
    assert "base_model.vblora_vector_bank" in load_file(tmp_path / "adapter_model.safetensors")


PEFTS = [
    ("llama-q-v", make_llama, dict(r=4, num_vectors=16, vector_length=16, target_modules=["q_proj", "v_proj"],
                                   task_type="CAUSAL_LM")),
    ("llama-all-linear", make_llama, dict(r=2, num_vectors=30, vector_length=8, topk=3, target_modules="all-linear",
                                          task_type="CAUSAL_LM")),
    ("llama-topk-only", make_llama, dict(r=4, num_vectors=300, vector_length=16, save_only_topk_weights=True,
                                         target_modules=["k_proj", "down_proj"], task_type="CAUSAL_LM")),
    ("bert-seq-cls", make_bert, dict(r=4, num_vectors=20, vector_length=32, target_modules=["query", "value"],
                                     task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_vblora_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    expected = peft_adapter_file(factory, peft.VBLoRAConfig, kwargs, tmp_path, ids, randomize=randomize)
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected)


def test_a_missing_bank_or_bias_training_is_a_format_error(tmp_path):
    peftlab.save(peftlab.attach(make_llama(), "vblora[num_vectors=8]"), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if "vector_bank" not in k}, weights)
    fresh = make_llama()
    with pytest.raises(peftlab.AdapterFormatError, match="vector bank"):
        peftlab.load(fresh, tmp_path)
    assert not [m for m in fresh.modules() if isinstance(m, AdapterLayer)]
    save_file(tensors, weights)
    config = read_adapter_config(tmp_path)
    assert_config_edit_is_a_format_error(tmp_path, config, {"bias": "vblora_only"}, "bias")


@pytest.mark.parametrize("change,error", [({"r": 2}, peftlab.AdapterFormatError), ({"num_vectors": 9}, peftlab.AdapterFormatError),
                                          ({"vector_length": 32}, peftlab.IncompatibleBaseError)])
def test_tensors_that_contradict_the_config_are_clear_errors(tmp_path, change, error):
    peftlab.save(peftlab.attach(make_llama(), "vblora[num_vectors=8]"), tmp_path)
    config = read_adapter_config(tmp_path)
    assert_config_edit_is_a_format_error(tmp_path, config, change, "do not belong together|does not divide",
                                         error=error)


def test_peftlab_info_reads_the_file(tmp_path):
    from peftlab import cli

    model = peftlab.attach(make_llama(), "vblora[targets=[k_proj,v_proj,down_proj]]")
    peftlab.save(model, tmp_path)
    info = cli.adapter_info(tmp_path)
    assert info["peft_type"] == "VBLORA" and info["adapted_modules"] == 6
    assert info["parameters"] == peftlab.summary(model)["adapters"]["default"]  # the bank once, plus the logits
