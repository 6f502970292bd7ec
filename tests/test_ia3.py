"""(IA)^3: it only rescales (keys, values, the FFN's inner activation), merges exactly, and reads
and writes HF PEFT's IA3 format, checked against the real ``peft`` package both ways."""
from __future__ import annotations

import json
from functools import partial

import peft
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_peft_adapter_loads_and_goes_back, assert_peftlab_file_loads_in_peft, logits, make_bert, make_gpt2,
    make_llama, peft_adapter_file, read_adapter_config,
)

import peftlab
from peftlab.core.layer import AdapterLayer

K0, V0, DOWN0 = "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj"
BERT_KEY, BERT_FFN_OUT = "bert.encoder.layer.0.attention.self.key", "bert.encoder.layer.0.output.dense"
# weights at a pretrained model's scale, so that rescaling what a block computes visibly changes the output
make_llama, make_bert, make_gpt2 = (partial(f, initializer_range=0.2) for f in (make_llama, make_bert, make_gpt2))


def set_vectors(model, value=None, seed=0):
    """Every (IA)^3 vector to ``value``, or to random scales around 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(torch.full_like(p, value) if value is not None else 1 + 0.3 * torch.randn(p.shape, generator=g))
    return model


def wrapped(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def run_layer(model, name, x, routed: bool):
    """The layer's output alone (the fused path) or through per-row routing (the adapter's delta path)."""
    layer = model.get_submodule(name)
    with torch.no_grad():
        if not routed:
            return layer(x)
        with peftlab.routing(model, ["default"] * x.shape[0]):
            return layer(x)


def test_default_targets_and_vector_shapes():
    model = peftlab.attach(make_llama(), "ia3")
    layers = wrapped(model)
    assert {n.split(".")[-1] for n in layers} == {"k_proj", "v_proj", "down_proj"} and len(layers) == 6
    adapters = {n: m.adapters["default"] for n, m in layers.items()}
    assert adapters[DOWN0].feedforward and adapters[DOWN0].ia3_l.shape == (64,)  # the FFN's inner width
    assert not adapters[K0].feedforward and adapters[K0].ia3_l.shape == (16,)  # 2 kv heads x 8
    bert = peftlab.attach(make_bert(), "ia3")
    names = set(wrapped(bert))
    assert BERT_KEY in names and BERT_FFN_OUT in names and "bert.encoder.layer.0.attention.output.dense" not in names
    assert bert.get_submodule(BERT_FFN_OUT).adapters["default"].feedforward
    assert peftlab.summary(model)["adapters"]["default"] == 2 * (16 + 16 + 64)


@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_vectors_of_two_double_keys_values_and_the_ffn_input(routed):
    model = set_vectors(peftlab.attach(make_llama(), "ia3"), 2.0)
    base = make_llama()
    x, h = torch.randn(3, 5, 32), torch.randn(3, 5, 64)
    for name in (K0, V0):
        torch.testing.assert_close(run_layer(model, name, x, routed), 2 * base.get_submodule(name)(x), rtol=0, atol=1e-6)
    W = base.get_submodule(DOWN0).weight
    torch.testing.assert_close(run_layer(model, DOWN0, h, routed), F.linear(2 * h, W), rtol=0, atol=1e-5)


@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_output_scale_includes_the_bias_and_input_scale_does_not(routed):
    model = set_vectors(peftlab.attach(make_bert(), "ia3"))
    base = make_bert()
    for name, width in ((BERT_KEY, 32), (BERT_FFN_OUT, 64)):
        x = torch.randn(2, 4, width)
        layer, plain = model.get_submodule(name), base.get_submodule(name)
        scale = layer.adapters["default"].ia3_l
        expected = plain(x * scale) if name == BERT_FFN_OUT else (x @ plain.weight.T + plain.bias) * scale
        torch.testing.assert_close(run_layer(model, name, x, routed), expected.detach(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("factory,spec", [(make_llama, "ia3"), (make_bert, "ia3"),
                                          (make_gpt2, "ia3[targets=[c_attn,mlp.c_proj],feedforward=[mlp.c_proj]]")],
                         ids=["llama", "bert", "gpt2-conv1d"])
def test_merge_folds_into_rows_and_columns_and_unmerge_restores(factory, spec, ids):
    model = set_vectors(peftlab.attach(factory(), spec))
    expected = logits(model, ids)
    original = {k: v.clone() for k, v in factory().state_dict().items()}
    peftlab.merge(model)
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-4, atol=1e-5)
    if factory is make_llama:
        k, down = model.get_submodule(K0), model.get_submodule(DOWN0)
        torch.testing.assert_close(k.base_layer.weight, original[K0 + ".weight"] * k.adapters["default"].ia3_l[:, None])
        torch.testing.assert_close(down.base_layer.weight, original[DOWN0 + ".weight"] * down.adapters["default"].ia3_l[None, :])
    peftlab.unmerge(model)
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-4, atol=1e-5)
    for key, value in peftlab.unload(model).state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=1e-5, atol=1e-6)


def test_a_zero_scale_refuses_to_merge_and_leaves_the_model_unmerged(ids):
    model = set_vectors(peftlab.attach(make_llama(), "ia3"))
    with torch.no_grad():
        model.get_submodule("model.layers.1.mlp.down_proj").adapters["default"].ia3_l[3] = 0.0
    expected = logits(model, ids)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftlab.StateError, match="zero"):
        peftlab.merge(model)
    assert peftlab.summary(model)["merged"] == []
    for key, value in model.state_dict().items():  # the layers merged before the refusal were taken back out
        torch.testing.assert_close(value, weights[key], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-4, atol=1e-5)


def test_bad_feedforward_setting_is_a_config_error():
    with pytest.raises(peftlab.ConfigError, match="feedforward"):
        peftlab.attach(make_llama(), "ia3[feedforward=[3]]")


# ---- HF PEFT interop --------------------------------------------------------------------------

OURS = [
    ("llama", make_llama, "ia3"),
    ("bert", make_bert, "ia3[modules_to_save=[classifier]]"),  # peft's SEQ_CLS models always load a head
    ("llama-all-linear", make_llama, "ia3[targets=all-linear,feedforward=[down_proj,o_proj]]"),
    ("gpt2-conv1d", make_gpt2, "ia3[targets=[c_attn,mlp.c_proj],feedforward=[mlp.c_proj]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_ia3_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = set_vectors(peftlab.attach(factory(), spec))
    config = assert_peftlab_file_loads_in_peft(model, factory, ids, tmp_path, "IA3")
    assert set(config["feedforward_modules"]) <= set(config["target_modules"])


PEFTS = [
    ("llama-defaults", make_llama, dict(task_type="CAUSAL_LM")),
    ("bert-defaults", make_bert, dict(task_type="SEQ_CLS")),  # PEFT's "output.dense" also scales attention.output's input
    ("llama-regex-feedforward", make_llama, dict(target_modules=["q_proj", "up_proj", "down_proj"],
                                                 feedforward_modules=r".*layers\.1\.mlp\.(up|down)_proj")),
    ("gpt2-conv1d", make_gpt2, dict(task_type="CAUSAL_LM")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_ia3_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    expected = peft_adapter_file(factory, peft.IA3Config, kwargs, tmp_path, ids, randomize=set_vectors)
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected)


def test_feedforward_modules_that_contradict_the_vectors_are_a_format_error(tmp_path):
    model = peftlab.attach(make_llama(), "ia3")
    peftlab.save(model, tmp_path)
    config = read_adapter_config(tmp_path)
    config["feedforward_modules"] = ["k_proj"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    fresh = make_llama()
    with pytest.raises(peftlab.AdapterFormatError, match="feedforward_modules"):
        peftlab.load(fresh, tmp_path)
    assert not wrapped(fresh)
