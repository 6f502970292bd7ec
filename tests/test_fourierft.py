"""FourierFT: n trained spectral coefficients at fixed random positions, delta W = scaling * Re(IDFT2),
merging, and HF PEFT's FOURIERFT format checked against the real ``peft`` package both ways."""
from __future__ import annotations

import math

import peft
import pytest
import torch
from conftest import (
    assert_config_edit_is_a_format_error, assert_peft_adapter_loads_and_goes_back,
    assert_peftlab_file_loads_in_peft, logits, make_bert, make_gpt2, make_llama, peft_adapter_file,
    peft_logits, read_adapter_config,
)

import peftlab
from peftlab.core.layer import AdapterLayer
from peftlab.methods import fourierft

Q0, K0, DOWN0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"


def randomize(model, seed: int = 0, std: float = 1.0):
    """Every spectrum (peftlab's or peft's) to random values, so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "fourierft_spectrum" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def adapter(model, name=Q0):
    return model.get_submodule(name).adapters["default"]


def idft2_real(a) -> torch.Tensor:
    """Re(IDFT2(F)) * scaling written out as the sum over the trained frequencies (float64):
    (1 / (M N)) sum_k c_k cos(2 pi (u_k p / M + v_k q / N))."""
    M, N = a.out_features, a.in_features
    p = torch.arange(M, dtype=torch.float64)[:, None, None]
    q = torch.arange(N, dtype=torch.float64)[None, :, None]
    u, v = a.indices.double()
    c = a.fourierft_spectrum.detach().double()
    return (c * torch.cos(2 * math.pi * (u * p / M + v * q / N))).sum(-1) / (M * N) * a.scaling


# ---- the method --------------------------------------------------------------------------------

def test_update_is_the_real_inverse_dft_of_the_sparse_spectrum():
    """The defining property, against the DFT written out by hand; only n coefficients train."""
    model = randomize(peftlab.attach(make_llama(), "fourierft[n_frequency=50,scaling=20]"))
    for name in (Q0, K0, DOWN0):
        a = adapter(model, name)
        assert a.fourierft_spectrum.shape == (50,) and a.indices.shape == (2, 50)
        assert sum(p.numel() for p in a.parameters()) == 50
        torch.testing.assert_close(a.delta_weight().double(), idft2_real(a), rtol=1e-5, atol=1e-6)
        positions = a.indices[0] * a.in_features + a.indices[1]
        assert len(set(positions.tolist())) == 50 and int(positions.max()) < a.out_features * a.in_features
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("fourierft_spectrum") for n in trainable)


def test_positions_come_from_the_seed_as_in_peft():
    idx = fourierft.spectral_indices(16, 32, 40, seed=3)
    flat = torch.randperm(512, generator=torch.Generator().manual_seed(3))[:40]
    torch.testing.assert_close(idx, torch.stack([flat // 32, flat % 32]), rtol=0, atol=0)
    a = adapter(peftlab.attach(make_llama(), "fourierft[n_frequency=40,random_loc_seed=3]"), K0)
    torch.testing.assert_close(a.indices, idx, rtol=0, atol=0)
    other = adapter(peftlab.attach(make_llama(), "fourierft[n_frequency=40,random_loc_seed=4]"), K0)
    assert not torch.equal(other.indices, idx)


@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_layer_adds_delta_w_x(routed):
    model = randomize(peftlab.attach(make_llama(), "fourierft[n_frequency=100]"))
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


def test_gradients_reach_the_spectrum_only_through_its_positions():
    model = randomize(peftlab.attach(make_llama(), "fourierft[n_frequency=30,scaling=10]"))
    model.train()
    layer = model.get_submodule(Q0)
    a = layer.adapters["default"]
    x = torch.randn(2, 5, 32)
    weights = torch.randn(2, 5, 32)
    (layer(x) * weights).sum().backward()
    # d loss / d c_k = <G, scaling * Re(IDFT2(e_k))>, with G the gradient of the dense update
    G = torch.einsum("bto,bti->oi", weights, x).double()
    basis = torch.zeros(30, 32, 32, dtype=torch.float64)
    basis[torch.arange(30), a.indices[0], a.indices[1]] = 1
    expected = (torch.fft.ifft2(basis).real * a.scaling * G).sum((1, 2))
    torch.testing.assert_close(a.fourierft_spectrum.grad.double(), expected, rtol=1e-4, atol=1e-5)


def test_starts_as_the_base_with_a_zero_spectrum(ids):
    model = peftlab.attach(make_llama(), "fourierft")
    assert torch.count_nonzero(adapter(model).fourierft_spectrum) == 0
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=0)
    gaussian = peftlab.attach(make_llama(), "fourierft[init=gaussian]")  # PEFT's default: not the base at step 0
    assert torch.count_nonzero(adapter(gaussian).fourierft_spectrum) == 1000


def test_merge_adds_the_update_and_equals_unmerged(ids):
    model = randomize(peftlab.attach(make_llama(), "fourierft[n_frequency=200]"))
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
    model = randomize(peftlab.attach(make_llama(), "fourierft[n_frequency=300,random_loc_seed=5,scaling=80]"))
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    loaded = peftlab.load(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)


def test_defaults_attach_to_tiny_widths_with_the_count_capped():
    """n_frequency=1000: q_proj (32 x 32 = 1024) keeps 1000, k_proj (16 x 32 = 512) takes all 512."""
    model = peftlab.attach(make_llama(), "fourierft")
    assert len([m for m in model.modules() if isinstance(m, AdapterLayer)]) == 14
    assert adapter(model).n_frequency == 1000 and adapter(model, K0).n_frequency == 512
    assert adapter(model).scaling == 150.0


def test_n_frequency_pattern_is_per_module():
    model = peftlab.attach(make_llama(), fourierft.FourierFTConfig(n_frequency=100, n_frequency_pattern={"down_proj": 7}))
    assert adapter(model).n_frequency == 100 and adapter(model, DOWN0).n_frequency == 7


@pytest.mark.parametrize("setting,match", [("n_frequency=0", "n_frequency"), ("scaling=0", "scaling"),
                                           ("random_loc_seed=none", "random_loc_seed"), ("init=ones", "init"),
                                           ("n_frequency_pattern=3", "n_frequency_pattern"), ("colour=3", "unknown setting")])
def test_bad_settings_are_config_errors(setting, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), f"fourierft[{setting}]")


def test_gpt2_conv1d_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="Conv1D.*nn.Linear layers only"):
        peftlab.attach(make_gpt2(), "fourierft")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [
    ("llama-defaults-capped", make_llama, "fourierft"),
    ("llama-pattern", make_llama, "fourierft[n_frequency=64,scaling=30,random_loc_seed=1,targets=[q_proj,v_proj,down_proj]]"),
    ("bert-head", make_bert, "fourierft[n_frequency=200,modules_to_save=[classifier]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_fourierft_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = randomize(peftlab.attach(factory(), spec), std=0.3)
    config = assert_peftlab_file_loads_in_peft(model, factory, ids, tmp_path, "FOURIERFT")
    assert config["init_weights"] is True
    if label == "llama-defaults-capped":  # the capped k/v layers are written as PEFT patterns
        assert config["n_frequency"] == 1000 and set(config["n_frequency_pattern"].values()) == {512}
        assert K0 in config["n_frequency_pattern"]


def test_per_module_counts_are_written_as_patterns(ids, tmp_path):
    config = fourierft.FourierFTConfig(n_frequency=100, n_frequency_pattern={"down_proj": 7, r"layers\.1\..*q_proj": 9})
    model = randomize(peftlab.attach(make_llama(), config), std=0.3)
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    written = read_adapter_config(tmp_path)
    assert written["n_frequency"] == 100 and set(written["n_frequency_pattern"].values()) == {7, 9}
    torch.testing.assert_close(peft_logits(make_llama, tmp_path, ids), expected, rtol=0, atol=1e-5)


PEFTS = [
    ("llama-q-v", make_llama, dict(n_frequency=100, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    ("llama-patterns", make_llama, dict(n_frequency=300, scaling=50.0, random_loc_seed=9, target_modules="all-linear",
                                        n_frequency_pattern={"k_proj": 20, r"layers\.1\.mlp\.down_proj": 5},
                                        init_weights=True, task_type="CAUSAL_LM")),
    ("bert-seq-cls", make_bert, dict(n_frequency=64, target_modules=["query", "value"], task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_fourierft_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    expected = peft_adapter_file(factory, peft.FourierFTConfig, kwargs, tmp_path, ids, randomize=randomize, std=0.3)
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected)


def test_tensors_that_contradict_the_config_are_a_format_error(tmp_path):
    peftlab.save(peftlab.attach(make_llama(), "fourierft[n_frequency=100]"), tmp_path)
    config = read_adapter_config(tmp_path)
    assert_config_edit_is_a_format_error(tmp_path, config, {"n_frequency": 50}, "do not belong together")
    assert_config_edit_is_a_format_error(tmp_path, config, {"bias": "all"}, "bias")
