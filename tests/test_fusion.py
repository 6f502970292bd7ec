"""AdapterFusion: attention over frozen task adapters' outputs, at every position they sit."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import logits, make_bert, make_llama

import peftlab
from peftlab.core import adapters as core
from peftlab.methods.fusion import FusionAdapter


def with_task_adapters(factory=make_llama, specs=(("a", "houlsby"), ("b", "pfeiffer"), ("c", "parallel"))):
    """A model with trained-looking (random) bottleneck adapters a, b, c."""
    model = factory()
    g = torch.Generator().manual_seed(0)
    for name, spec in specs:
        peftlab.attach(model, spec, name=name)
        with torch.no_grad():
            for _, adapter in core.all_adapters(model, name):
                for p in adapter.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def fusion_layers(model, name="default"):
    return {module_name: layer for module_name, layer in core.adapter_layers(model, name)}


def test_fusion_sits_wherever_the_fused_adapters_sit_and_fuses_those_present():
    model = with_task_adapters()
    peftlab.attach(model, "fusion[adapters=[a,b,c]]")
    layers = fusion_layers(model)
    assert sorted(layers) == sorted(n for n, _ in core.adapter_layers(model, "a"))  # houlsby: attn-out and ffn-out
    for module_name, layer in layers.items():
        expected = ["a"] if "o_proj" in module_name else ["a", "b", "c"]
        assert layer.adapters["default"].fused == expected


def test_fusion_is_attention_over_the_adapters_outputs_with_the_query_from_the_sublayer_output(ids):
    model = with_task_adapters()
    peftlab.attach(model, "fusion[adapters=[a,b,c]]")
    with torch.no_grad():
        for _, adapter in core.all_adapters(model, "default"):
            for p in adapter.parameters():
                p.add_(torch.randn_like(p) * 0.3)
    mlp = model.model.layers[1].mlp
    layer = mlp.down_proj
    fusion = layer.adapters["default"]
    seen = {}
    mlp.register_forward_pre_hook(lambda m, args: seen.update(ffn_input=args[0]))
    layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    logits(model, ids)
    h = layer.base_layer(seen["x"])
    z = [layer.adapters[n].bottleneck(h) for n in "ab"]  # serial adapters read the projection's output
    z.append(layer.adapters["c"].bottleneck(seen["ffn_input"]))  # the parallel adapter reads the FFN's input
    q = fusion.query(h)
    weights = torch.softmax(torch.stack([(q * fusion.key(zn)).sum(-1) for zn in z], -1), -1)
    fused = sum(weights[..., i:i + 1] * fusion.value(z[i]) for i in range(3))
    torch.testing.assert_close(seen["out"], h + fused, rtol=1e-4, atol=1e-5)


def test_fusion_starts_near_the_average_of_the_adapters_outputs(ids):
    model = with_task_adapters(specs=(("a", "pfeiffer"), ("b", "pfeiffer")))
    averaged = make_llama()
    peftlab.attach(averaged, "pfeiffer", name="a")
    peftlab.attach(averaged, "pfeiffer", name="b")
    for name in "ab":
        for module_name, layer in core.adapter_layers(model, name):
            averaged.get_submodule(module_name).adapters[name].load_state_dict(layer.adapters[name].state_dict())
            with torch.no_grad():
                averaged.get_submodule(module_name).adapters[name].up.weight.mul_(0.5)
                averaged.get_submodule(module_name).adapters[name].up.bias.mul_(0.5)
    peftlab.set_active(averaged, ["a", "b"])
    peftlab.attach(model, "fusion")
    fusion = model.model.layers[0].mlp.down_proj.adapters["default"]
    torch.testing.assert_close(fusion.value.weight, torch.eye(32), rtol=0, atol=1e-5)  # V: identity-ish
    torch.testing.assert_close(logits(model, ids), logits(averaged, ids), rtol=0.05, atol=0.02)


def test_only_the_fusion_layer_trains_the_fused_adapters_stay_frozen(ids):
    model = with_task_adapters(make_bert)
    peftlab.attach(model, "fusion[adapters=[a,b,c]]")
    model.train()
    model(input_ids=ids, labels=torch.tensor([0, 1, 2])).loss.backward()
    for name in "abc":
        params = [p for _, adapter in core.all_adapters(model, name) for p in adapter.parameters()]
        assert params and all(not p.requires_grad and p.grad is None for p in params)
    for _, fusion in core.all_adapters(model, "default"):
        trained = fusion.parameters() if len(fusion.fused) > 1 else fusion.value.parameters()  # one adapter: softmax = 1
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


def test_fusion_without_names_fuses_every_bottleneck_adapter_and_records_them():
    model = with_task_adapters()
    peftlab.attach(model, "lora", name="not_bottleneck")
    peftlab.attach(model, "fusion")
    assert peftlab.summary(model)["active"] == ["default"]
    config = core.get_state(model).configs["default"][0]
    assert config.adapters == ["a", "b", "c"]


def test_fusion_names_must_be_attached_bottleneck_adapters():
    model = with_task_adapters()
    peftlab.attach(model, "lora", name="l")
    with pytest.raises(peftlab.ConfigError, match="no adapter of that name.*attach or peftlab.load"):
        peftlab.attach(model, "fusion[adapters=[a,missing]]")
    with pytest.raises(peftlab.ConfigError, match="'l', a lora adapter; fusion combines bottleneck adapters"):
        peftlab.attach(model, "fusion[adapters=[a,l]]")
    with pytest.raises(peftlab.ConfigError, match="at least two"):
        peftlab.attach(model, "fusion[adapters=[a]]")
    with pytest.raises(peftlab.ConfigError, match="at least two"):
        peftlab.attach(make_llama(), "fusion")
    assert "default" not in core.get_state(model).configs


def test_fusion_saves_only_its_own_parameters_and_needs_its_adapters_to_load(ids, tmp_path):
    from safetensors import safe_open

    model = with_task_adapters()
    peftlab.attach(model, "fusion[adapters=[a,c]]")
    with torch.no_grad():
        for _, adapter in core.all_adapters(model, "default"):
            adapter.query.weight.normal_()
    expected = logits(model, ids)
    for name in "ac":
        peftlab.save(model, tmp_path / name, name)
    peftlab.save(model, tmp_path / "fusion")
    with safe_open(tmp_path / "fusion" / "adapter_model.safetensors", "pt") as f:
        assert {k.rsplit(".", 2)[-2] for k in f.keys()} == {"query", "key", "value"}
    assert json.loads((tmp_path / "fusion" / "adapter_config.json").read_text())["methods"][0]["adapters"] == ["a", "c"]

    fresh = make_llama()
    with pytest.raises(peftlab.ConfigError, match="no adapter of that name"):
        peftlab.load(fresh, tmp_path / "fusion")
    for name in "ac":
        peftlab.load(fresh, tmp_path / name, name)
    peftlab.load(fresh, tmp_path / "fusion")
    torch.testing.assert_close(logits(fresh, ids), expected, rtol=0, atol=1e-6)


def test_deleting_a_fused_adapter_makes_the_fusion_fail_clearly(ids):
    model = with_task_adapters()
    peftlab.attach(model, "fusion[adapters=[a,b]]")
    peftlab.delete(model, "b")
    with pytest.raises(peftlab.StateError, match=r"\['b'\], were deleted"):
        logits(model, ids)


def test_fusion_layers_are_dropped_where_all_their_adapters_are(ids):
    model = with_task_adapters(specs=(("a", "pfeiffer[drop_layers=1]"), ("b", "pfeiffer[drop_layers=1]")))
    peftlab.attach(model, "fusion")
    calls = []
    for module_name, layer in core.adapter_layers(model, "default"):
        layer.adapters["default"].query.register_forward_hook(lambda m, a, o, n=module_name: calls.append(n))
    logits(model, ids)
    assert calls == ["model.layers.1.mlp.down_proj"]
    assert isinstance(model.model.layers[0].mlp.down_proj.adapters["default"], FusionAdapter)
