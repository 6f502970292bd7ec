"""MEFT: the two-stream coupling against a hand computation, the inverse, the reversible backward
against ordinary autograd (fp64 and fp32, dropout replayed, other adapters inside the blocks), the
pretrained starting point up to O(lam), activation memory that does not grow with depth, cached
generation, and clear errors."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import make_bert, make_llama
from test_method_properties import batch, perturb
from torch import nn

import peftlab
from peftlab.core import kv_cache, model_adapters
from peftlab.methods import meft

SCALE = {"initializer_range": 0.2}  # meft.EXAMPLE_MODEL_SETTINGS
FACTORIES = {"llama": make_llama,
             "bert": lambda **k: make_bert(**{"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, **k})}


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        return torch.tanh(self.linear(x))


class Toy(nn.Module):
    """A stack of blocks with a transformers-like config: the smallest model meft accepts."""

    def __init__(self, width=6, depth=3):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=width, num_hidden_layers=depth, hidden_act="gelu")
        self.layers = nn.ModuleList(Block(width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def unpadded(arch: str) -> dict:
    """The registry tests' batch without its left padding: transformers' eager Llama attention gives NaN
    for fully masked query rows in fp64."""
    data = batch(arch)
    data["attention_mask"] = torch.ones_like(data["attention_mask"])
    if arch == "llama":
        data["labels"] = data["input_ids"].clone()
    return data


def stack_of(model) -> meft.ReversibleStack:
    return next(m for _, _, m in model_adapters.model_adapters(model) if isinstance(m, meft.ReversibleStack))


def set_reversible(model, on: bool) -> None:
    stack_of(model).reversible = on


def hand_adapter(adapter, x):
    """``W_up gelu(W_down x + b) + c`` with the exact (erf) gelu, written out."""
    h = x @ adapter.down.weight.T + adapter.down.bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return h @ adapter.up.weight.T + adapter.up.bias


def test_the_coupling_is_the_papers_meft1_by_hand():
    torch.manual_seed(0)
    model = Toy().double()
    base = [layer.linear for layer in model.layers]
    peftlab.attach(model, "meft[r=3,lam=0.3,beta=0.7]")
    perturb(model, std=0.3)
    stack = stack_of(model)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        got = model(x)
        x1 = x2 = x
        for n, linear in enumerate(base):
            y1 = 0.3 * x1 + torch.tanh(x2 @ linear.weight.T + linear.bias) + hand_adapter(stack.adapters_f[n], x2)
            y2 = 0.7 * x2 + hand_adapter(stack.adapters_g[n], y1)
            x1, x2 = y2, y1  # the streams switch
    torch.testing.assert_close(got, x2, rtol=0, atol=1e-12)


def test_the_inverse_gives_back_the_inputs():
    torch.manual_seed(0)
    f_adapter, g_adapter = (meft.Bottleneck(6, 3, torch.nn.functional.gelu, {"dtype": torch.float64}) for _ in range(2))
    for adapter in (f_adapter, g_adapter):
        nn.init.normal_(adapter.up.weight, std=0.5)
    block = Block(6).double()
    x1, x2 = torch.randn(2, 4, 6, dtype=torch.float64).unbind(0)
    with torch.no_grad():
        y1, y2 = meft.couple(x1, x2, block(x2), f_adapter, g_adapter, 0.1, 1.0)
        back1, back2 = meft.uncouple(y1, y2, lambda h: block(h) + f_adapter(h), g_adapter, 0.1, 1.0)
    torch.testing.assert_close(back1, x1, rtol=0, atol=1e-12)  # fp64 (the brief's bar: 1e-5)
    torch.testing.assert_close(back2, x2, rtol=0, atol=1e-12)
    with torch.no_grad():  # fp32: the division by lam amplifies rounding by 1/lam
        f32 = [m.float() for m in (f_adapter, g_adapter, block)]
        y1, y2 = meft.couple(x1.float(), x2.float(), f32[2](x2.float()), f32[0], f32[1], 0.1, 1.0)
        back1, _ = meft.uncouple(y1, y2, lambda h: f32[2](h) + f32[0](h), f32[1], 0.1, 1.0)
    torch.testing.assert_close(back1, x1.float(), rtol=0, atol=1e-5)


def gradients(model, data) -> dict:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    model(**data, **({"use_cache": False} if "labels" in data and data["labels"].dim() == 2 else {})).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def reversible_and_plain_gradients(model, data):
    model.train()
    set_reversible(model, True)
    reversible = gradients(model, data)
    set_reversible(model, False)
    plain = gradients(model, data)
    assert plain and reversible.keys() == plain.keys()
    return reversible, plain


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_the_reversible_backward_gives_the_gradients_of_ordinary_autograd(arch):
    model = peftlab.attach(FACTORIES[arch](**SCALE).double(), "meft")
    perturb(model)
    reversible, plain = reversible_and_plain_gradients(model, unpadded(arch))
    for name in plain:
        torch.testing.assert_close(reversible[name], plain[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_fp32_gradients_match_to_rounding(arch):
    model = peftlab.attach(FACTORIES[arch](**SCALE), "meft")
    perturb(model)
    reversible, plain = reversible_and_plain_gradients(model, batch(arch))
    for name in plain:
        scale = plain[name].abs().max().item()
        torch.testing.assert_close(reversible[name], plain[name], rtol=0, atol=1e-4 * max(scale, 1e-3), msg=name)


def test_dropout_is_replayed_in_the_recomputation():
    model = peftlab.attach(make_bert(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2, **SCALE).double(), "meft")
    perturb(model)
    reversible, plain = reversible_and_plain_gradients(model, unpadded("bert"))
    for name in plain:
        torch.testing.assert_close(reversible[name], plain[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("spec", ["lora[r=2]|meft", "prompt[length=3]|meft"])
def test_other_trainable_parameters_get_their_gradients_through_the_reversible_path(spec):
    """LoRA inside the blocks (recomputed with them) and a soft prompt below them (through the inputs)."""
    model = peftlab.attach(make_llama(**SCALE).double(), spec)
    perturb(model)
    reversible, plain = reversible_and_plain_gradients(model, unpadded("llama"))
    assert any("lora" in n or "prompt" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(reversible[name], plain[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("settings", ["reversible_blocks=2", "anchor_every=2", "anchor_every=1,reversible_blocks=3"])
def test_partly_reversible_and_anchored_stacks_give_the_same_gradients(settings):
    model = peftlab.attach(make_llama(num_hidden_layers=5, **SCALE).double(), f"meft[{settings}]")
    perturb(model)
    reversible, plain = reversible_and_plain_gradients(model, unpadded("llama"))
    for name in plain:
        torch.testing.assert_close(reversible[name], plain[name], rtol=1e-9, atol=1e-12, msg=name)


def test_an_overflowing_reconstruction_is_a_clear_error():
    model = peftlab.attach(make_llama(num_hidden_layers=4, **SCALE), "meft[lam=1e-20]")
    perturb(model)
    model.train()
    loss = model(**batch("llama"), use_cache=False).loss
    with pytest.raises(peftlab.StateError, match="overflowed.*reversible_blocks"):
        loss.backward()


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_the_model_starts_at_the_pretrained_one_up_to_order_lam(arch):
    data = unpadded(arch)
    inputs = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}

    def final_hidden(model):
        with torch.no_grad():
            return model(**inputs, output_hidden_states=True).hidden_states[-1]

    base = final_hidden(FACTORIES[arch](**SCALE).double())
    gaps = {}
    for lam in (0.1, 0.01, 0.001):
        got = final_hidden(peftlab.attach(FACTORIES[arch](**SCALE).double(), f"meft[lam={lam}]"))
        gaps[lam] = ((got - base).norm() / base.norm()).item()
    assert gaps[0.1] < 0.25  # the paper's approximation at its lam: a relative gap of a few percent here
    for big, small in ((0.1, 0.01), (0.01, 0.001)):
        assert 5 < gaps[big] / gaps[small] < 20, gaps  # and it shrinks like lam


def saved_activation_bytes(model, data) -> int:
    params = {p.data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**data, use_cache=False).loss
    loss.backward()
    return sum(saved)


def test_activation_memory_does_not_grow_with_depth():
    data = batch("llama")
    measured = {}
    for reversible in (True, False):
        for depth in (2, 6):
            model = peftlab.attach(make_llama(num_hidden_layers=depth, **SCALE), f"meft[reversible={reversible}]")
            model.train()
            measured[reversible, depth] = saved_activation_bytes(model, data)
    assert measured[True, 2] == measured[True, 6]  # the blocks keep nothing; only the head's input is kept
    assert measured[False, 6] > measured[False, 2] + 3 * (measured[False, 2] - measured[True, 2]) / 2
    assert measured[True, 6] < measured[False, 6] / 4


def test_cached_generation_equals_full_forwards():
    model = peftlab.attach(make_llama(**SCALE), "meft")
    perturb(model)
    model.eval()
    prompt = batch("llama")["input_ids"][:2]
    cached = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True)
    full = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, full)


def test_a_forward_with_gradients_and_a_cache_still_fills_the_cache():
    model = peftlab.attach(make_llama(**SCALE), "meft")
    perturb(model)
    ids = batch("llama")["input_ids"][:1]
    out = model(ids[:, :-1], use_cache=True)  # gradients on: the reversible path
    cache = {kv_cache.keyword(model): kv_cache.from_output(out)}
    step = model(ids[:, -1:], **cache).logits[:, -1]
    with torch.no_grad():
        full = model(ids).logits[:, -1]
    torch.testing.assert_close(step.detach(), full, rtol=0, atol=1e-5)


def test_disabled_is_the_base_model_and_delete_removes_every_hook():
    base = make_llama(**SCALE)
    model = peftlab.attach(make_llama(**SCALE), "meft")
    perturb(model)
    ids = batch("llama")["input_ids"]
    with torch.no_grad(), peftlab.disabled(model):
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)
    peftlab.delete(model, "default")
    assert not any(layer._forward_hooks or layer._forward_pre_hooks for layer in model.model.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)


def test_a_second_backward_through_the_same_graph_is_a_clear_error():
    model = peftlab.attach(make_llama(**SCALE), "meft")
    model.train()
    loss = model(**batch("llama"), use_cache=False).loss
    loss.backward(retain_graph=True)
    with pytest.raises(peftlab.StateError, match="once per forward"):
        loss.backward()


def test_clear_errors():
    with pytest.raises(peftlab.ConfigError, match="lam must be a positive number"):
        peftlab.attach(make_llama(), "meft[lam=0]")
    with pytest.raises(peftlab.ConfigError, match="r .the adapters' bottleneck"):
        peftlab.attach(make_llama(), "meft[r=0]")
    with pytest.raises(peftlab.ConfigError, match="anchor_every"):
        peftlab.attach(make_llama(), "meft[anchor_every=0]")
    with pytest.raises(peftlab.ConfigError, match="reversible_blocks"):
        peftlab.attach(make_llama(), "meft[reversible_blocks=-1]")
    with pytest.raises(peftlab.TargetError, match="hidden_size and num_hidden_layers"):
        peftlab.attach(nn.Sequential(nn.Linear(4, 4)), "meft")
    model = peftlab.attach(make_llama(), "meft", name="a")
    peftlab.attach(model, "meft", name="b")
    peftlab.set_active(model, ["a", "b"])
    with pytest.raises(peftlab.StateError, match="two meft adapters"):
        model(batch("llama")["input_ids"])
    for name in ("b", "a"):  # a failed forward leaves nothing behind
        peftlab.set_active(model, name)
        model(batch("llama")["input_ids"])
