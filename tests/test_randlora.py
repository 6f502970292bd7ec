"""RandLoRA: a full-rank update from frozen random low-rank bases shared by every layer, with only
small diagonal scalings trained; the bases drawn from the seed bit for bit as PEFT draws them;
merging; and HF PEFT's RANDLORA format checked against the real ``peft`` package both ways."""
from __future__ import annotations

import math
import warnings

import peft
import pytest
import torch
from conftest import (
    assert_config_edit_is_a_format_error, assert_peft_adapter_loads_and_goes_back,
    assert_peftlab_file_loads_in_peft, logits, make_bert, make_gpt2, make_llama, peft_adapter_file,
    read_adapter_config,
)
from safetensors.torch import load_file

import peftlab
from peftlab.core import adapters as core
from peftlab.core.layer import AdapterLayer
from peftlab.methods import randlora

Q0, K0, DOWN0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"


def randomize(model, seed: int = 0, std: float = 0.05):
    """Every RandLoRA scaling (peftlab's or peft's) to random values, so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "randlora_lambda" in name or "randlora_gamma" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def adapter(model, name=Q0):
    return model.get_submodule(name).adapters["default"]


def expected_update(a) -> torch.Tensor:
    """The paper's sum over bases, written out: scale * sum_j B_j diag(lambda_j) A diag(gamma_j) on the
    short side, with B_j the columns PEFT pairs with row block j of the scaled A (its flattening)."""
    A, B = a.bases()
    n, short = a.randlora_gamma.shape
    long, r = max(a.in_features, a.out_features), a.r
    A = A[:, 0, :short]  # r x short, shared by every basis
    B_cols = B[:long, :n, :].reshape(long, n * r)  # column c = (basis c // r, rank c % r)
    total = torch.zeros(long, short)
    for j in range(n):  # basis j: A's rows scaled by lambda[:, j], its columns by gamma[j]
        rows = [k * n + j for k in range(r)]  # where PEFT's flattening puts (rank k, basis j)
        B_j = B_cols[:, rows]
        total += B_j @ torch.diag(a.randlora_lambda[:, j]) @ A @ torch.diag(a.randlora_gamma[j])
    total = a.scaling * total
    return total if a.in_features == short else total.T


# ---- the method --------------------------------------------------------------------------------

def test_a_full_rank_update_from_frozen_bases_with_only_scalings_trained():
    """The defining property: r = 4 bases on 16 / 32 / 64-wide layers give updates of full rank (far
    beyond r); the bases are one frozen pair for the model; a layer trains r n + n short numbers."""
    r = 4
    model = randomize(peftlab.attach(make_llama(), f"randlora[r={r}]"))
    adapters = [a for _, a in core.all_adapters(model)]
    assert len(adapters) == 14
    for name in (Q0, K0, DOWN0):
        a = adapter(model, name)
        short = min(a.in_features, a.out_features)
        delta = a.delta_weight().detach()
        assert torch.linalg.matrix_rank(delta) == short > r
        torch.testing.assert_close(delta, expected_update(a).detach(), rtol=1e-4, atol=1e-6)
        n = math.ceil(short / r)
        assert sum(p.numel() for p in a.parameters()) == r * n + n * short
    A, B = adapters[0].bases()
    assert A.shape == (r, 1, 64) and B.shape == (64, 16, r)
    assert all(a.bases()[0] is A and a.bases()[1] is B for a in adapters)
    assert not A.requires_grad and not B.requires_grad
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(("randlora_lambda", "randlora_gamma")) for n in trainable)
    model.train()
    before = (A.clone(), B.clone())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(input_ids=torch.randint(3, 96, (2, 5)), labels=torch.randint(3, 96, (2, 5))).loss.backward()
    optimizer.step()
    assert torch.equal(A, before[0]) and torch.equal(B, before[1])


@pytest.mark.parametrize("kwargs", [dict(r=8), dict(r=5, projection_prng_key=3, sparse=True),
                                    dict(r=4, projection_prng_key=9, very_sparse=True)], ids=["dense", "sparse", "very-sparse"])
def test_bases_are_peft_draws_from_the_key_bit_for_bit(kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_llama(), peft.RandLoraConfig(target_modules=["k_proj", "down_proj"], **kwargs))
    spec = "randlora[" + ",".join(f"{k}={v}" for k, v in kwargs.items()) + ",targets=[k_proj,down_proj]]"
    A, B = adapter(peftlab.attach(make_llama(), spec), K0).bases()
    assert A.shape[-1] == 32 and B.shape[0] == 64  # largest out: 32 (down), largest in: 64 (down)
    torch.testing.assert_close(A, theirs.base_model.randlora_A["default"], rtol=0, atol=0)
    torch.testing.assert_close(B, theirs.base_model.randlora_B["default"], rtol=0, atol=0)
    if kwargs.get("sparse") or kwargs.get("very_sparse"):
        for t in (A, B):  # ternary: -c, 0, c
            values = t.unique()
            assert len(values) == 3 and values[1] == 0 and values[0] == -values[2]


def test_dense_bases_follow_the_recipe():
    """Kaiming-uniform (a = sqrt(5)) in bfloat16 from one generator, A then each block of B, over the std."""
    A, B = randlora.bases(3, 10, 7, key=4)
    g = torch.Generator().manual_seed(4)

    def draw(shape):
        bound = 1 / math.sqrt(shape[1] * shape[2])  # gain sqrt(1/3) * sqrt(3 / fan_in)
        return torch.empty(shape, dtype=torch.bfloat16).uniform_(-bound, bound, generator=g)

    a = draw((3, 1, 7))
    b = torch.cat([draw((10, 1, 3)) for _ in range(3)], dim=1)
    torch.testing.assert_close(A, (a / a.std()).float(), rtol=0, atol=0)
    torch.testing.assert_close(B, (b / b.std()).float(), rtol=0, atol=0)


@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_layer_adds_the_scaled_sum_of_bases(routed):
    model = randomize(peftlab.attach(make_llama(), "randlora[r=6]"))
    layer = model.get_submodule(K0)  # 16 x 32: the scalings act on the 16-wide output side
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
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a(x, None), x @ expected_update(a).T, rtol=1e-4, atol=1e-5)  # the unfused route


def test_fused_gradients_match_the_plain_formula():
    model = randomize(peftlab.attach(make_llama(), "randlora[r=6]"))
    model.train()
    layer = model.get_submodule(DOWN0)  # 32 x 64: wider than tall, the product is transposed
    a = layer.adapters["default"]
    params = (a.randlora_lambda, a.randlora_gamma)
    x = torch.randn(2, 5, 64, requires_grad=True)
    weights = torch.randn(2, 5, 32)
    (layer(x) * weights).sum().backward()
    got = [p.grad.clone() for p in (x, *params)]
    for p in (x, *params):
        p.grad = None
    delta = randlora.delta_weight(*a.bases(), *params, 64, 32, a.scaling)
    (torch.nn.functional.linear(x, layer.base_layer.weight + delta, layer.base_layer.bias) * weights).sum().backward()
    for mine, plain in zip(got, [p.grad for p in (x, *params)]):
        torch.testing.assert_close(mine, plain, rtol=1e-4, atol=1e-5)


def test_starts_as_the_base_with_lambda_zero(ids):
    model = peftlab.attach(make_llama(), "randlora[r=8]")
    a = adapter(model, K0)  # short side 16, n = 2 bases
    assert torch.count_nonzero(a.randlora_lambda) == 0 and torch.all(a.randlora_gamma == 1 / 16)
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=0)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert torch.count_nonzero(a.randlora_lambda.grad), "lambda learns from the first step"
    random = adapter(peftlab.attach(make_llama(), "randlora[r=8,init=random]"), K0)
    assert torch.count_nonzero(random.randlora_lambda) and torch.all(random.randlora_gamma == 1 / 32)


def test_merge_adds_the_update_and_equals_unmerged(ids):
    model = randomize(peftlab.attach(make_llama(), "randlora[r=8]"))
    layer = model.get_submodule(Q0)
    W = layer.base_layer.weight.detach().clone()
    unmerged = logits(model, ids)
    peftlab.merge(model)
    torch.testing.assert_close(layer.base_layer.weight, W + expected_update(layer.adapters["default"]), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)


@pytest.mark.parametrize("save_projection", [True, False])
def test_save_load_round_trip_is_exact(ids, tmp_path, save_projection):
    model = randomize(peftlab.attach(make_llama(), f"randlora[r=8,projection_prng_key=3,save_projection={save_projection}]"))
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    assert ("base_model.randlora_A" in load_file(tmp_path / "adapter_model.safetensors")) == save_projection
    torch.testing.assert_close(logits(peftlab.load(make_llama(), tmp_path), ids), expected, rtol=0, atol=0)


def test_spec_string_and_defaults_attach_to_tiny_widths():
    model = peftlab.attach(make_llama(), "randlora")  # r=32: one basis on 32-wide layers, two on 64
    a = adapter(model)
    assert (a.r, a.n, a.scaling) == (32, 1, 20.0) and a.bases()[1].shape == (64, 2, 32)
    assert len([m for m in model.modules() if isinstance(m, AdapterLayer)]) == 14


def test_two_randlora_adapters_have_their_own_bases():
    model = peftlab.attach(make_llama(), "randlora[r=4,targets=q_proj]")
    peftlab.attach(model, "randlora[r=8,projection_prng_key=1,targets=q_proj]", name="other")
    layer = model.get_submodule(Q0)
    assert layer.adapters["default"].bases()[1].shape == (32, 8, 4)
    assert layer.adapters["other"].bases()[1].shape == (32, 4, 8)


@pytest.mark.parametrize("setting,match", [("r=0", "rank"), ("alpha=0", "alpha"), ("dropout=1.5", "dropout"),
                                           ("projection_prng_key=x", "projection_prng_key"), ("sparse=2", "sparse"),
                                           ("init=ones", "init"), ("colour=3", "unknown setting")])
def test_bad_settings_are_config_errors(setting, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), f"randlora[{setting}]")


def test_gpt2_conv1d_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="Conv1D.*nn.Linear layers only"):
        peftlab.attach(make_gpt2(), "randlora")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [
    ("llama-defaults", make_llama, "randlora"),
    ("llama-no-projection", make_llama, "randlora[r=6,projection_prng_key=7,save_projection=false,targets=[q_proj,v_proj,down_proj]]"),
    ("llama-sparse", make_llama, "randlora[r=4,alpha=40,very_sparse=true,targets=[k_proj,up_proj]]"),
    ("bert-head", make_bert, "randlora[r=8,modules_to_save=[classifier]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_randlora_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = randomize(peftlab.attach(factory(), spec))
    config = assert_peftlab_file_loads_in_peft(model, factory, ids, tmp_path, "RANDLORA")
    assert "randlora_alpha" in config


PEFTS = [
    ("llama-q-v", make_llama, dict(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    ("llama-all-linear", make_llama, dict(r=16, randlora_alpha=100, projection_prng_key=11, target_modules="all-linear",
                                          task_type="CAUSAL_LM")),
    ("llama-no-projection-sparse", make_llama, dict(r=4, save_projection=False, sparse=True, projection_prng_key=2,
                                                    target_modules=["k_proj", "down_proj"], task_type="CAUSAL_LM")),
    ("bert-seq-cls", make_bert, dict(r=8, target_modules=["query", "value"], task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_randlora_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    expected = peft_adapter_file(factory, peft.RandLoraConfig, kwargs, tmp_path, ids, randomize=randomize)
    # peft warns when it regenerates the bases from the key
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected, quiet=True)


def test_missing_bases_or_bias_training_is_a_format_error(tmp_path):
    peftlab.save(randomize(peftlab.attach(make_llama(), "randlora[r=4,save_projection=false]")), tmp_path)
    config = read_adapter_config(tmp_path)
    assert_config_edit_is_a_format_error(tmp_path, config, {"save_projection": True}, "lacks base_model.randlora_A")
    assert_config_edit_is_a_format_error(tmp_path, config, {"bias": "randlora_only"}, "bias")


def test_tensors_that_contradict_the_config_are_a_format_error(tmp_path):
    peftlab.save(peftlab.attach(make_llama(), "randlora[r=8]"), tmp_path)
    config = read_adapter_config(tmp_path)
    assert_config_edit_is_a_format_error(tmp_path, config, {"r": 4}, "do not belong together")


def test_peftlab_info_reads_the_file(tmp_path):
    from peftlab import cli

    model = peftlab.attach(make_llama(), "randlora[r=8,targets=[k_proj,v_proj,down_proj]]")
    peftlab.save(model, tmp_path)
    info = cli.adapter_info(tmp_path)
    assert info["peft_type"] == "RANDLORA" and info["adapted_modules"] == 6
    assert info["parameters"] == peftlab.summary(model)["adapters"]["default"]  # the frozen bases are not counted


def test_peftlab_info_of_a_peft_file_leaves_out_its_per_layer_copies_of_the_bases(tmp_path):
    from peftlab import cli

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_llama(), peft.RandLoraConfig(r=8, target_modules=["q_proj"]))
        theirs.save_pretrained(str(tmp_path))
    assert "base_model.model.model.layers.0.self_attn.q_proj.randlora_A" in load_file(tmp_path / "adapter_model.safetensors")
    info = cli.adapter_info(tmp_path)
    assert info["adapted_modules"] == 2 and info["parameters"] == 2 * (8 * 4 + 4 * 32)
