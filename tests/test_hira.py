"""HiRA: the update W ⊙ (B A), whose rank exceeds r, merging (exactly undone), and HF PEFT's HIRA
format checked against the real ``peft`` package both ways."""
from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from conftest import assert_peft_adapter_loads_and_goes_back, logits, make_bert, make_gpt2, make_llama, peft_logits

import peftlab
from peftlab.core.layer import AdapterLayer
from peftlab.methods import hira

Q0, K0, DOWN0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"


def randomize(model, seed: int = 0, std: float = 1.0):
    """B (peftlab's or peft's) off zero, so the adapter matters; A kept."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "hira_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def adapter(model, name=Q0):
    return model.get_submodule(name).adapters["default"]


def by_hand(A, B, W) -> torch.Tensor:
    """sum_i diag(b_i) W diag(a_i): the Hadamard product W ⊙ (sum_i b_i a_i^T), entry by entry (float64)."""
    A, B, W = A.detach().double(), B.detach().double(), W.detach().double()
    return sum(torch.diag(B[:, i]) @ W @ torch.diag(A[i]) for i in range(A.shape[0]))


# ---- the method --------------------------------------------------------------------------------

def test_update_is_w_hadamard_ba_and_its_rank_exceeds_r():
    """The defining property: delta W = W ⊙ (B A), and at r = 1 (or 2) its rank is that of W
    (full), far above r, where LoRA's B A has rank r; only A and B train."""
    for r in (1, 2):
        model = randomize(peftlab.attach(make_llama(), f"hira[r={r}]"))
        for name in (Q0, K0, DOWN0):
            layer = model.get_submodule(name)
            a, W = layer.adapters["default"], layer.base_layer.weight
            delta = a.delta_weight().double()
            torch.testing.assert_close(delta, by_hand(a.hira_A, a.hira_B, W), rtol=1e-5, atol=1e-7)
            low_rank = a.hira_B.detach().double() @ a.hira_A.detach().double()
            assert torch.linalg.matrix_rank(low_rank) == r
            assert torch.linalg.matrix_rank(delta) == min(W.shape) > r
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("hira_A", "hira_B")) for n in trainable)


def test_update_keeps_the_zeros_of_w():
    """An entry of W that is zero never moves, whatever A and B are."""
    model = randomize(peftlab.attach(make_llama(), "hira[r=4]"))
    layer = model.get_submodule(Q0)
    with torch.no_grad():
        layer.base_layer.weight[3, :] = 0
        layer.base_layer.weight[:, 7] = 0
    delta = adapter(model).delta_weight()
    assert torch.count_nonzero(delta[3]) == 0 and torch.count_nonzero(delta[:, 7]) == 0
    assert torch.count_nonzero(delta) > 0


@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_layer_adds_delta_w_x(routed):
    model = randomize(peftlab.attach(make_llama(), "hira[r=4]"), std=0.1)
    layer = model.get_submodule(DOWN0)
    a = layer.adapters["default"]
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        expected = layer.base_layer(x) + x @ a.delta_weight().T
        if routed:
            with peftlab.routing(model, ["default", None, "default"]):
                out = layer(x)
            expected[1] = layer.base_layer(x[1])
        else:
            out = layer(x)
        torch.testing.assert_close(a(x, None), x @ a.delta_weight().T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_gradients_match_the_dense_update():
    model = randomize(peftlab.attach(make_llama(), "hira[r=3]"), std=0.1)
    model.train()
    layer = model.get_submodule(Q0)
    a = layer.adapters["default"]
    x, weights = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    (layer(x) * weights).sum().backward()
    A, B = (t.detach().double().requires_grad_() for t in (a.hira_A, a.hira_B))
    dense = layer.base_layer.weight.double() * (B @ A)
    ((x.double() @ dense.T) * weights.double()).sum().backward()
    for ours, theirs in ((a.hira_A, A), (a.hira_B, B)):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-4, atol=1e-6)
    assert layer.base_layer.weight.grad is None


def test_starts_as_the_base_with_a_zero_b(ids):
    model = peftlab.attach(make_llama(), "hira")
    a = adapter(model)
    assert torch.count_nonzero(a.hira_B) == 0 and torch.count_nonzero(a.hira_A) == a.hira_A.numel() and a.r == 32
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=0)
    gaussian = adapter(peftlab.attach(make_llama(), "hira[r=8,init=gaussian]"))
    assert torch.count_nonzero(gaussian.hira_B) == 0 and abs(float(gaussian.hira_A.detach().std()) - 1 / 8) < 0.03
    random = peftlab.attach(make_llama(), "hira[init=random]")  # PEFT's init_weights=False
    assert not torch.allclose(logits(random, ids), logits(make_llama(), ids), atol=1e-3)


def test_merge_multiplies_w_and_unmerge_restores_it_exactly(ids):
    model = randomize(peftlab.attach(make_llama(), "hira[r=4]"), std=0.3)
    layer = model.get_submodule(Q0)
    a = layer.adapters["default"]
    W = layer.base_layer.weight.detach().clone()
    delta = a.delta_weight().detach().clone()
    unmerged = logits(model, ids)
    peftlab.merge(model)
    torch.testing.assert_close(layer.base_layer.weight, W * (1 + a.hira_B @ a.hira_A), rtol=0, atol=1e-6)
    torch.testing.assert_close(a.delta_weight(), delta, rtol=0, atol=0)  # still from the pre-merge W
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=0)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)


def test_save_load_round_trip_is_exact(ids, tmp_path):
    model = randomize(peftlab.attach(make_llama(), "hira[r=3]"), std=0.3)
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    loaded = peftlab.load(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)


def test_defaults_attach_and_patterns_are_per_module():
    model = peftlab.attach(make_llama(), "hira")
    assert len([m for m in model.modules() if isinstance(m, AdapterLayer)]) == 14
    model = peftlab.attach(make_llama(), hira.HiraConfig(r=4, rank_pattern={"down_proj": 2}))
    assert (adapter(model).r, adapter(model, DOWN0).r) == (4, 2)


@pytest.mark.parametrize("setting,match", [("r=0", "rank"), ("dropout=1.5", "dropout"), ("init=zeros", "init"),
                                           ("rank_pattern=3", "rank_pattern"), ("colour=3", "unknown setting")])
def test_bad_settings_are_config_errors(setting, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), f"hira[{setting}]")


def test_gpt2_conv1d_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="Conv1D.*nn.Linear layers only"):
        peftlab.attach(make_gpt2(), "hira")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [
    ("llama-defaults", make_llama, "hira"),
    ("llama-some", make_llama, hira.HiraConfig(r=4, dropout=0.1, targets=["q_proj", "k_proj", "down_proj"])),
    ("bert-head", make_bert, "hira[r=2,modules_to_save=[classifier]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_hira_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = randomize(peftlab.attach(factory(), spec))
    expected = logits(model, ids)
    assert not torch.allclose(expected, logits(factory(), ids), atol=1e-3), "the adapter should matter"
    peftlab.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "HIRA" and config["init_weights"] is True
    if label == "llama-some":
        assert config["r"] == 4 and config["hira_dropout"] == 0.1 and config["rank_pattern"] == {}
    torch.testing.assert_close(peft_logits(factory, tmp_path, ids), expected, rtol=0, atol=1e-5)


PEFTS = [
    ("llama-q-v", make_llama, dict(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    ("llama-patterns", make_llama, dict(r=6, target_modules="all-linear", rank_pattern={"k_proj": 2},
                                        init_weights="gaussian", task_type="CAUSAL_LM")),
    ("bert-seq-cls", make_bert, dict(r=2, target_modules=["query", "value", "dense"], task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_hira_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = randomize(peft.get_peft_model(factory(), peft.HiraConfig(**kwargs)).eval(), seed=3, std=0.3)
        expected = logits(theirs, ids)
        theirs.save_pretrained(str(tmp_path))
    assert not torch.allclose(expected, logits(factory(), ids), atol=1e-3), "the adapter should matter"
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected)


def test_per_layer_ranks_save_natively_and_peft_files_load_at_their_tensor_ranks(ids, tmp_path):
    """PEFT 0.21.2 builds every HiRA layer at r whatever rank_pattern says: peftlab writes a patterned
    adapter natively (exact round trip), and reads PEFT's patterned file at the ranks it holds."""
    model = randomize(peftlab.attach(make_llama(), hira.HiraConfig(r=4, rank_pattern={"down_proj": 2})), std=0.3)
    expected = logits(model, ids)
    peftlab.save(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text()).get("peft_type") != "HIRA"
    loaded = peftlab.load(make_llama(), tmp_path / "ours")
    assert adapter(loaded, DOWN0).r == 2
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_llama(), peft.HiraConfig(r=4, rank_pattern={"down_proj": 2},
                                                                   target_modules=["q_proj", "down_proj"]))
        theirs.save_pretrained(str(tmp_path / "theirs"))
    assert adapter(peftlab.load(make_llama(), tmp_path / "theirs"), DOWN0).r == 4


def test_bad_files_are_format_errors(tmp_path):
    peftlab.save(peftlab.attach(make_llama(), "hira[r=4]"), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for bad, match in (({"fan_in_fan_out": True}, "fan_in_fan_out"),
                       ({"r": 0}, "invalid values"), ({"init_weights": "pissa"}, "invalid values")):
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **bad}))
        fresh = make_llama()
        with pytest.raises(peftlab.AdapterFormatError, match=match):
            peftlab.load(fresh, tmp_path)
        assert not [m for m in fresh.modules() if isinstance(m, AdapterLayer)]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = f"base_model.model.{Q0}.hira_B"
    for bad, match in ((tensors[key][:, :3], "one r"), (tensors[key][:5], "another base model")):
        save_file({**tensors, key: bad.contiguous()}, tmp_path / "adapter_model.safetensors")
        with pytest.raises(peftlab.AdapterFormatError, match=match):
            peftlab.load(make_llama(), tmp_path)


def test_peftlab_info_reads_the_file(tmp_path):
    from peftlab.cli import adapter_info

    model = peftlab.attach(make_llama(), "hira[r=2,targets=[k_proj,v_proj,down_proj]]")
    peftlab.save(model, tmp_path)
    info = adapter_info(tmp_path)
    assert info["peft_type"] == "HIRA" and info["method"] == "hira" and info["adapted_modules"] == 6
    assert info["parameters"] == peftlab.summary(model)["adapters"]["default"]
