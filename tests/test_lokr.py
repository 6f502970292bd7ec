"""LoKr: a Kronecker product whose factors follow PEFT's shape rules (full or rank-r), computed
without forming the product; merging; and HF PEFT's LOKR format checked against the real ``peft``
package both ways."""
from __future__ import annotations


import peft
import pytest
import torch
from conftest import (
    assert_config_edit_is_a_format_error, assert_peft_adapter_loads_and_goes_back,
    assert_peftlab_file_loads_in_peft, logits, make_bert, make_gpt2, make_llama, peft_adapter_file,
    peft_logits, read_adapter_config,
)
from peft.tuners.lokr.layer import factorization as peft_factorization

import peftlab
from peftlab.methods import lokr

Q0, DOWN0 = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"


def randomize(model, seed: int = 0, std: float = 0.3):
    """Every LoKr factor (peftlab's or peft's) to random values, so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lokr_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def adapter(model, name=Q0):
    return model.get_submodule(name).adapters["default"]


def shapes(a) -> dict:
    return {k: tuple(v.shape) for k, v in a.state_dict().items()}


# ---- the method --------------------------------------------------------------------------------

def test_factorization_is_peft_s():
    assert lokr.factorization(256) == (16, 16) and lokr.factorization(128) == (8, 16)
    assert lokr.factorization(127) == (1, 127) and lokr.factorization(128, 4) == (4, 32)
    for dim in (1, 2, 12, 30, 32, 64, 96, 100, 576, 1536, 4097):
        for factor in (-1, 1, 3, 4, 8, 16, 50):
            assert lokr.factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


@pytest.mark.parametrize("spec,q_shapes,down_shapes", [
    ("lokr", {"lokr_w1": (4, 4), "lokr_w2": (8, 8)}, {"lokr_w1": (4, 8), "lokr_w2": (8, 8)}),
    ("lokr[r=2]", {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)},
     {"lokr_w1": (4, 8), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}),
    ("lokr[r=1,decompose_both=true]", {"lokr_w1_a": (4, 1), "lokr_w1_b": (1, 4), "lokr_w2_a": (8, 1), "lokr_w2_b": (1, 8)},
     {"lokr_w1_a": (4, 1), "lokr_w1_b": (1, 8), "lokr_w2_a": (8, 1), "lokr_w2_b": (1, 8)}),
    ("lokr[decompose_factor=16]", {"lokr_w1": (16, 16), "lokr_w2": (2, 2)}, {"lokr_w1": (16, 16), "lokr_w2": (2, 4)}),
], ids=["defaults", "r2", "decompose-both", "factor16"])
def test_factor_shapes_follow_peft_s_rules(spec, q_shapes, down_shapes):
    """q_proj is 32 x 32 and down_proj 32 x 64 (32 = 4 x 8, 64 = 8 x 8 near the square root)."""
    model = peftlab.attach(make_llama(), spec)
    assert shapes(adapter(model)) == q_shapes and shapes(adapter(model, DOWN0)) == down_shapes


@pytest.mark.parametrize("spec", ["lokr[alpha=3]", "lokr[r=2,alpha=3]", "lokr[r=1,decompose_both=true]"])
@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_layer_adds_the_scaled_kronecker_product_without_forming_it(spec, routed, monkeypatch):
    model = randomize(peftlab.attach(make_llama(), spec))
    layer = model.get_submodule(DOWN0)
    a = layer.adapters["default"]
    w1, w2 = (a.lokr_w1 if hasattr(a, "lokr_w1") else a.lokr_w1_a @ a.lokr_w1_b,
              a.lokr_w2 if hasattr(a, "lokr_w2") else a.lokr_w2_a @ a.lokr_w2_b)
    update = (torch.kron(w1, w2) * a.alpha / a.r).detach()
    torch.testing.assert_close(a.delta_weight(), update)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        expected = layer.base_layer(x) + x @ update.T
        expected[1] = layer.base_layer(x[1]) if routed else expected[1]
        monkeypatch.setattr(torch, "kron", lambda *args: pytest.fail("the forward formed the Kronecker product"))
        if routed:
            with peftlab.routing(model, ["default", None, "default"]):
                out = layer(x)
        else:
            out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init,zero", [("default", "lokr_w1"), ("lycoris", "lokr_w2")])
def test_starts_as_the_base_with_one_factor_zero(init, zero, ids):
    model = peftlab.attach(make_llama(), f"lokr[init={init}]")
    a = adapter(model)
    for name, p in a.named_parameters():
        assert (torch.count_nonzero(p) == 0) == (name == zero), name
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=0)


def test_update_has_full_rank_from_few_parameters():
    """The point of a Kronecker update: rank(W1 kron W2) = rank(W1) rank(W2)."""
    model = randomize(peftlab.attach(make_llama(), "lokr[targets=q_proj]"))
    a = adapter(model)
    assert sum(p.numel() for p in a.parameters()) == 16 + 64  # a rank-1 LoRA of 32 x 32 has 64
    assert torch.linalg.matrix_rank(a.delta_weight().detach()) == 32


def test_merge_forms_the_product_and_equals_unmerged(ids):
    model = randomize(peftlab.attach(make_llama(), "lokr[r=2,alpha=4]"))
    layer = model.get_submodule(Q0)
    W = layer.base_layer.weight.detach().clone()
    unmerged = logits(model, ids)
    peftlab.merge(model)
    torch.testing.assert_close(layer.base_layer.weight, W + layer.adapters["default"].delta_weight(), rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)


def test_save_load_round_trip_is_exact(ids, tmp_path):
    model = randomize(peftlab.attach(make_llama(), "lokr[r=1,decompose_both=true,init=lycoris]"))
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    loaded = peftlab.load(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)
    assert loaded._peftlab_state.configs["default"][0].init == "lycoris"


def test_spec_string_and_patterns():
    a = adapter(peftlab.attach(make_llama(), "lokr[r=8,alpha=16]"))
    assert a.r == 8 and a.scaling == 2.0
    model = peftlab.attach(make_llama(), lokr.LokrConfig(r=8, rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 4}))
    assert "lokr_w2_a" in shapes(adapter(model, DOWN0)) and "lokr_w2" in shapes(adapter(model))
    assert adapter(model).scaling == 0.5


def test_rank_dropout_rescales_only_when_asked():
    for scale in (False, True):
        model = randomize(peftlab.attach(make_llama(), f"lokr[rank_dropout=0.5,rank_dropout_scale={scale},targets=q_proj]"))
        layer, base = model.get_submodule(Q0), make_llama().get_submodule(Q0)
        x = torch.randn(2, 3, 32)
        with torch.no_grad():
            full = layer(x) - base(x)
            layer.train()
            torch.manual_seed(0)
            dropped = layer(x) - base(x)
        kept = dropped.abs().sum((0, 1)) > 1e-7
        assert 0 < int(kept.sum()) < 32
        ratio = dropped[..., kept] / full[..., kept]
        want = 32 / int(kept.sum()) if scale else 1.0
        torch.testing.assert_close(ratio, torch.full_like(ratio, want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("setting,match", [("r=0", "rank"), ("alpha=-1", "alpha"), ("decompose_factor=0", "decompose_factor"),
                                           ("decompose_both=2", "decompose_both"), ("init=zeros", "init"),
                                           ("rank_dropout=1.5", "rank_dropout")])
def test_bad_settings_are_config_errors(setting, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), f"lokr[{setting}]")


def test_gpt2_conv1d_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="Conv1D.*adapts nn.Linear, nn.Conv1d and nn.Conv2d"):
        peftlab.attach(make_gpt2(), "lokr")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [
    ("llama-defaults", make_llama, "lokr"),
    ("llama-r2-factor4", make_llama, "lokr[r=2,alpha=5,decompose_factor=4,targets=[q_proj,v_proj,down_proj]]"),
    ("llama-decompose-both-lycoris", make_llama, "lokr[r=1,decompose_both=true,init=lycoris,rank_dropout_scale=true]"),
    ("bert-head", make_bert, "lokr[r=2,modules_to_save=[classifier]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_lokr_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = randomize(peftlab.attach(factory(), spec))
    config = assert_peftlab_file_loads_in_peft(model, factory, ids, tmp_path, "LOKR")
    assert "decompose_factor" in config


def test_per_module_ranks_are_written_as_patterns(ids, tmp_path):
    model = randomize(peftlab.attach(make_llama(), lokr.LokrConfig(r=8, alpha=4, rank_pattern={"down_proj": 2},
                                                                   alpha_pattern={"q_proj": 3})))
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    written = read_adapter_config(tmp_path)
    assert written["r"] == 8 and set(written["rank_pattern"].values()) == {2} and set(written["alpha_pattern"].values()) == {3}
    torch.testing.assert_close(peft_logits(make_llama, tmp_path, ids), expected, rtol=0, atol=1e-5)


PEFTS = [
    ("llama-defaults", make_llama, dict(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    ("llama-factored", make_llama, dict(r=2, alpha=6, target_modules="all-linear", decompose_both=True,
                                        decompose_factor=4, rank_pattern={"down_proj": 1},
                                        alpha_pattern={r"layers\.1\.self_attn\.k_proj": 1}, task_type="CAUSAL_LM")),
    ("llama-lycoris-init", make_llama, dict(r=2, init_weights="lycoris", target_modules=["o_proj", "up_proj"],
                                            task_type="CAUSAL_LM")),
    ("bert-seq-cls", make_bert, dict(r=2, alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_lokr_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    expected = peft_adapter_file(factory, peft.LoKrConfig, kwargs, tmp_path, ids, randomize=randomize)
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected)


def test_tensors_that_contradict_the_config_are_a_format_error(tmp_path):
    peftlab.save(peftlab.attach(make_llama(), "lokr"), tmp_path)  # full W2 (r=8 >= 8 / 2)
    config = read_adapter_config(tmp_path)
    # r=2 would make W2 a rank-2 pair
    assert_config_edit_is_a_format_error(tmp_path, config, {"r": 2}, "do not belong together")


def test_a_file_for_another_base_is_an_incompatible_base_error(tmp_path):
    peftlab.save(peftlab.attach(make_llama(), "lokr[targets=q_proj]"), tmp_path)
    with pytest.raises(peftlab.IncompatibleBaseError):
        peftlab.load(make_llama(hidden_size=48, num_attention_heads=4), tmp_path)
