"""MoSLoRA: the mixer between the factors; with M = I it is LoRA, and M trains."""
from __future__ import annotations

import math

import torch
from conftest import logits, make_gpt2, make_llama, randomize_adapters

import peftlab
from peftlab.core.layer import AdapterLayer

SPEC = "r=4,alpha=8,targets=[q_proj,v_proj,down_proj]"


def test_with_the_identity_mixer_it_is_lora(ids):
    mos = randomize_adapters(peftlab.attach(make_llama(), f"moslora[{SPEC}]"))
    lora = peftlab.attach(make_llama(), f"lora[{SPEC}]")
    with torch.no_grad():
        for name, layer in mos.named_modules():
            if isinstance(layer, AdapterLayer):
                a, twin = layer.adapters["default"], lora.get_submodule(name).adapters["default"]
                a.lora_AB.weight.copy_(torch.eye(4))
                twin.lora_A.weight.copy_(a.lora_A.weight)
                twin.lora_B.weight.copy_(a.lora_B.weight)
    torch.testing.assert_close(logits(mos, ids), logits(lora, ids), rtol=0, atol=1e-6)


def test_update_is_b_m_a():
    model = randomize_adapters(peftlab.attach(make_gpt2(), "moslora[r=4,alpha=8]"))
    layer = model.get_submodule("transformer.h.0.attn.c_attn")  # Conv1D: weight stored (in x out)
    a = layer.adapters["default"]
    expected = 2.0 * a.lora_B.weight @ a.lora_AB.weight @ a.lora_A.weight
    torch.testing.assert_close(a.delta_weight(), expected, rtol=0, atol=1e-6)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ expected.T, rtol=0, atol=1e-5)


def test_mixer_starts_kaiming_uniform_not_identity():
    torch.manual_seed(0)
    model = peftlab.attach(make_llama(), "moslora[r=8,targets=q_proj]")
    M = model.get_submodule("model.layers.0.self_attn.q_proj").adapters["default"].lora_AB.weight
    bound = 1 / math.sqrt(8)  # Kaiming uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert M.abs().max() <= bound and M.abs().max() > 0.5 * bound
    assert not torch.allclose(M, torch.eye(8), atol=0.1)


def test_the_mixer_trains(ids):
    model = peftlab.attach(make_llama(), f"moslora[{SPEC}]")
    model.train()
    mixers = {n: p for n, p in model.named_parameters() if "lora_AB" in n}
    assert mixers and all(p.requires_grad for p in mixers.values())
    before = {n: p.detach().clone() for n, p in mixers.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(not torch.equal(p, before[n]) for n, p in mixers.items())  # B starts at 0, so M moves from step 2
    assert losses[-1] < losses[0]
