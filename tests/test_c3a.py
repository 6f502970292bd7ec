"""C3A: a block-circulant update built from trained kernels and applied by FFT, merging, and HF
PEFT's C3A format checked against the real ``peft`` package both ways."""
from __future__ import annotations

import json
import math

import peft
import pytest
import torch
from conftest import (
    assert_peft_adapter_loads_and_goes_back, assert_peftlab_file_loads_in_peft, logits, make_bert, make_gpt2,
    make_llama, peft_adapter_file, read_adapter_config,
)
from safetensors.torch import load_file, save_file

import peftlab
from peftlab.core.layer import AdapterLayer
from peftlab.methods import c3a

Q0, K0, DOWN0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"


def randomize(model, seed: int = 0, std: float = 1.0):
    """Every C3A kernel (peftlab's or peft's) to random values, so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "c3a_kernel" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def adapter(model, name=Q0):
    return model.get_submodule(name).adapters["default"]


def hand_circulant(kernel: torch.Tensor) -> torch.Tensor:
    """The block-circulant matrix written entry by entry (float64): output row i*b + s, input
    column j*b + t holds kernel[i, j, (t - s) mod b], so each block is circulant (row s is row 0
    rotated s places to the right)."""
    m, n, b = kernel.shape
    C = torch.zeros(m * b, n * b, dtype=torch.float64)
    for i in range(m):
        for j in range(n):
            for s in range(b):
                for t in range(b):
                    C[i * b + s, j * b + t] = float(kernel[i, j, (t - s) % b])
    return C


# ---- the method --------------------------------------------------------------------------------

def test_update_is_block_circulant_and_the_fft_forward_is_its_matmul():
    """The defining property: delta W = C / in with C block-circulant in the trained kernels, and the
    FFT forward equals the explicit matmul with it; the update's rank is not bounded by a LoRA rank."""
    model = randomize(peftlab.attach(make_llama(), "c3a[block_size=8]"))
    for name, (out_f, in_f) in ((Q0, (32, 32)), (K0, (16, 32)), (DOWN0, (32, 64))):
        a = adapter(model, name)
        assert a.c3a_kernel.shape == (out_f // 8, in_f // 8, 8) and a.c3a_kernel.dtype == torch.float32
        assert sum(p.numel() for p in a.parameters()) == out_f * in_f // 8
        C = hand_circulant(a.c3a_kernel.detach())
        torch.testing.assert_close(a.delta_weight().double(), C / in_f, rtol=1e-6, atol=1e-7)
        x = torch.randn(3, 5, in_f, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(a(x.float(), None).double(), x @ C.T / in_f, rtol=1e-4, atol=1e-5)
        for i in range(out_f // 8):  # every block is circulant: each row is the one above it rotated by one
            block = C[i * 8:(i + 1) * 8, :8]
            torch.testing.assert_close(block[1:], torch.roll(block[:-1], 1, dims=1), rtol=0, atol=0)
        assert torch.linalg.matrix_rank(C) == min(out_f, in_f)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("c3a_kernel") for n in trainable)


def test_block_size_rounds_down_to_a_common_divisor():
    assert c3a.fitting_block(256, 32, 64) == 32 and c3a.fitting_block(256, 576, 1536) == 192
    assert c3a.fitting_block(8, 24, 36) == 6 and c3a.fitting_block(5, 16, 32) == 4 and c3a.fitting_block(7, 3, 5) == 1
    model = peftlab.attach(make_llama(), "c3a")  # defaults: 256 rounds down to 32 (q, o, mlp) and 16 (k, v)
    assert len([m for m in model.modules() if isinstance(m, AdapterLayer)]) == 14
    assert [adapter(model, n).block_size for n in (Q0, K0, DOWN0)] == [32, 16, 32]
    pattern = peftlab.attach(make_llama(), c3a.C3AConfig(block_size=16, block_size_pattern={"down_proj": 4}))
    assert adapter(pattern).block_size == 16 and adapter(pattern, DOWN0).block_size == 4


@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_layer_adds_delta_w_x(routed):
    model = randomize(peftlab.attach(make_llama(), "c3a[block_size=4]"), std=0.5)
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
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_gradients_are_the_dense_gradient_summed_along_each_circulant_diagonal():
    model = peftlab.attach(make_llama(), "c3a[block_size=8]")  # zero kernels: gradients still flow
    model.train()
    layer = model.get_submodule(Q0)
    a = layer.adapters["default"]
    x, weights = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    (layer(x) * weights).sum().backward()
    G = torch.einsum("bto,bti->oi", weights, x).double() / 32  # d loss / d C
    expected = torch.zeros(4, 4, 8, dtype=torch.float64)
    for i in range(4):
        for j in range(4):
            for s in range(8):
                for t in range(8):
                    expected[i, j, (t - s) % 8] += G[i * 8 + s, j * 8 + t]
    torch.testing.assert_close(a.c3a_kernel.grad.double(), expected, rtol=1e-4, atol=1e-6)


def test_starts_as_the_base_with_zero_kernels_and_peft_inits_are_settings(ids):
    model = peftlab.attach(make_llama(), "c3a")
    assert torch.count_nonzero(adapter(model).c3a_kernel) == 0
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=0)
    bound = math.sqrt(6 / (32 + 64))  # xavier_uniform, PEFT's default, on down_proj (out 32, in 64)
    kernel = adapter(peftlab.attach(make_llama(), "c3a[init=xavier_uniform]"), DOWN0).c3a_kernel
    assert 0.8 * bound < float(kernel.detach().abs().max()) <= bound
    kernel = adapter(peftlab.attach(make_llama(), "c3a[init=kaiming_uniform]"), DOWN0).c3a_kernel
    assert 0.8 / 8 < float(kernel.detach().abs().max()) <= 1 / 8
    assert torch.count_nonzero(adapter(peftlab.attach(make_llama(), "c3a[init=gaussian]")).c3a_kernel) == 32


def test_merge_equals_unmerged_and_unmerge_restores(ids):
    model = randomize(peftlab.attach(make_llama(), "c3a[block_size=8]"))
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
    model = randomize(peftlab.attach(make_llama(), c3a.C3AConfig(block_size=8, block_size_pattern={"down_proj": 2})))
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    loaded = peftlab.load(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)
    assert adapter(loaded, DOWN0).block_size == 2


@pytest.mark.parametrize("setting,match", [("block_size=0", "block_size"), ("block_size=2.5", "block_size"),
                                           ("init=ones", "init"), ("block_size_pattern=3", "block_size_pattern"),
                                           ("colour=3", "unknown setting")])
def test_bad_settings_are_config_errors(setting, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), f"c3a[{setting}]")


def test_gpt2_conv1d_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="Conv1D.*nn.Linear layers only"):
        peftlab.attach(make_gpt2(), "c3a")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [
    ("llama-defaults-rounded", make_llama, "c3a"),
    ("llama-pattern", make_llama, "c3a[block_size=8,init=xavier_uniform,targets=[q_proj,v_proj,down_proj]]"),
    ("bert-head", make_bert, "c3a[block_size=4,modules_to_save=[classifier]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_c3a_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = randomize(peftlab.attach(factory(), spec), std=0.5)
    config = assert_peftlab_file_loads_in_peft(model, factory, ids, tmp_path, "C3A")
    if label == "llama-defaults-rounded":  # k and v (16 wide) are written as PEFT patterns
        assert config["block_size"] == 32 and config["init_weights"] is True
        assert set(config["block_size_pattern"].values()) == {16} and K0 in config["block_size_pattern"]


PEFTS = [
    ("llama-q-v", make_llama, dict(block_size=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    ("llama-patterns", make_llama, dict(block_size=8, target_modules="all-linear", init_weights="kaiming_uniform",
                                        block_size_pattern={"k_proj": 4, r"layers\.1\.mlp\.down_proj": 2},
                                        task_type="CAUSAL_LM")),
    ("llama-default-init", make_llama, dict(block_size=32, target_modules=["o_proj", "up_proj"], task_type="CAUSAL_LM")),
    ("bert-seq-cls", make_bert, dict(block_size=8, target_modules=["query", "value"], task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_c3a_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    expected = peft_adapter_file(
        factory, peft.C3AConfig, kwargs, tmp_path, ids,
        # PEFT's own xavier_uniform init already moves the model
        randomize=None if label == "llama-default-init" else randomize,
        std=4.0 if factory is make_bert else 0.5,  # the tiny BERT's logits are small
    )
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected)
    if label == "llama-patterns":
        ours = peftlab.load(make_llama(), tmp_path)
        assert [adapter(ours, n).block_size for n in (Q0, K0, DOWN0, "model.layers.1.mlp.down_proj")] == [8, 4, 8, 2]


def test_bad_files_are_clear_errors(tmp_path):
    peftlab.save(peftlab.attach(make_llama(), "c3a[block_size=8,targets=[q_proj]]"), tmp_path)
    config = read_adapter_config(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = f"base_model.model.{Q0}.c3a_kernel"

    def load_with(new_config=None, **changes):
        (tmp_path / "adapter_config.json").write_text(json.dumps(new_config or config))
        save_file({**tensors, **changes}, tmp_path / "adapter_model.safetensors")
        fresh = make_llama()
        try:
            peftlab.load(fresh, tmp_path)
        finally:
            assert not [m for m in fresh.modules() if isinstance(m, AdapterLayer)]

    with pytest.raises(peftlab.IncompatibleBaseError, match="block size 5"):
        load_with(**{key: torch.zeros(6, 6, 5)})
    with pytest.raises(peftlab.AdapterFormatError, match="floating-point"):
        load_with(**{key: torch.zeros(4, 4)})
    with pytest.raises(peftlab.AdapterFormatError, match="init_weights"):
        load_with({**config, "init_weights": "orthogonal"})
    with pytest.raises(peftlab.AdapterFormatError, match="bias"):
        load_with({**config, "bias": "c3a_only"})


def test_peftlab_info_reads_the_file(tmp_path, capsys):
    from peftlab.cli import main

    model = peftlab.attach(make_llama(), "c3a[block_size=8,targets=[k_proj,v_proj,down_proj]]")
    peftlab.save(model, tmp_path / "adapter")
    assert main(["info", str(tmp_path / "adapter"), "--json"]) in (0, None)
    info = json.loads(capsys.readouterr().out)
    assert info["peft_type"] == "C3A" and info["method"] == "c3a" and info["adapted_modules"] == 6
    assert info["parameters"] == peftlab.summary(model)["adapters"]["default"] == 2 * (64 + 64 + 256)
