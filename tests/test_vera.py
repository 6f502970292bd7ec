"""VeRA: one frozen random pair (A, B) shared by every adapted layer, trained scaling vectors d and b,
merging, and HF PEFT's VERA format checked against the real ``peft`` package both ways (with the
pair saved, and regenerated from ``projection_prng_key``)."""
from __future__ import annotations

import warnings

import peft
import pytest
import torch
from conftest import (
    assert_config_edit_is_a_format_error, assert_peft_adapter_loads_and_goes_back,
    assert_peftlab_file_loads_in_peft, logits, make_bert, make_gpt2, make_llama, peft_adapter_file,
    peft_logits, read_adapter_config,
)

import peftlab
from peftlab.core import adapters as core
from peftlab.core.layer import AdapterLayer
from peftlab.methods import vera

Q0, K0, DOWN0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"


def randomize(model, seed: int = 0, std: float = 0.5):
    """Every VeRA vector (peftlab's or peft's) to random values, so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vera_lambda" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def adapter(model, name=Q0):
    return model.get_submodule(name).adapters["default"]


def expected_update(a) -> torch.Tensor:
    A, B = a.projections()
    return torch.diag(a.vera_lambda_b) @ B[: a.out_features] @ torch.diag(a.vera_lambda_d) @ A[:, : a.in_features]


# ---- the method --------------------------------------------------------------------------------

def test_one_frozen_pair_is_shared_and_only_the_vectors_train():
    """The defining property: A and B are one storage for the whole model, sized by the widest layers
    (gate/up: 64 out, down: 64 in), frozen; a layer trains r + out numbers."""
    r = 8
    model = peftlab.attach(make_llama(), f"vera[r={r}]")
    adapters = [a for _, a in core.all_adapters(model)]
    assert len(adapters) == 14
    A, B = adapters[0].projections()
    assert A.shape == (r, 64) and B.shape == (64, r)
    assert all(a.projections()[0].data_ptr() == A.data_ptr() and a.projections()[1].data_ptr() == B.data_ptr()
               for a in adapters)
    assert not A.requires_grad and not B.requires_grad
    assert len([b for m in model.modules() for b in m.buffers(recurse=False) if b.dim() == 2]) == 2, "stored once"
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(("vera_lambda_b", "vera_lambda_d")) for n in trainable)
    for a in adapters:
        assert sum(p.numel() for p in a.parameters()) == r + a.out_features
    k = adapter(model, K0)
    assert (k.out_features, k.in_features) == (16, 32)
    model.train()
    before = (A.clone(), B.clone())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(input_ids=torch.randint(3, 96, (2, 5)), labels=torch.randint(3, 96, (2, 5))).loss.backward()
    optimizer.step()
    assert torch.equal(A, before[0]) and torch.equal(B, before[1])
    assert any(torch.count_nonzero(a.vera_lambda_b) for a in adapters), "b moves off zero"


def test_projections_are_peft_kaiming_draws_from_the_key():
    """A then B from one CPU generator seeded with the key; bound sqrt(6 / fan_in)."""
    A, B = vera.projections(4, 64, 32, key=5)
    g = torch.Generator().manual_seed(5)
    torch.testing.assert_close(A, torch.empty(4, 64).uniform_(-(6 / 64) ** 0.5, (6 / 64) ** 0.5, generator=g), rtol=0, atol=0)
    torch.testing.assert_close(B, torch.empty(32, 4).uniform_(-(6 / 4) ** 0.5, (6 / 4) ** 0.5, generator=g), rtol=0, atol=0)
    assert not torch.equal(vera.projections(4, 64, 32, key=6)[0], A)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_llama(), peft.VeraConfig(r=4, projection_prng_key=5, target_modules="all-linear"))
    ours = adapter(peftlab.attach(make_llama(), "vera[r=4,projection_prng_key=5]")).projections()
    torch.testing.assert_close(ours[0], theirs.base_model.vera_A["default"], rtol=0, atol=0)
    torch.testing.assert_close(ours[1], theirs.base_model.vera_B["default"], rtol=0, atol=0)


@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_layer_adds_the_scaled_random_product(routed):
    model = randomize(peftlab.attach(make_llama(), "vera[r=6]"))
    layer = model.get_submodule(K0)  # 16 x 32: uses the top-left corner of the 64-wide pair
    a = layer.adapters["default"]
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        expected = layer.base_layer(x) + x @ expected_update(a).T
        if routed:
            with peftlab.routing(model, ["default", None, "default"]):
                out = layer(x)
            expected[1] = layer.base_layer(x[1])
        else:
            out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.delta_weight(), expected_update(a), rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the unfused route (dropout, other dtypes) gives the same
        torch.testing.assert_close(a(x, None), x @ expected_update(a).T, rtol=1e-5, atol=1e-5)


def test_fused_gradients_match_the_plain_formula():
    model = randomize(peftlab.attach(make_llama(), "vera[r=6]"))
    model.train()
    layer = model.get_submodule(DOWN0)
    a = layer.adapters["default"]
    x = torch.randn(2, 5, 64, requires_grad=True)
    weights = torch.randn(2, 5, 32)
    (layer(x) * weights).sum().backward()
    got = [p.grad.clone() for p in (x, a.vera_lambda_b, a.vera_lambda_d)]
    for p in (x, a.vera_lambda_b, a.vera_lambda_d):
        p.grad = None
    (torch.nn.functional.linear(x, layer.base_layer.weight + expected_update(a), layer.base_layer.bias) * weights).sum().backward()
    for mine, plain in zip(got, [p.grad for p in (x, a.vera_lambda_b, a.vera_lambda_d)]):
        torch.testing.assert_close(mine, plain, rtol=1e-4, atol=1e-5)


def test_starts_as_the_base_with_b_zero_and_d_initial(ids):
    model = peftlab.attach(make_llama(), "vera[d_initial=0.05]")
    a = adapter(model)
    assert torch.count_nonzero(a.vera_lambda_b) == 0 and torch.all(a.vera_lambda_d == 0.05) and a.vera_lambda_d.shape == (256,)
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=0)


def test_merge_adds_the_update_and_equals_unmerged(ids):
    model = randomize(peftlab.attach(make_llama(), "vera[r=16]"))
    layer = model.get_submodule(Q0)
    W = layer.base_layer.weight.detach().clone()
    unmerged = logits(model, ids)
    peftlab.merge(model)
    torch.testing.assert_close(layer.base_layer.weight, W + expected_update(layer.adapters["default"]), rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)


@pytest.mark.parametrize("save_projection", [True, False])
def test_save_load_round_trip_is_exact(ids, tmp_path, save_projection):
    model = randomize(peftlab.attach(make_llama(), f"vera[r=8,projection_prng_key=3,save_projection={save_projection}]"))
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    loaded = peftlab.load(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)


def test_a_saved_pair_is_used_as_saved(ids, tmp_path):
    """With save_projection the file's pair wins over the key (as in PEFT), so any pair round-trips."""
    model = randomize(peftlab.attach(make_llama(), "vera[r=4]"))
    with torch.no_grad():
        for t in adapter(model).projections():
            t.mul_(-2)
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    torch.testing.assert_close(logits(peftlab.load(make_llama(), tmp_path), ids), expected, rtol=0, atol=0)
    torch.testing.assert_close(peft_logits(make_llama, tmp_path, ids), expected, rtol=0, atol=1e-5)


def test_spec_string_and_defaults_attach_to_tiny_widths():
    model = peftlab.attach(make_llama(), "vera")  # r=256 > every width of the 32-wide model
    a = adapter(model)
    assert a.r == 256 and a.projections()[0].shape == (256, 64)
    assert len([m for m in model.modules() if isinstance(m, AdapterLayer)]) == 14
    model = peftlab.attach(make_llama(), "vera[r=16,targets=[q_proj,k_proj]]")
    assert adapter(model).projections()[0].shape == (16, 32) and adapter(model).projections()[1].shape == (32, 16)


def test_two_vera_adapters_have_their_own_pairs(ids):
    model = peftlab.attach(make_llama(), "vera[r=4,targets=q_proj]")
    peftlab.attach(model, "vera[r=8,projection_prng_key=1,targets=q_proj]", name="other")
    layer = model.get_submodule(Q0)
    assert layer.adapters["default"].projections()[0].shape == (4, 32)
    assert layer.adapters["other"].projections()[0].shape == (8, 32)


@pytest.mark.parametrize("setting,match", [("r=0", "rank"), ("d_initial=0", "d_initial"), ("dropout=1.5", "dropout"),
                                           ("projection_prng_key=x", "projection_prng_key"),
                                           ("save_projection=2", "save_projection"), ("colour=3", "unknown setting")])
def test_bad_settings_are_config_errors(setting, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), f"vera[{setting}]")


def test_gpt2_conv1d_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="Conv1D.*nn.Linear layers only"):
        peftlab.attach(make_gpt2(), "vera")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [
    ("llama-defaults", make_llama, "vera"),
    ("llama-no-projection", make_llama, "vera[r=8,projection_prng_key=7,save_projection=false,targets=[q_proj,v_proj,down_proj]]"),
    ("bert-head", make_bert, "vera[r=16,modules_to_save=[classifier]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_vera_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = randomize(peftlab.attach(factory(), spec))
    config = assert_peftlab_file_loads_in_peft(model, factory, ids, tmp_path, "VERA")
    assert "vera_dropout" in config
    from safetensors.torch import load_file
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert ("base_model.vera_A" in keys) == config["save_projection"]


PEFTS = [
    ("llama-q-v", make_llama, dict(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    ("llama-all-linear", make_llama, dict(r=16, d_initial=0.2, projection_prng_key=11, target_modules="all-linear",
                                          task_type="CAUSAL_LM")),
    ("llama-no-projection", make_llama, dict(r=4, save_projection=False, projection_prng_key=2,
                                             target_modules=["k_proj", "down_proj"], task_type="CAUSAL_LM")),
    ("bert-seq-cls", make_bert, dict(r=8, target_modules=["query", "value"], task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_vera_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    expected = peft_adapter_file(factory, peft.VeraConfig, kwargs, tmp_path, ids, randomize=randomize)
    # peft warns when it regenerates the pair from the key
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected, quiet=True)


def test_a_missing_pair_or_bias_training_is_a_format_error(tmp_path):
    peftlab.save(randomize(peftlab.attach(make_llama(), "vera[r=4,save_projection=false]")), tmp_path)
    config = read_adapter_config(tmp_path)
    assert_config_edit_is_a_format_error(tmp_path, config, {"save_projection": True}, "lacks base_model.vera_A")
    assert_config_edit_is_a_format_error(tmp_path, config, {"bias": "vera_only"}, "bias")


def test_tensors_that_contradict_the_config_are_a_format_error(tmp_path):
    peftlab.save(peftlab.attach(make_llama(), "vera[r=8]"), tmp_path)
    config = read_adapter_config(tmp_path)
    assert_config_edit_is_a_format_error(tmp_path, config, {"r": 4}, "do not belong together")
