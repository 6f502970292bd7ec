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
