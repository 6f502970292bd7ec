"""QA-LoRA: the pooled input makes the update constant within each quantization group, so merging
folds it into the INT4 offsets: the merged model is still INT4 (same codes and scales) and gives the
unmerged outputs. And the INT4 format it merges into."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_llama
from test_method_properties import outputs, perturb, train_a_few_steps
from torch import nn

import peftlab
from peftlab.core import adapters as core
from peftlab.quant import merge_report
from peftlab.quant.int4 import GroupInt4Linear, pack, quantize_groups, unpack

GROUP = 16


def int4_llama(spec=f"qalora[r=4,group_size={GROUP}]"):
    model = make_llama()
    peftlab.quantize(model, "int4", group_size=GROUP)
    return peftlab.attach(model, spec)


def int4_state(model) -> dict:
    return {name: (layer.base_layer.weight.detach().clone(), layer.base_layer.scales.clone(), layer.base_layer.offsets.clone())
            for name, layer in core.adapter_layers(model)}


def test_a_is_pooled_and_the_update_is_constant_within_each_group():
    model = int4_llama()
    perturb(model)
    layer = model.get_submodule("model.layers.0.mlp.down_proj")  # 64 inputs, 4 groups of 16
    adapter = layer.adapters["default"]
    assert adapter.lora_A.weight.shape == (4, 64 // GROUP)
    delta = adapter.delta_weight()
    groups = delta.reshape(32, 64 // GROUP, GROUP)
    assert torch.equal(groups, groups[..., :1].expand_as(groups))
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(adapter(x, None), F.linear(x, delta), rtol=0, atol=1e-6)


def test_merging_keeps_the_int4_format_exactly_and_the_outputs():
    model = int4_llama()
    perturb(model)
    expected = outputs(model, "llama")
    before = int4_state(model)
    peftlab.merge(model)
    after = int4_state(model)
    for name, layer in core.adapter_layers(model):
        assert type(layer.base_layer) is GroupInt4Linear and layer.base_layer.weight.dtype == torch.uint8
        codes, scales, offsets = after[name]
        assert torch.equal(codes, before[name][0]) and torch.equal(scales, before[name][1])  # only the offsets move
        assert not torch.equal(offsets, before[name][2])
    assert merge_report(model) == {"layers": 0}  # nothing was requantized
    torch.testing.assert_close(outputs(model, "llama"), expected, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    for name, (codes, scales, offsets) in int4_state(model).items():
        assert torch.equal(codes, before[name][0])
        torch.testing.assert_close(offsets, before[name][2], rtol=0, atol=1e-6)


def test_a_plain_lora_merged_into_int4_is_rounded_away_instead():
    """The contrast: LoRA's update varies within a group, so it can only be requantized."""
    model = int4_llama("lora[r=4]")
    perturb(model)
    expected = outputs(model, "llama")
    before = int4_state(model)
    peftlab.merge(model)
    assert any(not torch.equal(before[name][0], codes) for name, (codes, _, _) in int4_state(model).items())
    assert merge_report(model)["mean_abs_error"] > 0
    assert (outputs(model, "llama") - expected).abs().max() > 1e-3


def test_a_larger_qalora_group_folds_into_smaller_int4_groups():
    model = int4_llama(f"qalora[r=4,group_size={2 * GROUP}]")
    perturb(model)
    expected = outputs(model, "llama")
    peftlab.merge(model)
    torch.testing.assert_close(outputs(model, "llama"), expected, rtol=0, atol=1e-5)


def test_group_size_errors_are_clear():
    with pytest.raises(peftlab.ConfigError, match="not a multiple of the INT4 group size 16"):
        int4_llama("qalora[group_size=8]")
    with pytest.raises(peftlab.ConfigError, match="group_size=24 does not divide the 32 input features"):
        peftlab.attach(make_llama(), "qalora[group_size=24]")


def test_qalora_trains_on_an_int4_base():
    model = int4_llama()
    result = train_a_few_steps(model)
    assert result.losses[-1] < result.losses[0] * 0.95, result.losses


# ---- the INT4 format --------------------------------------------------------------------------

def test_int4_rounds_each_weight_to_its_groups_grid():
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    layer = GroupInt4Linear.from_linear(nn.Linear(64, 8).requires_grad_(False).eval(), group_size=32)
    layer.quantize_weight(weight)
    codes = layer.codes()
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and layer.weight.shape == (8, 32)  # two codes a byte
    error = (layer.dequantize() - weight).abs().reshape(8, 2, 32)
    assert (error <= layer.scales[..., None] / 2 + 1e-6).all()
    groups = weight.reshape(8, 2, 32)
    torch.testing.assert_close(layer.offsets, groups.amin(-1))  # the minimum and maximum are on the grid
    torch.testing.assert_close(layer.offsets + 15 * layer.scales, groups.amax(-1))


def test_int4_packing_round_trips_and_a_constant_group_is_exact():
    codes = torch.randint(0, 16, (4, 10), dtype=torch.uint8)
    assert torch.equal(unpack(pack(codes)), codes)
    codes, scales, offsets = quantize_groups(torch.full((2, 8), 0.25), 4)
    assert torch.equal(scales, torch.zeros(2, 2)) and torch.equal(offsets, torch.full((2, 2), 0.25))
