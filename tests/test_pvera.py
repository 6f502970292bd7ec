"""PVeRA: VeRA's shared frozen pair with a 2r-row A read as a Gaussian latent (mean, log-variance),
sampled by reparameterisation in training and taken at its mean in evaluation (and in merges), and
HF PEFT's PVERA format checked against the real ``peft`` package both ways."""
from __future__ import annotations

import warnings

import peft
import pytest
import torch
from conftest import (
    assert_config_edit_is_a_format_error, assert_peft_adapter_loads_and_goes_back,
    assert_peftlab_file_loads_in_peft, logits, make_bert, make_gpt2, make_llama, peft_adapter_file,
    read_adapter_config,
)

import peftlab
from peftlab.core import adapters as core
from peftlab.core.layer import AdapterLayer
from peftlab.methods import pvera, vera

Q0, K0, DOWN0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"


def randomize(model, seed: int = 0, std: float = 0.5):
    """Every PVeRA vector (peftlab's or peft's) to random values, so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pvera_lambda" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def adapter(model, name=Q0):
    return model.get_submodule(name).adapters["default"]


def by_hand(a, x, eps=None):
    """The paper's layer, written out: [mu; logvar] = diag(d) A x, z = mu (+ eps exp(logvar / 2)), diag(b) B z."""
    A, B = a.projections()
    A, B = A[:, : a.in_features], B[: a.out_features]
    r = a.r
    h = x @ (torch.diag(a.pvera_lambda_d) @ A).T
    mu, logvar = h[..., :r], h[..., r:]
    z = mu if eps is None else mu + eps * torch.exp(logvar / 2)
    return z @ (torch.diag(a.pvera_lambda_b) @ B).T


# ---- the method --------------------------------------------------------------------------------

def test_latent_is_sampled_in_training_and_its_mean_in_evaluation():
    """The defining property: A's first r rows give the latent's mean, its last r its log-variance;
    training draws z = mu + eps exp(logvar / 2) (the draw reproduced here from the same generator),
    evaluation uses mu, and the draws average to the mean."""
    model = randomize(peftlab.attach(make_llama(), "pvera[r=6,generator_seed=5]"), std=0.3)
    a = adapter(model, K0)  # 16 x 32: the top-left corner of the shared 12 x 64 / 64 x 6 pair
    assert a.projections()[0].shape == (12, 64) and a.projections()[1].shape == (64, 6)
    assert a.pvera_lambda_d.shape == (12,) and a.pvera_lambda_b.shape == (16,)
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        a.eval()
        torch.testing.assert_close(a(x, None), by_hand(a, x), rtol=1e-5, atol=1e-6)
        a.train()
        eps = torch.randn((3, 5, 6), generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(a(x, None), by_hand(a, x, eps), rtol=1e-5, atol=1e-6)
        draws = torch.stack([a(x, None) for _ in range(4000)])
    assert not torch.allclose(draws[0], draws[1])
    # the spread is the log-variance half's: each output's std is that of diag(b) B diag(exp(logvar / 2)) eps
    A, B = a.projections()
    with torch.no_grad():
        logvar = (x @ (torch.diag(a.pvera_lambda_d) @ A[:, :32]).T)[..., 6:]
        std = (torch.exp(logvar) @ ((torch.diag(a.pvera_lambda_b) @ B[:16]) ** 2).T).sqrt()
    torch.testing.assert_close(draws.std(0), std, rtol=0.1, atol=1e-6)
    assert ((draws.mean(0) - by_hand(a, x)).abs() <= 5 * std / len(draws) ** 0.5 + 1e-6).all(), "the draws average to the mean"


def test_sample_at_inference_draws_in_evaluation_too(ids):
    model = randomize(peftlab.attach(make_llama(), "pvera[r=8,sample_at_inference=true]")).eval()
    assert not torch.allclose(logits(model, ids), logits(model, ids))
    mean_model = randomize(peftlab.attach(make_llama(), "pvera[r=8]")).eval()
    torch.testing.assert_close(logits(mean_model, ids), logits(mean_model, ids), rtol=0, atol=0)


def test_one_frozen_pair_drawn_as_peft_and_only_the_vectors_train():
    r = 8
    model = peftlab.attach(make_llama(), f"pvera[r={r},projection_prng_key=5]")
    adapters = [a for _, a in core.all_adapters(model)]
    assert len(adapters) == 14
    A, B = adapters[0].projections()
    assert all(a.projections()[0].data_ptr() == A.data_ptr() for a in adapters)
    g = torch.Generator().manual_seed(5)
    torch.testing.assert_close(A, vera.kaiming_uniform((2 * r, 64), g), rtol=0, atol=0)
    torch.testing.assert_close(B, vera.kaiming_uniform((64, r), g), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_llama(), peft.PveraConfig(r=r, projection_prng_key=5, target_modules="all-linear"))
    torch.testing.assert_close(A, theirs.base_model.pvera_A["default"], rtol=0, atol=0)
    torch.testing.assert_close(B, theirs.base_model.pvera_B["default"], rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("pvera_lambda_b", "pvera_lambda_d")) for n in trainable)
    assert all(sum(p.numel() for p in a.parameters()) == 2 * r + a.out_features for a in adapters)
    model.train()
    before = (A.clone(), B.clone())
    model(input_ids=torch.randint(3, 96, (2, 5)), labels=torch.randint(3, 96, (2, 5))).loss.backward()
    assert torch.equal(A, before[0]) and torch.equal(B, before[1]) and A.grad is None
    assert adapters[0].pvera_lambda_b.grad.abs().sum() > 0


def test_both_halves_of_d_get_gradients_through_the_sample():
    model = randomize(peftlab.attach(make_llama(), "pvera[r=4]"))
    layer = model.get_submodule(DOWN0)
    a = layer.adapters["default"]
    a.train()
    layer(torch.randn(2, 5, 64)).pow(2).sum().backward()
    assert a.pvera_lambda_d.grad[:4].abs().sum() > 0 and a.pvera_lambda_d.grad[4:].abs().sum() > 0


@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_layer_adds_the_mean_update_in_evaluation(routed):
    model = randomize(peftlab.attach(make_llama(), "pvera[r=6]")).eval()
    layer = model.get_submodule(K0)
    a = layer.adapters["default"]
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        expected = layer.base_layer(x) + by_hand(a, x)
        if routed:
            with peftlab.routing(model, ["default", None, "default"]):
                out = layer(x)
            expected[1] = layer.base_layer(x[1])
        else:
            out = layer(x)  # the fused kernel
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x @ a.delta_weight().T, by_hand(a, x), rtol=1e-5, atol=1e-5)


def test_starts_as_the_base_even_when_sampling(ids):
    model = peftlab.attach(make_llama(), "pvera[d_initial=0.05]")
    a = adapter(model)
    assert torch.count_nonzero(a.pvera_lambda_b) == 0 and torch.all(a.pvera_lambda_d == 0.05) and a.pvera_lambda_d.shape == (512,)
    base = logits(make_llama(), ids)
    torch.testing.assert_close(logits(model, ids), base, rtol=0, atol=0)
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=0, atol=0)


def test_merge_adds_the_mean_update_and_equals_unmerged(ids):
    model = randomize(peftlab.attach(make_llama(), "pvera[r=16]"))
    layer = model.get_submodule(Q0)
    W = layer.base_layer.weight.detach().clone()
    unmerged = logits(model, ids)
    peftlab.merge(model)
    a = layer.adapters["default"]
    A, B = a.projections()
    update = torch.diag(a.pvera_lambda_b) @ B[:32] @ torch.diag(a.pvera_lambda_d[:16]) @ A[:16, :32]
    torch.testing.assert_close(layer.base_layer.weight, W + update, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=1e-6)


@pytest.mark.parametrize("save_projection", [True, False])
def test_save_load_round_trip_is_exact(ids, tmp_path, save_projection):
    model = randomize(peftlab.attach(make_llama(), f"pvera[r=8,projection_prng_key=3,save_projection={save_projection}]"))
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    torch.testing.assert_close(logits(peftlab.load(make_llama(), tmp_path), ids), expected, rtol=0, atol=0)


def test_spec_string_and_defaults_attach_to_tiny_widths():
    model = peftlab.attach(make_llama(), "pvera")  # r=256 > every width of the 32-wide model
    assert adapter(model).projections()[0].shape == (512, 64)
    assert len([m for m in model.modules() if isinstance(m, AdapterLayer)]) == 14
    assert pvera.DEFAULT_LR == 2e-2


@pytest.mark.parametrize("setting,match", [("r=0", "pvera: rank"), ("d_initial=0", "d_initial"), ("dropout=1.5", "dropout"),
                                           ("sample_at_inference=2", "sample_at_inference"),
                                           ("generator_seed=x", "generator_seed"), ("colour=3", "unknown setting")])
def test_bad_settings_are_config_errors(setting, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), f"pvera[{setting}]")


def test_gpt2_conv1d_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="Conv1D.*nn.Linear layers only"):
        peftlab.attach(make_gpt2(), "pvera")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [
    ("llama-defaults", make_llama, "pvera"),
    ("llama-no-projection", make_llama, "pvera[r=8,projection_prng_key=7,save_projection=false,targets=[q_proj,v_proj,down_proj]]"),
    ("bert-head", make_bert, "pvera[r=16,modules_to_save=[classifier]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_pvera_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = randomize(peftlab.attach(factory(), spec))
    config = assert_peftlab_file_loads_in_peft(model, factory, ids, tmp_path, "PVERA")
    assert "pvera_dropout" in config
    from safetensors.torch import load_file
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert ("base_model.pvera_A" in keys) == config["save_projection"]


PEFTS = [
    ("llama-q-v", make_llama, dict(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    ("llama-all-linear", make_llama, dict(r=16, d_initial=0.2, projection_prng_key=11, target_modules="all-linear",
                                          task_type="CAUSAL_LM")),
    ("llama-no-projection", make_llama, dict(r=4, save_projection=False, projection_prng_key=2,
                                             target_modules=["k_proj", "down_proj"], task_type="CAUSAL_LM")),
    ("bert-seq-cls", make_bert, dict(r=8, target_modules=["query", "value"], task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_pvera_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    expected = peft_adapter_file(factory, peft.PveraConfig, kwargs, tmp_path, ids, randomize=randomize)
    # peft warns when it regenerates the pair from the key
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected, quiet=True)


def test_bad_files_are_format_errors(tmp_path):
    peftlab.save(randomize(peftlab.attach(make_llama(), "pvera[r=4,save_projection=false]")), tmp_path)
    config = read_adapter_config(tmp_path)
    assert_config_edit_is_a_format_error(tmp_path, config, {"save_projection": True}, "lacks base_model.pvera_A")
    assert_config_edit_is_a_format_error(tmp_path, config, {"bias": "pvera_only"}, "bias")
    assert_config_edit_is_a_format_error(tmp_path, config, {"r": 8}, "do not belong together")
