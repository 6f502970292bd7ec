"""WaveFT: n trained wavelet coefficients at fixed random positions, delta W = scaling * IDWT2, merging,
and HF PEFT's WAVEFT format checked against the real ``peft`` package both ways."""
from __future__ import annotations

import json
import math
import warnings

import peft
import pytest
import torch
from conftest import (
    assert_config_edit_is_a_format_error, assert_peft_adapter_loads_and_goes_back,
    assert_peftlab_file_loads_in_peft, logits, make_bert, make_gpt2, make_llama, peft_adapter_file,
    peft_logits, read_adapter_config,
)
from torch import nn

import peftlab
from peftlab.core.layer import AdapterLayer
from peftlab.methods import waveft

Q0, K0, DOWN0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"


def randomize(model, seed: int = 0, std: float = 1.0):
    """Every spectrum (peftlab's or peft's) to random values, so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "waveft_spectrum" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def adapter(model, name=Q0):
    return model.get_submodule(name).adapters["default"]


def synthesis_matrix(n: int, f) -> torch.Tensor:
    """S (n x (2n + 2 - L)) with S[p, 2p + a - (L - 2)] = f[a]: one-level synthesis from n coefficients."""
    L = len(f)
    S = torch.zeros(n, 2 * n - 2 + L, dtype=torch.float64)
    for p in range(n):
        for a in range(L):
            S[p, 2 * p + a] = f[a]
    return S[:, L - 2: S.shape[1] - (L - 2)]


def idwt_by_hand(a) -> torch.Tensor:
    """scaling * IDWT2 of the layer's coefficients, in float64, from explicit synthesis matrices:
    X = R_lo' cA C_lo + R_hi' cH C_lo + R_lo' cV C_hi + R_hi' cD C_hi (cA top left, cH top right, cV
    bottom left, cD bottom right of the padded matrix, the trained entries offset to its centre),
    cropped about the centre to out x in."""
    lo, hi = waveft.daubechies(a.wavelet_family)
    extra = len(lo) - 2
    rows, cols = (n + extra + (n + extra) % 2 for n in (a.out_features, a.in_features))
    C = torch.zeros(rows, cols, dtype=torch.float64)
    C[a.indices[0] + (rows - a.out_features) // 2, a.indices[1] + (cols - a.in_features) // 2] = \
        a.waveft_spectrum.detach().double()
    h, w = rows // 2, cols // 2
    R_lo, R_hi, C_lo, C_hi = synthesis_matrix(h, lo), synthesis_matrix(h, hi), synthesis_matrix(w, lo), synthesis_matrix(w, hi)
    X = R_lo.T @ C[:h, :w] @ C_lo + R_hi.T @ C[:h, w:] @ C_lo + R_lo.T @ C[h:, :w] @ C_hi + R_hi.T @ C[h:, w:] @ C_hi
    top, left = (X.shape[0] - a.out_features) // 2, (X.shape[1] - a.in_features) // 2
    return X[top:top + a.out_features, left:left + a.in_features] * a.scaling


# ---- the method --------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["db1", "db2", "db3", "db6"])
def test_update_is_the_inverse_dwt_of_the_sparse_coefficients(family):
    """The defining property, against the transform written as synthesis matrices; only n train."""
    model = randomize(peftlab.attach(make_llama(), f"waveft[n_frequency=50,scaling=3,wavelet_family={family}]"))
    for name in (Q0, K0, DOWN0):
        a = adapter(model, name)
        assert a.waveft_spectrum.shape == (50,) and a.indices.shape == (2, 50)
        assert sum(p.numel() for p in a.parameters()) == 50
        torch.testing.assert_close(a.delta_weight().double(), idwt_by_hand(a), rtol=1e-5, atol=1e-5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("waveft_spectrum") for n in trainable)


def test_a_haar_coefficient_moves_one_2x2_patch():
    """Haar by hand: the coefficient at (p, q) of each quadrant adds scaling * c / 2 times
    [[1, 1], [1, 1]] (approximation), [[1, 1], [-1, -1]] (top right), [[1, -1], [1, -1]] (bottom
    left) or [[1, -1], [-1, 1]] (diagonal) at rows 2p, 2p + 1 and columns 2q, 2q + 1; the
    transform is orthonormal, so ||delta W|| = scaling ||c||."""
    signs = {(0, 0): [[1, 1], [1, 1]], (0, 1): [[1, 1], [-1, -1]], (1, 0): [[1, -1], [1, -1]], (1, 1): [[1, -1], [-1, 1]]}
    for (qr, qc), patch in signs.items():
        C = torch.zeros(8, 6)
        C[qr * 4 + 1, qc * 3 + 2] = 0.8
        X = waveft.idwt2(C, "db1")
        expected = torch.zeros(8, 6)
        expected[2:4, 4:6] = 0.4 * torch.tensor(patch, dtype=torch.float32)
        torch.testing.assert_close(X, expected, rtol=0, atol=1e-6)
    a = adapter(randomize(peftlab.attach(make_llama(), "waveft[n_frequency=300,scaling=7]")), DOWN0)
    torch.testing.assert_close(a.delta_weight().norm(), 7 * a.waveft_spectrum.norm(), rtol=1e-5, atol=0)


def test_filters_are_daubechies():
    lo, hi = waveft.daubechies("db2")
    r3 = math.sqrt(3)
    expected = [(1 + r3) / (4 * math.sqrt(2)), (3 + r3) / (4 * math.sqrt(2)), (3 - r3) / (4 * math.sqrt(2)), (1 - r3) / (4 * math.sqrt(2))]
    assert max(abs(x - y) for x, y in zip(lo, expected)) < 1e-14
    assert max(abs(x - y) for x, y in zip(hi, [expected[3], -expected[2], expected[1], -expected[0]])) < 1e-14
    from peft.tuners.waveft.wavelet import Wavelet  # PyWavelets' tables, as PEFT ships them

    for n in range(1, 11):
        lo, hi = waveft.daubechies(f"db{n}")
        assert len(lo) == 2 * n and abs(sum(lo) - math.sqrt(2)) < 1e-12 and abs(sum(x * x for x in lo) - 1) < 1e-12
        torch.testing.assert_close(torch.tensor(lo, dtype=torch.float64), torch.tensor(Wavelet(f"db{n}").rec_lo, dtype=torch.float64), rtol=0, atol=1e-11)
        torch.testing.assert_close(torch.tensor(hi, dtype=torch.float64), torch.tensor(Wavelet(f"db{n}").rec_hi, dtype=torch.float64), rtol=0, atol=1e-11)


@pytest.mark.parametrize("family", ["db1", "db2", "db3"])
@pytest.mark.parametrize("out_features,in_features", [(15, 9), (9, 14), (6, 6)])
def test_odd_shapes_give_peft_update(family, out_features, in_features):
    """Odd widths are padded, offset and cropped as PEFT does."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(nn.Sequential(nn.Linear(in_features, out_features)),
                                     peft.WaveFTConfig(n_frequency=20, wavelet_family=family, target_modules=["0"]))
    randomize(theirs, seed=2)
    ours = randomize(peftlab.attach(nn.Sequential(nn.Linear(in_features, out_features)),
                                    f"waveft[n_frequency=20,wavelet_family={family},targets=[re:0]]"), seed=2)
    a = ours[0].adapters["default"]
    want = theirs.base_model.model[0].get_delta_weight("default")
    torch.testing.assert_close(a.delta_weight(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.delta_weight().double(), idwt_by_hand(a), rtol=1e-5, atol=1e-5)


def test_without_the_transform_the_coefficients_are_the_update():
    a = adapter(randomize(peftlab.attach(make_llama(), "waveft[n_frequency=40,use_idwt=false,scaling=2]")), K0)
    expected = torch.zeros(16, 32)
    expected[a.indices[0], a.indices[1]] = 2 * a.waveft_spectrum.detach()
    torch.testing.assert_close(a.delta_weight(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_layer_adds_delta_w_x(routed):
    model = randomize(peftlab.attach(make_llama(), "waveft[n_frequency=100,wavelet_family=db2]"))
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
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


def test_gradients_reach_each_coefficient_through_its_wavelet():
    model = randomize(peftlab.attach(make_llama(), "waveft[n_frequency=30,scaling=2,wavelet_family=db2]"))
    model.train()
    layer = model.get_submodule(Q0)
    a = layer.adapters["default"]
    x, weights = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    (layer(x) * weights).sum().backward()
    # d loss / d c_k = <G, scaling * IDWT2(e_k)>, with G the gradient of the dense update
    G = torch.einsum("bto,bti->oi", weights, x).double()
    expected = []
    for k in range(30):
        basis = torch.zeros(30)
        basis[k] = 1
        expected.append((waveft.delta_weight(basis, a.indices, 32, 32, a.scaling, "db2").double() * G).sum())
    torch.testing.assert_close(a.waveft_spectrum.grad.double(), torch.stack(expected), rtol=1e-4, atol=1e-4)


def test_starts_as_the_base_with_zero_coefficients(ids):
    model = peftlab.attach(make_llama(), "waveft")
    assert torch.count_nonzero(adapter(model).waveft_spectrum) == 0
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=0)
    gaussian = adapter(peftlab.attach(make_llama(), "waveft[init=gaussian]")).waveft_spectrum  # PEFT's init_weights=False
    assert torch.count_nonzero(gaussian) == 1024 and 0.005 < float(gaussian.detach().std()) < 0.02


def test_merge_adds_the_update_and_equals_unmerged(ids):
    model = randomize(peftlab.attach(make_llama(), "waveft[n_frequency=200,scaling=1,wavelet_family=db3]"), std=0.3)
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
    model = randomize(peftlab.attach(make_llama(), "waveft[n_frequency=300,random_loc_seed=5,wavelet_family=db4]"), std=0.1)
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    loaded = peftlab.load(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)


def test_defaults_attach_to_tiny_widths_with_the_count_capped():
    """n_frequency=2592: q_proj (32 x 32) takes all 1024, k_proj all 512, down_proj all 2048."""
    model = peftlab.attach(make_llama(), "waveft")
    assert len([m for m in model.modules() if isinstance(m, AdapterLayer)]) == 14
    assert [adapter(model, n).n_frequency for n in (Q0, K0, DOWN0)] == [1024, 512, 2048]
    a = adapter(model)
    assert (a.scaling, a.wavelet_family, a.use_idwt, a.random_loc_seed) == (25.0, "db1", True, 777)


@pytest.mark.parametrize("setting,match", [("n_frequency=0", "n_frequency"), ("scaling=0", "scaling"),
                                           ("wavelet_family=sym4", "symlets and coiflets"),
                                           ("wavelet_family=db11", "db1 .* to db10"),
                                           ("random_loc_seed=none", "random_loc_seed"), ("init=ones", "init"),
                                           ("use_idwt=maybe", "use_idwt"),
                                           ("n_frequency_pattern=3", "n_frequency_pattern"), ("colour=3", "unknown setting")])
def test_bad_settings_are_config_errors(setting, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), f"waveft[{setting}]")


def test_gpt2_conv1d_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="Conv1D.*nn.Linear layers only"):
        peftlab.attach(make_gpt2(), "waveft")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [
    ("llama-defaults-capped", make_llama, "waveft"),
    ("llama-db3", make_llama, "waveft[n_frequency=64,scaling=5,wavelet_family=db3,random_loc_seed=1,"
                              "targets=[q_proj,v_proj,down_proj]]"),
    ("llama-no-idwt", make_llama, "waveft[n_frequency=100,use_idwt=false]"),
    ("bert-head", make_bert, "waveft[n_frequency=200,wavelet_family=db2,modules_to_save=[classifier]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_waveft_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = randomize(peftlab.attach(factory(), spec), std=0.02)
    config = assert_peftlab_file_loads_in_peft(model, factory, ids, tmp_path, "WAVEFT")
    assert config["init_weights"] is True
    if label == "llama-defaults-capped":  # every tiny layer is capped: the most common count is the default
        assert config["n_frequency"] == 2048 and set(config["n_frequency_pattern"].values()) == {512, 1024}


def test_per_module_counts_are_written_as_patterns(ids, tmp_path):
    config = waveft.WaveFTConfig(n_frequency=100, wavelet_family="db2",
                                 n_frequency_pattern={"down_proj": 7, r"layers\.1\..*q_proj": 9})
    model = randomize(peftlab.attach(make_llama(), config), std=0.02)
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    written = read_adapter_config(tmp_path)
    assert written["n_frequency"] == 100 and set(written["n_frequency_pattern"].values()) == {7, 9}
    torch.testing.assert_close(peft_logits(make_llama, tmp_path, ids), expected, rtol=0, atol=1e-5)


PEFTS = [
    ("llama-q-v", make_llama, dict(n_frequency=100, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    ("llama-db5-patterns", make_llama, dict(n_frequency=300, scaling=5.0, random_loc_seed=9, wavelet_family="db5",
                                            target_modules="all-linear", init_weights=False, task_type="CAUSAL_LM",
                                            n_frequency_pattern={"k_proj": 20, r"layers\.1\.mlp\.down_proj": 5})),
    ("llama-proportional", make_llama, dict(n_frequency=200, proportional_parameters=True, target_modules="all-linear",
                                            task_type="CAUSAL_LM")),
    ("bert-seq-cls", make_bert, dict(n_frequency=64, wavelet_family="db2", use_idwt=False,
                                     target_modules=["query", "value"], task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_waveft_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    expected = peft_adapter_file(factory, peft.WaveFTConfig, kwargs, tmp_path, ids, randomize=randomize, std=0.1)
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected)


def test_peftlab_info_reads_the_file(tmp_path):
    from peftlab.cli import adapter_info

    model = peftlab.attach(make_llama(), "waveft[n_frequency=40,targets=[k_proj,v_proj,down_proj]]")
    peftlab.save(model, tmp_path)
    info = adapter_info(tmp_path)
    assert info["peft_type"] == "WAVEFT" and info["method"] == "waveft" and info["adapted_modules"] == 6
    assert info["parameters"] == peftlab.summary(model)["adapters"]["default"] == 240


def test_bad_files_are_format_errors(tmp_path):
    peftlab.save(peftlab.attach(make_llama(), "waveft[n_frequency=100]"), tmp_path)
    config = read_adapter_config(tmp_path)
    assert_config_edit_is_a_format_error(tmp_path, config, {"n_frequency": 50}, "do not belong together")
    for wrong, match in (({"bias": "all"}, "bias"), ({"wavelet_family": "coif2"}, "coiflets")):
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **wrong}))
        with pytest.raises(peftlab.AdapterFormatError, match=match):
            peftlab.load(make_llama(), tmp_path)
