"""Ladder side tuning: the backbone runs without gradients and keeps nothing for backward; the side
network trains and lowers the loss; grad mode comes back even when the backbone fails; the
token-wise side network makes cached decoding equal full forwards."""
from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_bert, make_llama
from test_method_properties import perturb

import peftlab
from peftlab.core import kv_cache
from peftlab.core.model_adapters import backbone
from peftlab.train import TrainConfig, train
from peftlab.train.loss import training_loss

SCALE = {"initializer_range": 0.2}  # weights at a pretrained scale (see ladder.EXAMPLE_MODEL_SETTINGS)


def lm_batch(rows=4, length=8, seed=0):
    ids = torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def side_parameters(model):
    return {n: p for n, p in model.named_parameters() if "peftlab_model_adapters" in n}


@pytest.mark.parametrize("factory", [make_llama, make_bert], ids=["llama", "bert"])
def test_the_backbone_builds_no_graph_while_the_side_network_trains(factory):
    model = peftlab.attach(factory(**SCALE), "ladder[reduction=4]")
    perturb(model)  # the up-projection starts at zero: give every side parameter a gradient
    model.train()
    stack = backbone(model)
    layers = [m for m in stack.modules() if type(m).__name__.endswith("Layer") and hasattr(m, "gradient_checkpointing")]
    grad_modes, inside, saved_inside = [], [], []
    for layer in layers:
        layer.register_forward_hook(lambda module, args, output: grad_modes.append(torch.is_grad_enabled()))
    def leave(module, args, output):
        inside.pop()

    stack.register_forward_pre_hook(lambda module, args: inside.append(True))
    stack.register_forward_hook(leave, prepend=True)  # before the side network runs, in the model-level hook

    def pack(t):
        if inside:
            saved_inside.append(tuple(t.shape))
        return t

    batch = lm_batch() if factory is make_llama else {**lm_batch(), "labels": torch.tensor([0, 1, 2, 0])}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = training_loss(model, batch)
    loss.backward()
    assert len(grad_modes) == len(layers) == 2 and not any(grad_modes)
    assert saved_inside == []  # no backbone activation is kept for backward
    assert torch.is_grad_enabled()  # and gradients are on again for the side network and the loss
    assert all(p.grad is None for n, p in model.named_parameters() if n not in side_parameters(model))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in side_parameters(model).values())


def test_the_side_network_trains_and_lowers_the_loss_with_the_backbone_untouched():
    model = peftlab.attach(make_llama(**SCALE), "ladder")
    base = {n: p.detach().clone() for n, p in model.named_parameters() if n not in side_parameters(model)}
    rows = [{k: v[i] for k, v in lm_batch().items()} for i in range(4)]
    result = train(model, rows, TrainConfig(lr=3e-3, steps=30, batch_size=4, warmup_steps=0, schedule="constant",
                                            progress=False, device="cpu"))
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3 * 0.95, result.losses
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)


def test_grad_mode_comes_back_when_the_backbone_fails():
    model = peftlab.attach(make_llama(), "ladder")
    model.train()
    with pytest.raises(IndexError):
        model(input_ids=torch.tensor([[VOCAB + 5]]))  # no such token
    assert torch.is_grad_enabled()


def test_cached_decoding_equals_full_forwards():
    model = peftlab.attach(make_llama(**SCALE), "ladder")
    perturb(model)
    model.eval()
    ids = lm_batch()["input_ids"]
    with torch.no_grad():
        full = model(input_ids=ids).logits
        first = model(input_ids=ids[:, :5], use_cache=True)
        rest = model(input_ids=ids[:, 5:], **{kv_cache.keyword(model): kv_cache.from_output(first)}).logits
    torch.testing.assert_close(torch.cat([first.logits, rest], 1), full, rtol=0, atol=1e-5)
    assert model(input_ids=ids).hidden_states is None  # the rungs are read, not returned unless asked
    assert len(model(input_ids=ids, output_hidden_states=True).hidden_states) == 3


def test_a_union_with_an_adapter_inside_the_backbone_is_refused():
    model = peftlab.attach(make_llama(), "lora[r=2]|ladder")
    model.train()
    with pytest.raises(peftlab.StateError, match="runs the backbone without gradients.*trainable"):
        model(**lm_batch())


def test_bad_settings_say_what_to_do():
    with pytest.raises(peftlab.ConfigError, match="reduction=64 leaves no width of a hidden size of 32"):
        peftlab.attach(make_llama(), "ladder[reduction=64]")
    with pytest.raises(peftlab.TargetError, match="needs a transformers model"):
        peftlab.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)), "ladder")


def test_two_ladders_active_together_both_train_and_grad_mode_comes_back():
    model = peftlab.attach(make_llama(**SCALE), "ladder", name="a")
    peftlab.attach(model, "ladder[reduction=4]", name="b")
    perturb(model)
    peftlab.set_active(model, ["a", "b"])
    model.train()
    model(**lm_batch()).loss.backward()
    assert torch.is_grad_enabled()
    assert all(p.grad is not None for p in side_parameters(model).values())
