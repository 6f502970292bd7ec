"""AdaMix (Wang et al., 2022): M bottleneck adapters per position, a random pair per training forward,
their averaged weights at inference, and a consistency loss between two random pairs.

Each property is checked against a hand computation: a training forward is exactly one random
(down, up) expert pair; eval mode is exactly a single Houlsby adapter holding the experts' mean
weights; the consistency term is the hand-computed squared difference of two pairs' outputs.
"""
from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_llama

import peftlab
from peftlab.core import adapters as core
from peftlab.methods import adamix
from peftlab.train import TrainConfig, train

SCALE = dict(initializer_range=0.2)


def perturbed(model, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in core.all_adapters(model):
            for p in adapter.parameters():
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def layers(model):
    return [(name, layer.adapters["default"]) for name, layer in core.adapter_layers(model, "default")]


def ids():
    return torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def by_hand(adapter, h, i, j):
    down, up = adapter.down.experts[i], adapter.up.experts[j]
    return torch.relu(h @ down.weight.T + down.bias) @ up.weight.T + up.bias


# ---- the defining properties ---------------------------------------------------------------------

def test_a_training_forward_uses_one_random_down_and_up_expert():
    model = perturbed(peftlab.attach(make_llama(**SCALE), "adamix[experts=3,bottleneck=4]"))
    model.train()
    _, adapter = layers(model)[0]
    h = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    seen = set()
    with torch.no_grad():
        for step in range(60):
            torch.manual_seed(step)
            out = adapter(None, h)
            i, j = adapter.last_pair
            torch.testing.assert_close(out, by_hand(adapter, h, i, j), rtol=1e-5, atol=1e-5)
            seen.add((i, j))
            torch.manual_seed(step)  # the draw is torch's: the same seed, the same pair
            adapter(None, h)
            assert adapter.last_pair == (i, j)
    assert {i for i, _ in seen} == {j for _, j in seen} == {0, 1, 2}  # down and up are drawn independently
    assert len(seen) > 3


def test_every_adapter_draws_its_own_pair_in_a_model_forward():
    model = perturbed(peftlab.attach(make_llama(**SCALE), "adamix[experts=4]"))
    model.train()
    pairs = []
    for seed in range(5):
        torch.manual_seed(seed)
        model(input_ids=ids())
        pairs.append(tuple(a.last_pair for _, a in layers(model)))
    assert len(layers(model)) == 4  # attn-out and ffn-out of both layers
    assert len({p for forward in pairs for p in forward}) > 4


def test_eval_is_one_adapter_holding_the_experts_average():
    model = perturbed(peftlab.attach(make_llama(**SCALE), "adamix[experts=3,bottleneck=4]"))
    single = peftlab.attach(make_llama(**SCALE), "houlsby[bottleneck=4]")
    with torch.no_grad():
        for (name, experts), (other, plain) in zip(layers(model), layers(single)):
            assert name == other
            for mine, theirs in ((experts.down, plain.down), (experts.up, plain.up)):
                theirs.weight.copy_(sum(e.weight for e in mine.experts) / 3)
                theirs.bias.copy_(sum(e.bias for e in mine.experts) / 3)
            down, up = adamix.averaged_adapter(experts)
            torch.testing.assert_close(down.weight, plain.down.weight)
            torch.testing.assert_close(up.bias, plain.up.bias)
    model.eval(), single.eval()
    with torch.no_grad():
        expected = single(input_ids=ids()).logits
        torch.testing.assert_close(model(input_ids=ids()).logits, expected, rtol=1e-5, atol=1e-5)
        with peftlab.disabled(single):
            assert not torch.allclose(single(input_ids=ids()).logits, expected, atol=1e-4)  # the adapters matter


def test_the_consistency_loss_compares_two_random_pairs_on_the_same_input():
    model = perturbed(peftlab.attach(make_llama(**SCALE), "adamix[experts=3,consistency=0.5]"))
    model.train()
    torch.manual_seed(0)
    model(input_ids=ids())
    seen = [(adapter, *adapter.seen) for _, adapter in layers(model)]
    state = torch.get_rng_state()
    penalty = core.regularization(model)
    torch.set_rng_state(state)
    terms = []
    with torch.no_grad():
        for adapter, h, (i, j) in seen:
            i2, j2 = int(torch.randint(3, ())), int(torch.randint(3, ()))
            terms.append((by_hand(adapter, h, i, j) - by_hand(adapter, h, i2, j2)).pow(2).mean())
    torch.testing.assert_close(penalty.detach(), 0.5 * torch.stack(terms).mean())
    penalty.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, a in layers(model) for p in a.up.parameters())
    assert core.regularization(model) is None  # consumed: nothing until the next training forward
    model.eval()
    model(input_ids=ids())
    assert core.regularization(model) is None  # inference records nothing


def test_consistency_zero_adds_no_loss_and_the_trainer_runs_with_it():
    model = peftlab.attach(make_llama(**SCALE), "adamix[consistency=0]")
    model.train()
    model(input_ids=ids())
    assert core.regularization(model) is None
    model = peftlab.attach(make_llama(**SCALE), "adamix")
    rows = [{"input_ids": r, "labels": r} for r in ids()]
    result = train(model, rows, TrainConfig(lr=1e-2, steps=3, batch_size=2, warmup_steps=0, progress=False, device="cpu"))
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_a_shared_projection_is_one_expert_on_that_side():
    model = peftlab.attach(make_llama(**SCALE), "adamix[experts=3,share=up]")
    model.train()
    _, adapter = layers(model)[0]
    assert (len(adapter.down.experts), len(adapter.up.experts)) == (3, 1)
    h = torch.randn(2, 5, 32)
    pairs = set()
    for seed in range(20):
        torch.manual_seed(seed)
        adapter(None, h)
        pairs.add(adapter.last_pair)
    assert {j for _, j in pairs} == {0} and {i for i, _ in pairs} == {0, 1, 2}


def test_bad_settings_fail_clearly():
    with pytest.raises(peftlab.ConfigError, match="experts"):
        peftlab.attach(make_llama(), "adamix[experts=1.5]")
    with pytest.raises(peftlab.ConfigError, match="consistency"):
        peftlab.attach(make_llama(), "adamix[consistency=true]")


def test_routing_sends_each_row_through_its_own_adapter():
    model = perturbed(peftlab.attach(make_llama(**SCALE), "adamix"))
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids()).logits
        with peftlab.disabled(model):
            base = model(input_ids=ids()).logits
        with peftlab.routing(model, ["default", None]):
            routed = model(input_ids=ids()).logits
    torch.testing.assert_close(routed[0], adapted[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(routed[1], base[1], rtol=1e-5, atol=1e-5)
