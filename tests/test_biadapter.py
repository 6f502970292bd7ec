"""BI-Adapter's 1-bit adapters: every linear weight of a trained adapter becomes sign(W) * mean|W|
(per matrix or per output row), held and saved as sign bits packed 8 per byte plus the scales."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import logits, make_bert, make_llama, randomize_adapters

import peftlab
from peftlab.core import adapters as core
from peftlab.formats.files import read_tensors
from peftlab.prune import BinaryLinear, binarize, pack_bits, unpack_bits


@pytest.mark.parametrize("count", [1, 7, 8, 9, 64, 1001])
def test_packing_holds_8_signs_per_byte_and_round_trips_exactly(count):
    bits = torch.rand(count, generator=torch.Generator().manual_seed(count)) < 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(count / 8)
    assert torch.equal(unpack_bits(packed, count), bits)


def test_the_first_sign_is_the_lowest_bit():
    assert pack_bits(torch.tensor([True, False, False, False, False, False, False, True, True])).tolist() == [129, 1]


def by_hand(weight: torch.Tensor, per: str) -> torch.Tensor:
    scale = weight.abs().mean(1, keepdim=True) if per == "row" else weight.abs().mean()
    return torch.where(weight >= 0, scale, -scale)


def trained(spec: str, make=make_llama):
    return randomize_adapters(peftlab.attach(make(), spec), std=0.1)


@pytest.mark.parametrize("per", ["matrix", "row"])
@pytest.mark.parametrize("make,spec", [(make_llama, "lora[r=8]"), (make_llama, "dora[r=4,targets=[q_proj,down_proj]]"),
                                       (make_bert, "houlsby[bottleneck=8]")], ids=["lora", "dora", "bert-houlsby"])
def test_outputs_equal_a_model_whose_weights_are_sign_times_mean_magnitude_by_hand(per, make, spec, ids):
    model = trained(spec, make)
    expected_model = copy.deepcopy(model)
    with torch.no_grad():
        for _, adapter in core.all_adapters(expected_model, "default"):
            for module in adapter.modules():
                if type(module) is torch.nn.Linear:
                    module.weight.copy_(by_hand(module.weight, per))
    report = binarize(model, per=per)
    linears = [m for _, a in core.all_adapters(model) for m in a.modules() if isinstance(m, BinaryLinear)]
    assert report["matrices"] == len(linears) > 0
    torch.testing.assert_close(logits(model, ids), logits(expected_model, ids), rtol=0, atol=1e-6)
    assert not torch.allclose(logits(model, ids), logits(trained(spec, make), ids), atol=1e-4), "binarizing changes the adapter"


def test_the_saved_weights_take_1_bit_each_and_load_back_exactly(ids, tmp_path):
    model = trained("lora[r=8]")
    peftlab.save(model, tmp_path / "fp32")
    report = binarize(model)
    expected = logits(model, ids)
    peftlab.save(model, tmp_path / "1bit")
    config = json.loads((tmp_path / "1bit" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PEFTLAB" and [m["method"] for m in config["methods"]] == ["lora", "binarized"]

    full, _ = read_tensors(tmp_path / "fp32" / "adapter_model.safetensors")
    packed, _ = read_tensors(tmp_path / "1bit" / "adapter_model.safetensors")
    weights = sum(t.numel() for t in full.values())
    assert report["weights"] == weights and report["bytes_before"] == 4 * weights
    bits = {k: t for k, t in packed.items() if k.endswith(".bits")}
    assert len(bits) == len(full) and all(t.dtype == torch.uint8 for t in bits.values())
    assert sum(t.numel() for t in bits.values()) == weights / 8
    stored = sum(t.numel() * t.element_size() for t in packed.values())
    assert stored == report["bytes_after"] == weights / 8 + 4 * len(bits)  # the bits and one fp32 scale per matrix
    assert stored < 1.2 * (4 * weights) / 32

    loaded = peftlab.load(make_llama(), tmp_path / "1bit")
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)
    mine = {n: b for n, b in model.named_buffers() if n.endswith(".bits")}
    assert {n: b for n, b in loaded.named_buffers() if n.endswith(".bits")}.keys() == mine.keys()
    assert all(torch.equal(b, mine[n]) for n, b in loaded.named_buffers() if n.endswith(".bits"))


def test_a_binarized_lora_still_merges_exactly(ids):
    model = trained("lora[r=4]")
    binarize(model, per="row")
    expected = logits(model, ids)
    peftlab.merge(model)
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-4, atol=1e-5)
    peftlab.unmerge(model)
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-4, atol=1e-5)


def test_bad_requests_are_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="per must be one of matrix, row"):
        binarize(trained("lora"), per="column")
    twice = trained("lora")
    binarize(twice)
    with pytest.raises(peftlab.StateError, match="binarized already"):
        binarize(twice)
    with pytest.raises(peftlab.StateError, match="no linear weight"):
        binarize(peftlab.attach(make_llama(), "ia3"))
    merged = trained("lora")
    peftlab.merge(merged)
    with pytest.raises(peftlab.StateError, match="unmerge"):
        binarize(merged)
