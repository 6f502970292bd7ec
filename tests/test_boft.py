"""BOFT: R a product of butterfly factors (permuted block-diagonal orthogonal matrices, PEFT's
permutations) and a scale per output feature; merging; the block rules; and HF PEFT's BOFT format
checked against the real ``peft`` package both ways, with one factor (what PEFT builds on CPU) and
with several (PEFT's CUDA block-diagonal kernel replaced by ``torch.block_diag`` for the test)."""
from __future__ import annotations

import math
import warnings

import peft
import pytest
import torch
from conftest import (
    assert_config_edit_is_a_format_error, assert_peft_adapter_loads_and_goes_back,
    assert_peftlab_file_loads_in_peft, logits, make_bert, make_gpt2, make_llama, read_adapter_config,
)

import peftlab
from peftlab.core.layer import AdapterLayer
from peftlab.methods import boft

Q0, K0, DOWN0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"


def randomize(model, seed: int = 0, std: float = 0.1):
    """Every BOFT block (peftlab's or peft's) random, and every scale near 1, so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "boft_R" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "boft_s" in name:
                p.copy_(1 + torch.randn(p.shape, generator=g) * std)
    return model


def adapter(model, name=Q0):
    return model.get_submodule(name).adapters["default"]


class BlockDiagKernel:
    """A CPU stand-in for PEFT's CUDA ``fbd_cuda`` extension (block-diagonal of each factor's blocks),
    so PEFT builds the butterfly factors it is asked for instead of falling back to one."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*factor.unbind(0)) for factor in blocks])]


@pytest.fixture
def peft_butterflies(monkeypatch):
    import peft.tuners.boft.layer as layer

    monkeypatch.setattr(layer, "get_fbd_cuda", lambda: BlockDiagKernel)


# ---- the method --------------------------------------------------------------------------------

def test_rotation_is_a_product_of_orthogonal_butterfly_factors():
    """The defining property: M = B_{m-1} ... B_0, each B_i = P_i diag(R_i1 .. R_ik) P_i^T orthogonal
    with k b x b blocks after its permutation; with m = log2(k) + 1 factors M is dense, and orthogonal."""
    k, b = 8, 4  # 32 inputs
    m = int(math.log2(k)) + 1
    model = peftlab.attach(make_llama(), f"boft[block_size={b},n_butterfly_factor={m},targets=q_proj]")
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(input_ids=torch.randint(3, 96, (2, 6)), labels=torch.randint(3, 96, (2, 6))).loss.backward()
    optimizer.step()
    randomize(model, std=0.3)
    a = adapter(model)
    assert a.boft_R.shape == (m, k, b, b)
    product = torch.eye(32)
    for i in range(m):
        B = a.factor(i).detach()
        torch.testing.assert_close(B.T @ B, torch.eye(32), rtol=0, atol=1e-5)
        perm = boft.butterfly_permutation(32, k, b, i, m)
        P = torch.eye(32)[perm]  # P[j, perm[j]] = 1
        outside = 1 - torch.block_diag(*[torch.ones(b, b)] * k)
        assert torch.count_nonzero((P.T @ B @ P) * outside) == 0, f"factor {i}: k b x b blocks once permuted"
        assert torch.count_nonzero(B) <= k * b * b
        product = B @ product
    M = a.rotation().detach()
    torch.testing.assert_close(M, product, rtol=0, atol=1e-6)
    torch.testing.assert_close(M.T @ M, torch.eye(32), rtol=0, atol=1e-5)
    assert torch.all(M.abs() > 0), "log2(k) + 1 butterfly factors reach every input from every input"


def test_permutations_are_peft_butterflies():
    from peft.tuners.boft.layer import BOFTLayer

    for n, k, b, m in [(32, 8, 4, 4), (64, 16, 4, 3), (64, 4, 16, 2), (48, 12, 4, 3), (32, 16, 2, 5)]:
        for i in range(m):
            theirs = BOFTLayer.block_butterfly_perm(None, n, int(k / 2 ** i), int(b / 2), m - 1)
            assert torch.equal(boft.butterfly_permutation(n, k, b, i, m), theirs), (n, k, b, m, i)


def test_merged_weight_keeps_the_angles_between_neurons_up_to_the_scale():
    model = randomize(peftlab.attach(make_llama(), "boft[block_size=4,n_butterfly_factor=3]"), std=0.3)
    layer = model.get_submodule(DOWN0)
    a = layer.adapters["default"]
    W = layer.base_layer.weight.detach().clone()
    s = a.boft_s.detach().clone()
    peftlab.merge(model)
    merged = layer.base_layer.weight.detach()
    torch.testing.assert_close(merged, s * (W @ a.rotation().T), rtol=0, atol=1e-6)
    unscaled = merged / s
    torch.testing.assert_close(unscaled @ unscaled.T, W @ W.T, rtol=0, atol=1e-5)


@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_layer_turns_its_input_and_scales_its_output(routed):
    model = randomize(peftlab.attach(make_llama(), "boft[block_size=4,n_butterfly_factor=2]"))
    layer = model.get_submodule(K0)  # 16 x 32
    a = layer.adapters["default"]
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        W, s = layer.base_layer.weight, a.boft_s[:, 0]
        expected = (x @ a.rotation()) @ W.T * s
        if routed:
            with peftlab.routing(model, ["default", None, "default"]):
                out = layer(x)
            expected[1] = layer.base_layer(x[1])
        else:
            out = layer(x)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(a(x, layer.base_layer(x)), (x @ a.rotation()) @ W.T * s - x @ W.T, rtol=0, atol=1e-5)


def test_gradients_match_the_dense_formula():
    model = randomize(peftlab.attach(make_llama(), "boft[block_size=4,n_butterfly_factor=3]"))
    model.train()
    layer = model.get_submodule(DOWN0)
    a = layer.adapters["default"]
    x = torch.randn(2, 5, 64, requires_grad=True)
    weights = torch.randn(2, 5, 32)
    (layer(x) * weights).sum().backward()
    params = (x, a.boft_R, a.boft_s)
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    W = layer.base_layer.weight
    (torch.nn.functional.linear(x, a.boft_s * (W @ a.rotation().T), layer.base_layer.bias) * weights).sum().backward()
    for mine, dense in zip(got, [p.grad for p in params]):
        torch.testing.assert_close(mine, dense, rtol=1e-4, atol=1e-5)


def test_starts_as_the_base_exactly(ids):
    model = peftlab.attach(make_llama(), "boft[n_butterfly_factor=2]")
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=0)


@pytest.mark.parametrize("spec", ["boft", "boft[block_num=4,n_butterfly_factor=3]"])
def test_merge_equals_unmerged_and_unmerge_restores(spec, ids):
    model = randomize(peftlab.attach(make_llama(), spec), std=0.2)
    layer = model.get_submodule(Q0)
    W = layer.base_layer.weight.detach().clone()
    unmerged = logits(model, ids)
    peftlab.merge(model)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)


def test_save_load_round_trip_is_exact(ids, tmp_path):
    model = randomize(peftlab.attach(make_llama(), "boft[block_size=4,n_butterfly_factor=2]"))
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    torch.testing.assert_close(logits(peftlab.load(make_llama(), tmp_path), ids), expected, rtol=0, atol=0)


def test_spec_string_and_defaults_attach_to_tiny_widths():
    model = peftlab.attach(make_llama(), "boft")  # PEFT's block size 4, one factor
    assert adapter(model).boft_R.shape == (1, 8, 4, 4) and adapter(model, DOWN0).boft_R.shape == (1, 16, 4, 4)
    assert adapter(model, K0).boft_s.shape == (16, 1)
    assert len([m for m in model.modules() if isinstance(m, AdapterLayer)]) == 14
    model = peftlab.attach(make_llama(), "boft[block_size=4,n_butterfly_factor=2]")
    assert adapter(model).boft_R.shape == (2, 8, 4, 4)
    model = peftlab.attach(make_llama(), "boft[block_num=4]")
    assert adapter(model).boft_R.shape == (1, 4, 8, 8) and adapter(model, DOWN0).boft_R.shape == (1, 4, 16, 16)


def test_dropout_acts_in_training_only():
    model = randomize(peftlab.attach(make_llama(), "boft[block_size=4,dropout=0.5]"))
    layer = model.get_submodule(Q0)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        evaluated = layer(x)
        model.train()
        torch.manual_seed(0)
        assert not torch.allclose(layer(x), evaluated, atol=1e-4)


@pytest.mark.parametrize("spec,match", [("boft[block_size=3]", "block_size=3 does not divide "
                                         "'model.layers.0.self_attn.q_proj' \\(32 inputs\\)"),
                                        ("boft[block_size=8,n_butterfly_factor=4]", "needs block_size x 2\\^3 = 64"),
                                        ("boft[block_num=4,n_butterfly_factor=4]", "multiple of 2"),
                                        ("boft[block_size=4,block_num=8]", "not both"),
                                        ("boft[n_butterfly_factor=0]", "n_butterfly_factor"),
                                        ("boft[dropout=1]", "dropout"), ("boft[colour=3]", "unknown setting")])
def test_bad_settings_are_config_errors(spec, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), spec)


def test_gpt2_conv1d_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="Conv1D.*nn.Linear layers only"):
        peftlab.attach(make_gpt2(), "boft")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [
    ("llama-defaults", make_llama, "boft", False),
    ("llama-block-num", make_llama, "boft[block_num=4,targets=[q_proj,v_proj,down_proj]]", False),
    ("llama-butterflies", make_llama, "boft[block_size=4,n_butterfly_factor=3]", True),
    ("bert-head", make_bert, "boft[block_size=8,n_butterfly_factor=2,modules_to_save=[classifier]]", True),
]


@pytest.mark.parametrize("label,factory,spec,butterflies", OURS, ids=[c[0] for c in OURS])
def test_peftlab_boft_loads_in_peft(label, factory, spec, butterflies, ids, tmp_path, request):
    if butterflies:
        request.getfixturevalue("peft_butterflies")
    model = randomize(peftlab.attach(factory(), spec), std=0.3)
    config = assert_peftlab_file_loads_in_peft(model, factory, ids, tmp_path, "BOFT", matters_atol=1e-4)
    assert bool(config["boft_block_size"]) != bool(config["boft_block_num"])


PEFTS = [
    ("llama-defaults", make_llama, dict(target_modules="all-linear", task_type="CAUSAL_LM"), False),
    ("llama-says-2-cpu-builds-1", make_llama, dict(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=2,
                                                   target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"), False),
    ("llama-butterflies", make_llama, dict(boft_block_size=2, boft_n_butterfly_factor=5, target_modules="all-linear",
                                           task_type="CAUSAL_LM"), True),
    ("bert-seq-cls", make_bert, dict(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["query", "value"],
                                     task_type="SEQ_CLS"), True),
]


@pytest.mark.parametrize("label,factory,kwargs,butterflies", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_boft_loads_in_peftlab(label, factory, kwargs, butterflies, ids, tmp_path, request):
    if butterflies:
        request.getfixturevalue("peft_butterflies")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = randomize(peft.get_peft_model(factory(), peft.BOFTConfig(**kwargs)).eval(), seed=3, std=0.3)
        expected = logits(theirs, ids)
        theirs.save_pretrained(str(tmp_path))
    factors = next(p.shape[0] for n, p in theirs.named_parameters() if "boft_R" in n)
    assert factors == (kwargs.get("boft_n_butterfly_factor", 1) if butterflies else 1)
    assert not torch.allclose(expected, logits(factory(), ids), atol=1e-4), "the adapter should matter"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected)


def test_tensors_that_contradict_the_config_are_a_format_error(tmp_path):
    peftlab.save(peftlab.attach(make_llama(), "boft[block_size=4]"), tmp_path)
    config = read_adapter_config(tmp_path)
    assert_config_edit_is_a_format_error(tmp_path, config, {"boft_block_size": 8}, "do not belong together")
    assert_config_edit_is_a_format_error(tmp_path, config, {"bias": "boft_only"}, "bias")
