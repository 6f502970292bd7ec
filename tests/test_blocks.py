"""Composition blocks (peftlab.compose.blocks): Stack, Average, BatchSplit, Parallel, against forwards
computed by hand on a tiny model, and against peftlab's own routing and activation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftlab
from conftest import logits, make_llama, randomize_adapters
from peftlab.compose import Average, BatchSplit, Parallel, Stack, activate
from peftlab.errors import StateError

NAMES = ("a", "b", "c")


def toy():
    """Linear -> ReLU -> Linear with three serial bottleneck (Pfeiffer) adapters on both linears."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
    for name in NAMES:
        peftlab.attach(model, "pfeiffer[bottleneck=3,targets=['re:^(0|2)$']]", name=name)
    return randomize_adapters(model, seed=1, std=0.5).eval()


def bottleneck(model, position: int, name: str, h: torch.Tensor) -> torch.Tensor:
    """up(relu(down(h))) of adapter ``name`` at layer ``position``, written out."""
    adapter = model[position].adapters[name]
    inner = F.relu(h @ adapter.down.weight.T + adapter.down.bias)
    return inner @ adapter.up.weight.T + adapter.up.bias


def by_hand(model, x: torch.Tensor, at_layer) -> torch.Tensor:
    """The toy's forward where ``at_layer(position, h)`` turns each linear's output into the adapted one."""
    base = [model[0].base_layer, model[2].base_layer]
    h = at_layer(0, x @ base[0].weight.T + base[0].bias)
    return at_layer(2, F.relu(h) @ base[1].weight.T + base[1].bias)


def run(model, block, x, **kwargs):
    with activate(model, block, **kwargs), torch.no_grad():
        return model(x)


@pytest.fixture
def x():
    return torch.randn(3, 6, generator=torch.Generator().manual_seed(2))


def test_stack_feeds_each_adapter_the_previous_output(x):
    model = toy()

    def stacked(i, h):
        for name in NAMES:
            h = h + bottleneck(model, i, name, h)
        return h

    torch.testing.assert_close(run(model, Stack("a", "b", "c"), x), by_hand(model, x, stacked), rtol=0, atol=1e-6)
    # order matters for serial adapters
    assert not torch.allclose(run(model, Stack("c", "b", "a"), x), run(model, Stack("a", "b", "c"), x))


def test_average_weighs_the_outputs_of_each_child(x):
    model = toy()

    def averaged(i, h):
        return 0.25 * (h + bottleneck(model, i, "a", h)) + 0.75 * (h + bottleneck(model, i, "b", h))

    torch.testing.assert_close(run(model, Average("a", "b", weights=[1, 3]), x), by_hand(model, x, averaged),
                               rtol=0, atol=1e-6)

    def summed(i, h):  # normalize=False: the weights as given, so the base output counts twice
        return (h + bottleneck(model, i, "a", h)) + (h + bottleneck(model, i, "b", h))

    torch.testing.assert_close(run(model, Average("a", "b", weights=[1, 1], normalize=False), x),
                               by_hand(model, x, summed), rtol=0, atol=1e-6)


def test_blocks_nest(x):
    model = toy()

    def nested(i, h):  # Stack(a, Average(b, c))
        h = h + bottleneck(model, i, "a", h)
        return 0.5 * (h + bottleneck(model, i, "b", h)) + 0.5 * (h + bottleneck(model, i, "c", h))

    torch.testing.assert_close(run(model, Stack("a", Average("b", "c")), x), by_hand(model, x, nested),
                               rtol=0, atol=1e-6)


def test_batch_split_gives_each_child_its_rows(x):
    model = toy()

    def split(i, h):
        first = h[:2] + bottleneck(model, i, "a", h[:2])
        rest = h[2:] + bottleneck(model, i, "b", h[2:])
        return torch.cat([first, rest + bottleneck(model, i, "c", rest)])

    torch.testing.assert_close(run(model, BatchSplit("a", Stack("b", "c"), batch_sizes=[2, 1]), x),
                               by_hand(model, x, split), rtol=0, atol=1e-6)
    with activate(model, BatchSplit("a", "b", batch_sizes=2)), pytest.raises(peftlab.StateError, match="add up"):
        model(x)


def test_parallel_replicates_the_batch_once_per_child(x):
    model = toy()
    out = run(model, Parallel("a", Stack("b", "c")), x)
    assert out.shape == (6, 6)

    def alone(i, h):
        return h + bottleneck(model, i, "a", h)

    def stacked(i, h):
        h = h + bottleneck(model, i, "b", h)
        return h + bottleneck(model, i, "c", h)

    torch.testing.assert_close(out[:3], by_hand(model, x, alone), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[3:], by_hand(model, x, stacked), rtol=0, atol=1e-6)


def test_on_llama_blocks_agree_with_routing_and_activation(ids):
    model = make_llama(initializer_range=0.2)
    for name in NAMES:
        peftlab.attach(model, "houlsby[bottleneck=4]", name=name)
    randomize_adapters(model, seed=3, std=0.2)
    with peftlab.routing(model, ["a", "a", "b"]):
        routed = logits(model, ids)
    with activate(model, BatchSplit("a", "b", batch_sizes=[2, 1])):
        torch.testing.assert_close(logits(model, ids), routed, rtol=0, atol=1e-5)
    alone = {}
    for name in NAMES:
        peftlab.set_active(model, name)
        alone[name] = logits(model, ids)
    mask = torch.ones_like(ids)
    with activate(model, Parallel("a", "b", "c")):
        out = logits(model, ids, attention_mask=mask)
    torch.testing.assert_close(out, torch.cat([alone[n] for n in NAMES]), rtol=0, atol=1e-5)
    peftlab.set_active(model, ["a", "b"])  # peftlab's own multi-adapter activation passes the running output on
    torch.testing.assert_close(run(model, Stack("a", "b"), ids).logits, logits(model, ids), rtol=0, atol=1e-5)


def test_train_names_what_trains_and_remove_restores(x):
    model = toy()
    peftlab.set_active(model, "c")
    before = logits_of(model, x)
    with activate(model, Stack("a", "b"), train=["b"]):
        trainable = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {"b"}
        model(x).sum().backward()
        assert all(p.grad is None for n, p in model.named_parameters() if ".a." in n or ".c." in n)
        assert all(p.grad is not None for n, p in model.named_parameters() if ".b." in n)
        with peftlab.disabled(model):
            torch.testing.assert_close(model(x), by_hand(model, x, lambda i, h: h), rtol=0, atol=1e-6)
    assert peftlab.summary(model)["active"] == ["c"]
    torch.testing.assert_close(logits_of(model, x), before, rtol=0, atol=0)


def test_one_composition_at_a_time_and_set_active_waits_for_its_removal(x):
    model = toy()
    composition = activate(model, Stack("a", "b"))
    with pytest.raises(StateError, match="remove"):
        peftlab.set_active(model, "c")  # would add c's output under the hooks' composition
    with pytest.raises(StateError, match="already active"):
        activate(model, Average("a", "b"))
    composition.remove()
    peftlab.set_active(model, "c")
    assert peftlab.summary(model)["active"] == ["c"]


def logits_of(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("make, message", [
    (lambda: Stack(), "at least one"),
    (lambda: Stack("a", 3), "adapter names and blocks"),
    (lambda: Stack("a", Parallel("b", "c")), "outermost"),
    (lambda: Average("a", "b", weights=[1]), "one number per child"),
    (lambda: Average("a", "b", weights=[1, -1]), "sum to 0"),
    (lambda: BatchSplit("a", "b", batch_sizes=[1]), "one row count"),
    (lambda: BatchSplit("a", "b", batch_sizes=[1, -1]), "one row count"),
])
def test_bad_blocks_fail_clearly(make, message):
    with pytest.raises(peftlab.ConfigError, match=message):
        make()


def test_bad_compositions_fail_clearly(x, ids):
    model = toy()
    with pytest.raises(peftlab.ConfigError, match="no adapter named 'nope'"):
        activate(model, Stack("a", "nope"))
    with pytest.raises(peftlab.ConfigError, match="not in the block"):
        activate(model, Stack("a"), train=["b"])
    with pytest.raises(peftlab.ConfigError, match="composition block"):
        activate(model, ["a", "b"])
    with activate(model, Stack("a")), peftlab.routing(model, ["a", "b", None]):
        with pytest.raises(peftlab.StateError, match="routing"):
            model(x)
    llama = make_llama()
    peftlab.attach(llama, "houlsby", name="a")
    peftlab.attach(llama, "prompt[length=2]", name="p")
    with pytest.raises(peftlab.ConfigError, match="soft prompt"):
        activate(llama, Stack("a", "p"))
