"""Mixed-adapter batches: each row through its own adapter (or the base), grouped once."""
from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, logits, make_llama, randomize_adapters
from hypothesis import given, settings
from hypothesis import strategies as st

import peftlab
from peftlab.core import adapters as core_adapters
from peftlab.core.layer import AdapterLayer
from peftlab.core.routing import Routing

ROWS = 6
_IDS = torch.randint(3, VOCAB, (ROWS, 7), generator=torch.Generator().manual_seed(7))


def _model():
    model = make_llama()
    peftlab.attach(model, "lora[r=4,targets=[q_proj,v_proj,down_proj,embed_tokens]]", name="x")
    peftlab.attach(model, "lora[r=2,targets=[q_proj,k_proj,gate_proj],dropout=0.1]", name="y")
    # PiSSA (which changes the base weight) before DoRA (which reads it) on the shared up_proj
    peftlab.attach(model, "lora[r=2,init=pissa,targets=[q_proj,up_proj,lm_head]]", name="p")
    peftlab.attach(model, "dora[r=2,targets=[o_proj,up_proj]]", name="d")
    randomize_adapters(model, seed=11)
    return model


_CACHE = {}


def _setup():
    """One model and each adapter's full-batch logits, shared by the property test's examples."""
    if not _CACHE:
        model = _model()
        refs = {}
        for name in ("x", "y", "d", "p"):
            peftlab.set_active(model, name)
            refs[name] = logits(model, _IDS)
        with peftlab.disabled(model):
            refs[None] = logits(model, _IDS)
        _CACHE.update(model=model, refs=refs)
    return _CACHE["model"], _CACHE["refs"]


def _expected(refs, rows):
    return torch.stack([refs[name][i] for i, name in enumerate(rows)])


def test_each_row_equals_its_adapter_alone():
    model, refs = _setup()
    rows = ["x", "y", None, "x", "d", "p"]
    assert not torch.allclose(refs["x"], refs["y"], atol=1e-3) and not torch.allclose(refs["x"], refs[None], atol=1e-3)
    with peftlab.routing(model, rows):
        out = logits(model, _IDS)
    torch.testing.assert_close(out, _expected(refs, rows), rtol=0, atol=1e-5)
    # the routing ends with the block
    torch.testing.assert_close(logits(model, _IDS), refs[peftlab.summary(model)["active"][0]], rtol=0, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(["x", "y", "d", "p", None]), min_size=1, max_size=ROWS))
def test_random_routings(rows):
    model, refs = _setup()
    with peftlab.routing(model, rows):
        out = logits(model, _IDS[: len(rows)])
    torch.testing.assert_close(out, _expected(refs, rows), rtol=0, atol=1e-5)


def test_routing_generate_with_left_padding():
    model = make_llama()
    peftlab.attach(model, "lora[r=4,targets=[q_proj,v_proj,up_proj]]", name="x")
    peftlab.attach(model, "lora[r=4,targets=[k_proj,o_proj,down_proj]]", name="y")
    randomize_adapters(model, seed=2, std=0.3)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (4, 6), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # left padding
    ids[3, :3], mask[3, :3] = 0, 0
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=8, pad_token_id=0,
                  return_dict_in_generate=True, output_scores=True)

    def generate():
        with torch.no_grad():
            out = model.generate(ids, **kwargs)
        return out.sequences, torch.stack(out.scores, 1)

    refs = {}
    for name in ("x", "y"):
        peftlab.set_active(model, name)
        refs[name] = generate()
    with peftlab.disabled(model):
        refs[None] = generate()
    assert not torch.equal(refs["x"][0], refs["y"][0]), "the adapters should change the greedy output"
    rows = ["x", "y", None, "x"]
    with peftlab.routing(model, rows):
        sequences, scores = generate()
    for i, name in enumerate(rows):
        assert torch.equal(sequences[i], refs[name][0][i]), f"row {i} ({name})"
        torch.testing.assert_close(scores[i], refs[name][1][i], rtol=0, atol=1e-5)


def test_grouping_is_computed_once_and_reused(monkeypatch):
    """One Routing per block; every layer of every forward (and decoding step) gets the very
    same segment tensors from it, and no layer sorts the rows again."""
    model = _model()
    built, served = [], []

    class CountingRouting(Routing):
        def __init__(self, rows):
            built.append(rows)
            super().__init__(rows)

        def segments(self, device):
            result = super().segments(device)
            served.append(result)
            return result

    monkeypatch.setattr(core_adapters, "Routing", CountingRouting)
    n_layers = sum(isinstance(m, AdapterLayer) for m in model.modules())
    ids = _IDS[:4]
    with peftlab.routing(model, ["x", "p", None, "x"]):
        sorts = []
        real_sort = torch.sort
        monkeypatch.setattr(torch, "sort", lambda *a, **k: sorts.append(1) or real_sort(*a, **k))
        logits(model, ids)
        assert len(served) == n_layers
        with torch.no_grad():
            model.generate(ids, do_sample=False, max_new_tokens=3, pad_token_id=0, attention_mask=torch.ones_like(ids))
        monkeypatch.setattr(torch, "sort", real_sort)
    assert len(built) == 1
    assert len(served) == n_layers * (1 + 3)
    assert all(s is served[0] for s in served), "every layer must reuse one grouping"
    assert sorts == [], "no regrouping inside the forward"
    assert {k: v.tolist() for k, v in served[0].items()} == {"x": [0, 3], "p": [1]}


def test_routing_segments():
    r = Routing(["b", None, "a", "b", None])
    segs = r.segments(torch.device("cpu"))
    assert {k: v.tolist() for k, v in segs.items()} == {"a": [2], "b": [0, 3]}
    assert r.segments(torch.device("cpu")) is segs
    assert r.uses("a") and not r.uses("c") and not r.whole_batch("b") and Routing(["a", "a"]).whole_batch("a")


def test_routing_wrong_batch_size():
    model, _ = _setup()
    with peftlab.routing(model, ["x", "y"]):
        with pytest.raises(peftlab.StateError, match="routing names 2 rows but the batch has 3"):
            logits(model, _IDS[:3])


def test_routing_unknown_adapter():
    model, _ = _setup()
    with pytest.raises(peftlab.ConfigError, match="no adapter named 'q'"):
        with peftlab.routing(model, ["x", "q"]):
            pass


def test_routing_while_merged():
    model = make_llama()
    peftlab.attach(model, "lora[r=2,targets=q_proj]", name="x")
    peftlab.attach(model, "lora[r=2,targets=v_proj]", name="y")
    peftlab.merge(model, "x")
    with pytest.raises(peftlab.StateError, match="merged"):
        with peftlab.routing(model, ["y", None]):
            pytest.fail("entering the block should already fail")
    model._peftlab_state.merged.clear()  # even if the state slipped past the entry check,
    model._peftlab_state.merged.append("x")  # a layer holding a merged adapter refuses to route
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    model._peftlab_state.routing = Routing(["y", None])
    with pytest.raises(peftlab.StateError, match="merged"):
        layer(torch.randn(2, 3, 32))
    model._peftlab_state.routing = None
    peftlab.unmerge(model, "x")
    with peftlab.routing(model, ["y", None]):
        logits(model, _IDS[:2])


def test_routing_needs_a_list():
    model, _ = _setup()
    with pytest.raises(peftlab.ConfigError, match="one adapter name"):
        with peftlab.routing(model, "x"):
            pass
    with pytest.raises(peftlab.ConfigError, match="empty list"):
        with peftlab.routing(model, []):
            pass
    with peftlab.routing(model, (n for n in ["x", None])):  # any iterable, read once
        out = logits(model, _IDS[:2])
    _, refs = _setup()
    torch.testing.assert_close(out, _expected(refs, ["x", None]), rtol=0, atol=1e-5)
