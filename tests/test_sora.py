"""SoRA: the gated update, the proximal (soft-threshold) step, and the sparsity it produces."""
from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_llama, randomize_adapters

import peftlab
from peftlab.core import adapters as core
from peftlab.methods import sora
from peftlab.train import TrainConfig, train

Q0 = "model.layers.0.self_attn.q_proj"


def test_forward_is_the_gated_product():
    model = randomize_adapters(peftlab.attach(make_llama(), "sora[r=4,alpha=8,targets=q_proj]"))
    layer = model.get_submodule(Q0)
    a = layer.adapters["default"]
    expected = 2.0 * a.lora_B.weight @ torch.diag(a.gate) @ a.lora_A.weight
    torch.testing.assert_close(a.delta_weight(), expected, rtol=0, atol=1e-6)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (layer.base_layer.weight + expected).T, rtol=0, atol=1e-5)


def test_soft_threshold():
    values = torch.tensor([-2.0, -0.3, 0.0, 0.1, 0.5, 3.0])
    torch.testing.assert_close(sora.soft_threshold(values, 0.5), torch.tensor([-1.5, 0.0, 0.0, 0.0, 0.0, 2.5]))


def test_after_step_shrinks_every_gate_by_lambda_times_lr():
    model = peftlab.attach(make_llama(), "sora[r=4,sparse_lambda=2,targets=[q_proj,v_proj]]")
    gates = {n: m.gate.detach().clone() for n, m in core.method_adapters(model, "default", "sora")}
    core.after_step(model, 1, 10, lr=0.1)
    for name, module in core.method_adapters(model, "default", "sora"):
        torch.testing.assert_close(module.gate.detach(), sora.soft_threshold(gates[name], 0.2), rtol=0, atol=0)


def test_after_step_needs_the_learning_rate():
    model = peftlab.attach(make_llama(), "sora[targets=q_proj]")
    with pytest.raises(peftlab.ConfigError, match="learning rate"):
        core.after_step(model, 1, 10)


def test_a_closed_gate_switches_its_rank_off():
    model = randomize_adapters(peftlab.attach(make_llama(), "sora[r=4,targets=q_proj]"))
    layer = model.get_submodule(Q0)
    a = layer.adapters["default"]
    x = torch.randn(3, 32)
    with torch.no_grad():
        a.gate[1] = 0.0
        before = layer(x)
        a.lora_A.weight[1].normal_()
        a.lora_B.weight[:, 1].normal_()
        torch.testing.assert_close(layer(x), before, rtol=0, atol=0)
    assert sora.effective_ranks(model)[Q0] == 3


def _train(sparse_lambda: float):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (4, 12), generator=g)
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]
    torch.manual_seed(0)
    model = peftlab.attach(make_llama(), f"sora[r=4,sparse_lambda={sparse_lambda}]")
    result = train(model, rows, TrainConfig(lr=1e-2, steps=40, batch_size=4, warmup_steps=0, schedule="constant",
                                            progress=False, device="cpu"))
    return result.losses, sora.effective_ranks(model)


def test_a_large_lambda_closes_gates_exactly_while_the_loss_drops():
    losses, ranks = _train(sparse_lambda=2.0)
    full = 4 * len(ranks)
    assert sum(ranks.values()) <= 0.8 * full, ranks  # a fifth of the ranks or more pruned
    assert min(ranks.values()) < 4
    assert losses[-1] < 0.95 * losses[0], losses
    dense_losses, dense_ranks = _train(sparse_lambda=0.0)
    assert sum(dense_ranks.values()) == full  # without the L1 term no gate lands on exactly 0
    assert losses[-1] < dense_losses[-1] + 0.1  # and sparsity costs little loss


def test_effective_ranks_name_unknown_adapters():
    model = peftlab.attach(make_llama(), "sora[targets=q_proj]")
    with pytest.raises(peftlab.ConfigError, match="no adapter named 'x'"):
        sora.effective_ranks(model, "x")
