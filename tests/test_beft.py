"""BEFT: only a bias on the value projections trains; it shifts every token's attention output by
the same vector; merging; and HF PEFT's BEFT format checked against the real ``peft`` package both ways."""
from __future__ import annotations


import peft
import pytest
import torch
from conftest import (
    assert_peft_adapter_loads_and_goes_back, assert_peftlab_file_loads_in_peft, logits, make_bert, make_gpt2,
    make_llama, peft_adapter_file,
)

import peftlab
from peftlab.core.layer import AdapterLayer

V0, O0 = "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj"


def randomize(model, seed: int = 0, std: float = 0.5):
    """Every BEFT bias (peftlab's or peft's) to random values, so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "beft_bias" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def wrapped(model) -> list:
    return [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


# ---- the method --------------------------------------------------------------------------------

def test_only_the_value_biases_train():
    model = peftlab.attach(make_llama(), "beft")
    assert wrapped(model) == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith("beft_bias") for n in trainable) and sum(trainable.values()) == 2 * 16  # 2 layers x kv width
    bert = peftlab.attach(make_bert(), "beft")
    assert [n.rsplit(".", 3)[-3:] for n in wrapped(bert)] == [["attention", "self", "value"]] * 2


def test_a_value_bias_shifts_every_tokens_attention_output_by_the_same_vector(ids):
    """The defining property: softmax rows sum to one, so a value-bias shift beta reaches the input of
    o_proj unchanged, for every token and position (head h of the query gets its kv group's slice)."""
    model = randomize(peftlab.attach(make_llama(), "beft"))
    beta = model.get_submodule(V0).adapters["default"].beft_bias.detach()
    seen = {}
    hook = model.get_submodule(O0).register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    logits(model, ids)
    with peftlab.disabled(model):
        logits(model, ids)
        base_x = seen["x"]
    logits(model, ids)
    hook.remove()
    heads, kv_heads, head_dim = 4, 2, 8
    expected = beta.view(kv_heads, head_dim).repeat_interleave(heads // kv_heads, 0).flatten()  # GQA: query head -> kv group
    torch.testing.assert_close(seen["x"] - base_x, expected.expand_as(base_x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_layer_adds_the_bias(routed):
    model = randomize(peftlab.attach(make_llama(), "beft"))
    layer = model.get_submodule(V0)
    beta = layer.adapters["default"].beft_bias
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        expected = layer.base_layer(x) + beta
        if routed:
            with peftlab.routing(model, ["default", None, "default"]):
                out = layer(x)
            expected[1] = layer.base_layer(x[1])
        else:
            out = layer(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_the_gradient_is_the_summed_output_gradient():
    model = peftlab.attach(make_llama(), "beft")
    model.train()
    layer = model.get_submodule(V0)
    x, weights = torch.randn(2, 5, 32), torch.randn(2, 5, 16)
    (layer(x) * weights).sum().backward()
    torch.testing.assert_close(layer.adapters["default"].beft_bias.grad, weights.sum((0, 1)), rtol=1e-5, atol=1e-6)
    assert layer.base_layer.weight.grad is None


def test_starts_as_the_base(ids):
    model = peftlab.attach(make_llama(), "beft")
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=0)
    gaussian = peftlab.attach(make_llama(), "beft[init=gaussian]")
    assert torch.count_nonzero(gaussian.get_submodule(V0).adapters["default"].beft_bias) == 16


@pytest.mark.parametrize("factory", [make_llama, make_bert], ids=["llama-no-bias", "bert-bias"])
def test_merge_shifts_the_bias_and_unmerge_restores(factory, ids):
    model = randomize(peftlab.attach(factory(), "beft"))
    unmerged = logits(model, ids)
    name = wrapped(model)[0]
    base = model.get_submodule(name).base_layer
    before = None if base.bias is None else base.bias.detach().clone()
    peftlab.merge(model)
    beta = model.get_submodule(name).adapters["default"].beft_bias
    torch.testing.assert_close(base.bias, (0 if before is None else before) + beta, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    assert (base.bias is None) == (before is None)
    if before is not None:
        torch.testing.assert_close(base.bias, before, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)


def test_save_load_round_trip_is_exact(ids, tmp_path):
    model = randomize(peftlab.attach(make_llama(), "beft[targets=[values,keys]]"))
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    torch.testing.assert_close(logits(peftlab.load(make_llama(), tmp_path), ids), expected, rtol=0, atol=0)


@pytest.mark.parametrize("setting,match", [("init=ones", "init"), ("colour=3", "unknown setting")])
def test_bad_settings_are_config_errors(setting, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), f"beft[{setting}]")


def test_gpt2_conv1d_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="Conv1D.*nn.Linear layers only"):
        peftlab.attach(make_gpt2(), "beft[targets=[c_attn]]")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [
    ("llama-defaults", make_llama, "beft"),
    ("llama-more", make_llama, "beft[targets=[q_proj,v_proj,down_proj]]"),
    ("bert-head", make_bert, "beft[modules_to_save=[classifier]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_beft_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = randomize(peftlab.attach(factory(), spec))
    config = assert_peftlab_file_loads_in_peft(model, factory, ids, tmp_path, "BEFT")
    assert config["init_weights"] is True
    if label == "llama-defaults":
        assert config["target_modules"] == ["v_proj"]


PEFTS = [
    ("llama-default", make_llama, dict(task_type="CAUSAL_LM")),
    ("llama-q-v-mlp", make_llama, dict(target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")),
    ("bert-seq-cls", make_bert, dict(task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_beft_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    expected = peft_adapter_file(factory, peft.BeftConfig, kwargs, tmp_path, ids, randomize=randomize)
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected)


def test_bad_files_are_clear_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    peftlab.save(peftlab.attach(make_llama(), "beft"), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: torch.zeros(1, 7) for k in tensors}, tmp_path / "adapter_model.safetensors")
    fresh = make_llama()
    with pytest.raises(peftlab.IncompatibleBaseError, match="wrong base model"):
        peftlab.load(fresh, tmp_path)
    assert not wrapped(fresh)
    save_file({"base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight": torch.zeros(2, 32)},
              tmp_path / "adapter_model.safetensors")
    with pytest.raises(peftlab.AdapterFormatError, match="no BEFT tensors"):
        peftlab.load(make_llama(), tmp_path)
