"""MerA (He et al., 2023): trained bottleneck adapters aligned unit by unit, averaged into one, then tuned.

Defining properties: sources that are permutations of each other are recognised as such (weight and
activation alignment both recover the permutation, and the merge is the original adapter); for
unrelated sources the merge is the average of source 0 and the other source permuted by the best
permutation found by brute force. Also: the assignment solver against scipy, sources from saved
folders, loading without the sources, training only the merged adapter, clear errors.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import VOCAB, make_llama

import peftlab
from peftlab.core import adapters as core
from peftlab.core.state import get_state
from peftlab.methods import mera
from peftlab.train import TrainConfig, train

SCALE = dict(initializer_range=0.2)
PERM = torch.tensor([2, 0, 3, 1])


def adapter_of(model, name):
    return {m: layer.adapters[name] for m, layer in core.adapter_layers(model, name)}


def weights(adapter):
    return [adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias]


def randomized(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adapter_of(model, name).values():
            for p in adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def with_sources(spec="pfeiffer[bottleneck=4]", permuted=True):
    """A model with adapter 'a' (random) and 'b': a with its hidden units permuted by PERM, or another random one."""
    model = make_llama(**SCALE)
    peftlab.attach(model, spec, name="a")
    randomized(model, "a", 0)
    peftlab.attach(model, spec, name="b")
    randomized(model, "b", 1)
    if permuted:
        with torch.no_grad():
            for module, b in adapter_of(model, "b").items():
                a = adapter_of(model, "a")[module]
                b.down.weight.copy_(a.down.weight[PERM])
                b.down.bias.copy_(a.down.bias[PERM])
                b.up.weight.copy_(a.up.weight[:, PERM])
                b.up.bias.copy_(a.up.bias)
    return model


def ids():
    return torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model, name):
    peftlab.set_active(model, name)
    with torch.no_grad():
        return model(input_ids=ids()).logits


# ---- the defining properties ---------------------------------------------------------------------

def test_weight_alignment_recovers_the_permutation_and_the_merge_is_the_original():
    model = with_sources()
    for module, a in adapter_of(model, "a").items():
        b = adapter_of(model, "b")[module]
        perm = mera.match_units(mera.unit_features(*weights(a)[:3]) @ mera.unit_features(*weights(b)[:3]).T)
        assert torch.equal(perm, torch.argsort(PERM))  # b's unit perm[k] is a's unit k
    peftlab.attach(model, "mera[sources=[a,b]]")
    for module, merged in adapter_of(model, "default").items():
        for got, want in zip(weights(merged), weights(adapter_of(model, "a")[module])):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, "default"), logits(model, "a"), rtol=0, atol=1e-5)
    adapted = logits(model, "a")
    with peftlab.disabled(model), torch.no_grad():
        assert not torch.allclose(model(input_ids=ids()).logits, adapted, atol=1e-4)  # the adapter matters


def test_activation_alignment_recovers_the_permutation_from_the_training_batches():
    model = with_sources()
    peftlab.attach(model, "mera[sources=[a,b],align=activation]")
    with torch.no_grad():  # start the merged adapter away from the answer, so the realignment must find it
        for adapter in adapter_of(model, "default").values():
            for p in adapter.parameters():
                p.zero_()
    batches = [{"input_ids": ids(), "labels": ids()}]
    core.calibrate(model, batches, lambda m, b: m(**b).loss)
    for module, merged in adapter_of(model, "default").items():
        for got, want in zip(weights(merged), weights(adapter_of(model, "a")[module])):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    config = get_state(model).configs["default"][0]
    assert config.calibrated and not list(core.active_hooks(model, "calibrate"))  # once only


def test_the_merge_is_the_hand_averaged_best_aligned_weights():
    model = with_sources(permuted=False)
    peftlab.attach(model, "mera[sources=[a,b]]")
    hand = {}
    for module, a in adapter_of(model, "a").items():
        b = adapter_of(model, "b")[module]
        fa = [torch.cat([a.down.weight[k], a.down.bias[k:k + 1], a.up.weight[:, k]]) for k in range(4)]
        fb = [torch.cat([b.down.weight[k], b.down.bias[k:k + 1], b.up.weight[:, k]]) for k in range(4)]
        best = max(itertools.permutations(range(4)), key=lambda p: sum(float(fa[k] @ fb[p[k]]) for k in range(4)))
        best = list(best)
        hand[module] = [(a.down.weight + b.down.weight[best]) / 2, (a.down.bias + b.down.bias[best]) / 2,
                        (a.up.weight + b.up.weight[:, best]) / 2, (a.up.bias + b.up.bias) / 2]
        for got, want in zip(weights(adapter_of(model, "default")[module]), hand[module]):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    peftlab.attach(model, "pfeiffer[bottleneck=4]", name="hand")
    with torch.no_grad():
        for module, adapter in adapter_of(model, "hand").items():
            for p, value in zip(weights(adapter), hand[module]):
                p.copy_(value)
    torch.testing.assert_close(logits(model, "default"), logits(model, "hand"), rtol=1e-5, atol=1e-5)
    naive = [(x + y) / 2 for x, y in zip(weights(adapter_of(model, "a")[module]), weights(adapter_of(model, "b")[module]))]
    assert not torch.allclose(naive[0], hand[module][0])  # the alignment mattered here


def test_activation_alignment_averages_the_best_matched_units_by_hand():
    """The permutation maximising the summed dot products of matched units' activations act(D h + d)
    over the batches' tokens (h: the base model's output there), by brute force."""
    model = with_sources(permuted=False)
    peftlab.attach(model, "mera[sources=[a,b],align=activation]")
    inputs = {}
    hooks = [layer.base_layer.register_forward_hook(lambda mod, args, out, m=m: inputs.__setitem__(m, out.reshape(-1, 32)))
             for m, layer in core.adapter_layers(model, "default")]
    with peftlab.disabled(model), torch.no_grad():
        model(input_ids=ids())
    for hook in hooks:
        hook.remove()
    core.calibrate(model, [{"input_ids": ids(), "labels": ids()}], lambda m, b: m(**b).loss)
    for module, h in inputs.items():
        a, b = adapter_of(model, "a")[module], adapter_of(model, "b")[module]
        with torch.no_grad():
            acts_a, acts_b = torch.relu(h @ a.down.weight.T + a.down.bias), torch.relu(h @ b.down.weight.T + b.down.bias)
            best = list(max(itertools.permutations(range(4)),
                            key=lambda p: sum(float(acts_a[:, k] @ acts_b[:, p[k]]) for k in range(4))))
            hand = [(a.down.weight + b.down.weight[best]) / 2, (a.down.bias + b.down.bias[best]) / 2,
                    (a.up.weight + b.up.weight[:, best]) / 2, (a.up.bias + b.up.bias) / 2]
        for got, want in zip(weights(adapter_of(model, "default")[module]), hand):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_the_hungarian_fallback_agrees_with_scipy():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 9, 16):
        for _ in range(5):
            cost = rng.normal(size=(n, n))
            rows, cols = scipy_optimize.linear_sum_assignment(cost)
            np.testing.assert_array_equal(mera.hungarian(cost), cols[np.argsort(rows)])


def test_without_scipy_the_own_solver_matches_units(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "scipy.optimize", None)  # import fails as if scipy were absent
    similarity = torch.randn(6, 6, generator=torch.Generator().manual_seed(3))
    best = max(itertools.permutations(range(6)), key=lambda p: sum(float(similarity[k, p[k]]) for k in range(6)))
    assert mera.match_units(similarity).tolist() == list(best)


# ---- sources on disk, loading, training ----------------------------------------------------------

def test_saved_folders_are_sources_and_a_saved_merge_loads_without_them(tmp_path):
    model = with_sources("houlsby[bottleneck=4]", permuted=False)
    folders = [peftlab.save(model, tmp_path / n, n) for n in ("a", "b")]
    peftlab.attach(model, "mera[sources=[a,b]]")
    expected = logits(model, "default")
    fresh = make_llama(**SCALE)
    peftlab.attach(fresh, f"mera[sources=[{folders[0]},{folders[1]}]]")
    torch.testing.assert_close(logits(fresh, "default"), expected, rtol=0, atol=1e-6)
    peftlab.save(model, tmp_path / "merged")
    for folder in folders:
        for file in folder.iterdir():
            file.unlink()
    loaded = peftlab.load(make_llama(**SCALE), tmp_path / "merged")
    torch.testing.assert_close(logits(loaded, "default"), expected, rtol=0, atol=1e-6)


def test_training_moves_only_the_merged_adapter():
    model = with_sources(permuted=False)
    peftlab.attach(model, "mera[sources=[a,b]]")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = [{"input_ids": r, "labels": r} for r in ids()]
    train(model, rows, TrainConfig(lr=1e-2, steps=2, batch_size=2, warmup_steps=0, progress=False, device="cpu"))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".adapters.default." in k for k in changed), sorted(changed)


# ---- errors ------------------------------------------------------------------------------------

def test_bad_sources_fail_clearly():
    model = with_sources(permuted=False)
    peftlab.attach(model, "pfeiffer[bottleneck=8]", name="wide")
    peftlab.attach(model, "lora", name="low")
    peftlab.attach(model, "houlsby[bottleneck=4]", name="houlsby")
    with pytest.raises(peftlab.IncompatibleBaseError, match="other shapes"):
        peftlab.attach(model, "mera[sources=[a,wide]]", name="m")
    with pytest.raises(peftlab.ConfigError, match="plain bottleneck adapters"):
        peftlab.attach(model, "mera[sources=[a,low]]", name="m")
    with pytest.raises(peftlab.ConfigError, match="merge adapters of one kind"):
        peftlab.attach(model, "mera[sources=[a,houlsby]]", name="m")
    with pytest.raises(peftlab.ConfigError, match="neither an adapter attached"):
        peftlab.attach(model, "mera[sources=[a,nowhere]]", name="m")
    with pytest.raises(peftlab.ConfigError, match="at least two"):
        peftlab.attach(model, "mera[sources=[a]]", name="m")
