"""Hybrid methods: MAM (prefix on attention + scaled parallel adapter on the FFN), UniPELT, unions."""
import pytest
import torch
from conftest import make_bert, make_llama

import peftlab
from peftlab.core import adapters as core
from peftlab.core import model_adapters
from peftlab.methods.mam import MamConfig


def test_mam_is_a_prefix_plus_a_scaled_parallel_adapter_on_every_ffn():
    model = peftlab.attach(make_llama(), "mam[length=6,hidden=16,bottleneck=8]")
    assert [c.method for c in peftlab.core.state.get_state(model).configs["default"]] == ["prefix", "parallel"]
    (_, method, prefix), = model_adapters.model_adapters(model, "default")
    assert method == "prefix" and prefix.length == 6
    wrapped = [name for name, _ in core.adapter_layers(model, "default")]
    assert wrapped == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    adapter = dict(core.adapter_layers(model, "default"))[wrapped[0]].adapters["default"]
    assert adapter.scale == 4.0 and adapter.down.out_features == 8
    summary = peftlab.summary(model)
    assert set(summary["methods"]) == {"prefix", "parallel"}


def test_mam_defaults_are_the_papers():
    config = MamConfig()
    assert (config.length, config.bottleneck, config.scale) == (30, 512, 4.0)


def test_mam_works_on_an_encoder_and_its_settings_are_checked():
    model = peftlab.attach(make_bert(), "mam[length=4,hidden=8,bottleneck=4]")
    ids = torch.randint(3, 90, (2, 6))
    assert model(input_ids=ids).logits.shape == (2, 3)
    for bad in ("length=0", "scale=-1", "bottleneck=0"):
        with pytest.raises(peftlab.ConfigError, match=bad.split("=")[0]):
            peftlab.attach(make_llama(), f"mam[{bad}]")


# ---- UniPELT ------------------------------------------------------------------------------------

UNIPELT = "unipelt[r=4,length=3,hidden=8,bottleneck=4]"


def _unipelt():
    model = peftlab.attach(make_llama(initializer_range=0.2), UNIPELT)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, adapter in core.all_adapters(model):
            for p in adapter.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _parts(model):
    layers = dict(core.adapter_layers(model, "default"))
    return {name: layer.adapters["default"] for name, layer in layers.items()}


def _set_gate_bias(model, value):
    with torch.no_grad():
        for adapter in _parts(model).values():
            adapter.gate.weight.zero_()
            adapter.gate.bias.fill_(value)


def test_unipelt_gates_lora_on_queries_values_an_adapter_after_the_ffn_and_a_prefix():
    model = _unipelt()
    assert sorted(_parts(model)) == sorted(f"model.layers.{i}.{m}" for i in (0, 1)
                                           for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))
    (_, method, prefix), = model_adapters.model_adapters(model, "default")
    assert method == "unipelt_prefix" and prefix.gate_logits.shape == (2,)
    assert set(peftlab.summary(model)["methods"]) == {"unipelt_lora", "unipelt_adapter", "unipelt_prefix"}


def test_unipelt_closed_gates_switch_lora_and_the_adapter_off_and_open_ones_apply_them_in_full():
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(1))
    model = _unipelt()
    _set_gate_bias(model, -60.0)  # sigmoid = 0 to float precision
    closed = model(input_ids=ids).logits
    with torch.no_grad():
        for adapter in _parts(model).values():  # the same model without its LoRA updates and adapters
            (adapter.lora_B.weight if hasattr(adapter, "lora_B") else adapter.up.weight).zero_()
            if hasattr(adapter, "up"):
                adapter.up.bias.zero_()
    torch.testing.assert_close(closed, model(input_ids=ids).logits, rtol=0, atol=1e-6)

    model = _unipelt()
    _set_gate_bias(model, 60.0)  # sigmoid = 1
    x = torch.randn(2, 5, 32)
    for adapter in _parts(model).values():
        if hasattr(adapter, "lora_B"):
            plain = adapter.lora_B(adapter.lora_A(x)) * adapter.scaling
        else:
            plain = adapter.bottleneck(x)
        torch.testing.assert_close(adapter(x, x), plain)


def test_unipelt_gates_train_and_folding_keeps_outputs():
    model = _unipelt()
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids, labels=ids).loss.backward()
    (_, _, prefix), = model_adapters.model_adapters(model, "default")
    assert prefix.gate_logits.grad is not None and prefix.gate_logits.grad.abs().sum() > 0
    assert all(a.gate.weight.grad.abs().sum() > 0 for a in _parts(model).values())
    with torch.no_grad():
        before = model(input_ids=ids).logits
        peftlab.methods.unipelt.fold(model)
        assert not hasattr(prefix, "gate_logits") and prefix.folded
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=1e-5)


def test_unipelt_prefix_gate_scales_the_values_of_its_layer():
    model = _unipelt()
    (_, _, prefix), = model_adapters.model_adapters(model, "default")
    with torch.no_grad():
        prefix.gate_logits.copy_(torch.tensor([60.0, -60.0]))  # layer 0 fully on, layer 1's values off
        flat = prefix.final().view(3, 2, 2, -1)  # tokens, layers, (keys, values), width
        raw = prefix.transform(prefix.embedding).view(3, 2, 2, -1)
    torch.testing.assert_close(flat[:, 0], raw[:, 0])
    torch.testing.assert_close(flat[:, 1, 0], raw[:, 1, 0])  # keys untouched
    assert flat[:, 1, 1].abs().max() < 1e-20


# ---- unions ------------------------------------------------------------------------------------

def test_any_union_through_the_spec_string_trains_and_round_trips(tmp_path):
    spec = "lora[r=4,targets=[q_proj,v_proj]]|prefix[length=3,hidden=8]|houlsby[bottleneck=4]|ia3[targets=[keys],feedforward=[]]"
    model = peftlab.attach(make_llama(initializer_range=0.2), spec)
    assert [c.method for c in peftlab.core.state.get_state(model).configs["default"]] == ["lora", "prefix", "houlsby", "ia3"]
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(3))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    peftlab.save(model, tmp_path)
    loaded = peftlab.load(make_llama(initializer_range=0.2), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)
