"""LoRA's math: scaling, rsLoRA, dropout, per-module ranks, PiSSA, and the fused autograd path."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import logits, make_gpt2, make_llama, randomize_adapters
from torch import nn

import peftlab
from peftlab.core.layer import AdapterLayer
from peftlab.core.state import AdapterState
from peftlab.methods import lora as lora_mod
from peftlab.methods.lora import LoraConfig, LoraLinear


def _layer(model, name):
    layer = model.get_submodule(name)
    assert isinstance(layer, AdapterLayer)
    return layer


Q0 = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("rslora,expected", [(False, 24 / 4), (True, 24 / 2)])
def test_scaling_and_layer_output(rslora, expected):
    model = make_llama()
    peftlab.attach(model, f"lora[r=4,alpha=24,rslora={str(rslora).lower()},targets=q_proj]")
    randomize_adapters(model)
    layer = _layer(model, Q0)
    adapter = layer.adapters["default"]
    assert adapter.scaling == expected
    x = torch.randn(2, 5, 32)
    W, A, B = layer.base_layer.weight, adapter.lora_A.weight, adapter.lora_B.weight
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ W.T + expected * (x @ A.T) @ B.T, rtol=0, atol=1e-5)


def test_rslora_scale_stays_stable_with_rank():
    for r in (4, 16, 64):
        assert lora_mod.scaling(8, r, rslora=True) == pytest.approx(8 / math.sqrt(r))
        assert lora_mod.scaling(8, r, rslora=False) == pytest.approx(8 / r)


def test_gaussian_init():
    torch.manual_seed(0)
    adapter = LoraLinear(nn.Linear(256, 128), r=8, alpha=16, init="gaussian")
    assert torch.count_nonzero(adapter.lora_B.weight) == 0
    assert adapter.lora_A.weight.std().item() == pytest.approx(1 / 8, rel=0.05)


def test_dropout_only_in_train_mode():
    model = make_llama()
    peftlab.attach(model, "lora[r=4,dropout=0.5,targets=[q_proj,v_proj]]")
    randomize_adapters(model, std=0.5)
    assert not any(m.training for m in model.modules()), "attach must keep an eval model in eval mode"
    ids = torch.randint(3, 90, (2, 6))
    a, b = logits(model, ids), logits(model, ids)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # eval output is the adapter without dropout: equal to the manually merged weights
    expected = make_llama()
    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, AdapterLayer):
                expected.get_submodule(name).weight += layer.adapters["default"].delta_weight()
    torch.testing.assert_close(a, logits(expected, ids), rtol=0, atol=1e-5)
    model.train()
    torch.manual_seed(0)
    c = logits(model, ids)
    d = logits(model, ids)
    assert not torch.allclose(c, d, atol=1e-4) and not torch.allclose(c, a, atol=1e-4)
    with peftlab.disabled(model):  # no adapter, no dropout: the base (whose own dropout is 0)
        torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=0)


def test_attach_keeps_train_mode():
    model = make_llama().train()
    peftlab.attach(model, "lora[r=2,dropout=0.1,targets=q_proj]")
    assert all(m.training for m in model.modules())


def test_rank_and_alpha_pattern():
    model = make_llama()
    config = LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"],
                        rank_pattern={"v_proj": 2, r"model\.layers\.1\.mlp\.down_proj": 6},
                        alpha_pattern={"layers.0.self_attn.q_proj": 32})
    peftlab.attach(model, config)
    got = {n: (m.adapters["default"].r, m.adapters["default"].scaling) for n, m in model.named_modules()
           if isinstance(m, AdapterLayer)}
    assert got == {
        "model.layers.0.self_attn.q_proj": (4, 32 / 4),
        "model.layers.1.self_attn.q_proj": (4, 8 / 4),
        "model.layers.0.self_attn.v_proj": (2, 8 / 2),
        "model.layers.1.self_attn.v_proj": (2, 8 / 2),
        "model.layers.0.mlp.down_proj": (4, 8 / 4),
        "model.layers.1.mlp.down_proj": (6, 8 / 6),
    }
    a = model.get_submodule("model.layers.1.mlp.down_proj").adapters["default"]
    assert a.lora_A.weight.shape == (6, 64) and a.lora_B.weight.shape == (32, 6)


# ---- PiSSA ------------------------------------------------------------------------------------

@pytest.mark.parametrize("factory,name", [(make_llama, Q0), (make_gpt2, "transformer.h.0.attn.c_attn")])
@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_factors_and_residual(factory, name, rslora):
    original = factory()
    W = original.get_submodule(name).weight.detach()
    W = W.t() if type(original.get_submodule(name)).__name__ == "Conv1D" else W  # (out x in)
    model = peftlab.attach(factory(), f"lora[r=4,alpha=8,init=pissa,rslora={str(rslora).lower()}]")
    layer = _layer(model, name)
    a = layer.adapters["default"]
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    principal = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
    torch.testing.assert_close(a.scaling * a.lora_B.weight @ a.lora_A.weight, principal, rtol=0, atol=1e-5)
    # A's rows span the top right singular vectors, B's columns the top left ones
    torch.testing.assert_close(a.lora_A.weight @ Vh[4:].T, torch.zeros(4, W.shape[1] - 4), rtol=0, atol=1e-5)
    residual = lora_mod.base_weight(layer.base_layer)
    torch.testing.assert_close(residual, W - principal, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.linalg.svdvals(residual)[:3], S[4:7], rtol=0, atol=1e-4)


def test_pissa_disabled_and_delete_restore_the_base(ids):
    original = make_llama()
    model = peftlab.attach(make_llama(), "lora[r=4,init=pissa]")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn_like(p))  # "train" it
    assert not torch.allclose(logits(model, ids), logits(original, ids), atol=1e-3)
    with peftlab.disabled(model):
        torch.testing.assert_close(logits(model, ids), logits(original, ids), rtol=0, atol=1e-5)
    peftlab.attach(model, "lora[r=2,targets=q_proj]", name="other")
    randomize_adapters(model, seed=4)
    peftlab.set_active(model, "other")  # PiSSA inactive: its rows get the original base back
    manual = make_llama()
    with torch.no_grad():
        for i in (0, 1):
            name = f"model.layers.{i}.self_attn.q_proj"
            manual.get_submodule(name).weight += model.get_submodule(name).adapters["other"].delta_weight()
    torch.testing.assert_close(logits(model, ids), logits(manual, ids), rtol=0, atol=1e-5)
    peftlab.delete(model, "default")
    torch.testing.assert_close(logits(model, ids), logits(manual, ids), rtol=0, atol=1e-5)
    peftlab.delete(model, "other")
    for k, v in original.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", ["lora[r=4,init=pissa]", "lora[r=4,alpha=4,init=pissa,rslora=true]"])
def test_pissa_export_is_plain_lora_on_the_original_base(spec, ids, tmp_path):
    model = peftlab.attach(make_gpt2() if "rslora" in spec else make_llama(), spec)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn_like(p))
    trained = logits(model, ids)
    for _, layer in model.named_modules():
        if isinstance(layer, AdapterLayer):
            tensors, r, alpha = layer.adapters["default"].hf_state()
            assert r == 8 and tensors["lora_A.weight"].shape[0] == 8 and tensors["lora_B.weight"].shape[1] == 8
    peftlab.save(model, tmp_path)
    fresh = make_gpt2() if "rslora" in spec else make_llama()
    peftlab.load(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, ids), trained, rtol=0, atol=1e-5)


def test_pissa_refuses_embeddings():
    with pytest.raises(peftlab.ConfigError, match="pissa"):
        peftlab.attach(make_llama(), "lora[init=pissa,targets=embed_tokens]")


# ---- the fused autograd path ------------------------------------------------------------------

def _fused_pair(bias: bool, shape, weight_grad: bool = False):
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=bias)
    adapter = LoraLinear(base, r=4, alpha=12)
    with torch.no_grad():
        adapter.lora_B.weight.normal_()
    base.weight.requires_grad_(weight_grad)
    if bias:
        base.bias.requires_grad_(True)
    layer = AdapterLayer(base, AdapterState(configs={"a": []}, active=["a"]))
    layer.adapters["a"] = adapter
    x = torch.randn(*shape, 24)
    return layer, adapter, base, x


def _grads(layer, adapter, base, x, fused: bool, monkeypatch):
    calls = []
    real = lora_mod._FusedLoraLinear.apply
    monkeypatch.setattr(lora_mod._FusedLoraLinear, "apply", lambda *a: calls.append(1) or real(*a))
    x = x.clone().requires_grad_(True)
    if fused:
        out = layer(x)
        assert calls, "the fused path was not taken"
    else:
        out = base(x) + adapter(x, None)
        assert not calls
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * g).sum().backward()
    params = [adapter.lora_A.weight, adapter.lora_B.weight, base.bias, base.weight]
    result = [out.detach(), x.grad] + [p.grad.clone() if p is not None and p.grad is not None else None for p in params]
    for p in params:
        if p is not None:
            p.grad = None
    return result


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4)])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_fused_path_matches_unfused(bias, shape, weight_grad, monkeypatch):
    layer, adapter, base, x = _fused_pair(bias, shape, weight_grad)
    fused = _grads(layer, adapter, base, x, True, monkeypatch)
    plain = _grads(layer, adapter, base, x, False, monkeypatch)
    labels = ["out", "x", "A", "B", "bias", "weight"]
    for label, f, p in zip(labels, fused, plain):
        if p is None:
            assert f is None, label
        else:
            torch.testing.assert_close(f, p, rtol=0, atol=1e-5, msg=label)
    assert fused[-1] is None if not weight_grad else fused[-1] is not None


def test_fused_path_in_a_model_matches_training_step(monkeypatch, ids):
    """The same SGD step with and without the fused path gives the same adapter weights."""
    results = []
    for fused in (True, False):
        model = peftlab.attach(make_llama(), "lora[r=4,targets=all-linear]")
        randomize_adapters(model)
        if not fused:
            monkeypatch.setattr(LoraLinear, "fused_forward", lambda self, base, x: None)
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        results.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    for n in results[0]:
        torch.testing.assert_close(results[0][n], results[1][n], rtol=0, atol=1e-5, msg=n)


def test_autocast_training_step(ids):
    """Under autocast the layer runs in mixed precision (the fused fp32 path must not be used)."""
    model = peftlab.attach(make_llama(), "lora[r=4,targets=all-linear]")
    randomize_adapters(model)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    reference = model(input_ids=ids, labels=ids).loss  # fp32
    assert abs(loss.item() - reference.item()) < 0.05
