"""LoftQ: the quantized base plus the LoRA init it chooses approximates the full-precision model
better than QLoRA's init (B = 0), per layer and at the output; on CPU, for every format."""
from __future__ import annotations

import pytest
import torch
from conftest import make_llama
from test_method_properties import outputs

import peftlab
from peftlab.core import adapters as core
from peftlab.quant import quantize_like
from peftlab.quant.loftq import lowrank_factors

FORMATS = ["nf4", "int8", "int4"]


def loftq_llama(format="nf4", rank=4, iterations=5, spec="lora[r=4,alpha=8,init=loftq]"):
    model = make_llama()
    peftlab.quantize(model, format, group_size=16, loftq_rank=rank, loftq_iter=iterations)
    return peftlab.attach(model, spec)


def qlora_llama(format="nf4"):
    model = make_llama()
    peftlab.quantize(model, format, group_size=16)
    return peftlab.attach(model, "lora[r=4,alpha=8]")


def layer_errors(model) -> dict:
    """||W - (base + s B A)||_F per adapted layer, W the full-precision weight."""
    full = make_llama()
    return {name: (full.get_submodule(name).weight - layer.base_layer.dequantize()
                   - layer.adapters["default"].delta_weight()).norm().item()
            for name, layer in core.adapter_layers(model)}


@pytest.mark.parametrize("format", FORMATS)
def test_loftq_approximates_the_full_precision_weights_better_than_qlora_per_layer(format):
    loftq, qlora = layer_errors(loftq_llama(format)), layer_errors(qlora_llama(format))
    assert set(loftq) == set(qlora) and len(loftq) == 14
    assert all(loftq[name] < qlora[name] for name in loftq), {n: loftq[n] / qlora[n] for n in loftq}


@pytest.mark.parametrize("format", FORMATS)
def test_loftq_output_is_closer_to_the_full_precision_model_than_qlora(format):
    full = outputs(make_llama(), "llama")
    loftq_error = (outputs(loftq_llama(format), "llama") - full).abs().mean()
    qlora_error = (outputs(qlora_llama(format), "llama") - full).abs().mean()
    assert loftq_error < 0.8 * qlora_error


def test_alternating_steps_lower_the_error_further():
    one, five = layer_errors(loftq_llama(iterations=1)), layer_errors(loftq_llama(iterations=5))
    assert sum(five.values()) < 0.9 * sum(one.values())


def test_the_first_step_is_plain_quantization_plus_the_svd_of_its_error():
    model, qlora = loftq_llama(iterations=1), qlora_llama()
    for name, layer in core.adapter_layers(model):
        plain = qlora.get_submodule(name).base_layer.dequantize()
        assert torch.equal(layer.base_layer.dequantize(), plain)
        L, R = lowrank_factors(make_llama().get_submodule(name).weight - plain, 4)
        torch.testing.assert_close(layer.adapters["default"].delta_weight(), L @ R, rtol=0, atol=1e-6)


def test_lowrank_factors_are_the_truncated_svd_at_every_rank():
    matrix = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    L, R = lowrank_factors(matrix, 6)
    for k in (6, 3, 1):
        torch.testing.assert_close(L[:, :k] @ R[:k], (U[:, :k] * S[:k]) @ Vh[:k], rtol=0, atol=1e-5)


def test_a_smaller_lora_rank_takes_the_leading_factors():
    model = loftq_llama(rank=8, spec="lora[r=2,alpha=4,init=loftq]")
    for _, layer in core.adapter_layers(model):
        L, R = layer.base_layer.loftq_B, layer.base_layer.loftq_A
        torch.testing.assert_close(layer.adapters["default"].delta_weight(), L[:, :2] @ R[:2], rtol=0, atol=1e-6)


def test_loftq_init_errors_are_clear():
    with pytest.raises(peftlab.ConfigError, match="init=loftq needs a base quantized with LoftQ"):
        peftlab.attach(peftlab.quantize(make_llama(), "nf4"), "lora[init=loftq]")
    with pytest.raises(peftlab.ConfigError, match="loftq_rank=4; use r <= 4"):
        loftq_llama(spec="lora[r=8,init=loftq]")
    with pytest.raises(peftlab.ConfigError, match="dylora: init=loftq is not supported"):
        loftq_llama(spec="dylora[r=4,init=loftq]")


def test_a_loftq_adapter_loads_onto_the_base_quantized_again_from_its_record(tmp_path):
    model = loftq_llama()
    expected = outputs(model, "llama")
    peftlab.save(model, tmp_path / "adapter")
    fresh = quantize_like(make_llama(), tmp_path / "adapter")  # LoftQ again: the same quantized weights
    peftlab.load(fresh, tmp_path / "adapter")
    torch.testing.assert_close(outputs(fresh, "llama"), expected, rtol=0, atol=1e-5)
