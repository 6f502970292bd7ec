"""LoRA-FA: A stays frozen at its random init and only B trains; a layer keeps x A^T (tokens x r) for
the backward pass instead of its input x (tokens x d_in); a LoRA-FA adapter is a LoRA file that
``peft`` loads, and adapters trained with peft's LoRA-FA optimizer load here."""
from __future__ import annotations

import warnings

import peft
import pytest
import torch
from conftest import VOCAB, logits, make_llama, randomize_adapters
from peft.optimizers import create_lorafa_optimizer

import peftlab
from peftlab.core.adapters import adapter_layers
from peftlab.methods.lora_fa import _FrozenALinear
from peftlab.train import TrainConfig, train

R = 4


def lm_batch(rows=4, length=8, seed=0):
    ids = torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def lora_factors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_only_B_trains_and_A_stays_at_its_init():
    model = peftlab.attach(make_llama(), f"lora_fa[r={R}]")
    before = lora_factors(model)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_B" in n)
    rows = [{k: v[i] for k, v in lm_batch().items()} for i in range(4)]
    train(model, rows, TrainConfig(lr=1e-2, steps=3, batch_size=4, warmup_steps=0, progress=False, device="cpu"))
    peftlab.set_active(model, "default")  # making the adapter active again must not unfreeze A
    after = lora_factors(model)
    for name in before:
        if "lora_A" in name:
            assert torch.equal(after[name], before[name]) and not dict(model.named_parameters())[name].requires_grad
        else:
            assert not torch.equal(after[name], before[name])


@pytest.mark.parametrize("bias", [True, False])
def test_the_fused_layer_has_lora_math_and_gradients(bias):
    """Outputs and the gradients of x, B and the bias equal autograd's on ``x W^T + b + s x A^T B^T``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, generator=g)
    W = torch.randn(7, 6, dtype=torch.float64, generator=g)
    b = torch.randn(7, dtype=torch.float64, generator=g) if bias else None
    A = torch.randn(3, 6, dtype=torch.float64, generator=g)
    B = torch.randn(7, 3, dtype=torch.float64, generator=g)
    grads = {}
    for label in ("ours", "reference"):
        xi, Bi = x.clone().requires_grad_(), B.clone().requires_grad_()
        bi = b.clone().requires_grad_() if bias else None
        if label == "ours":
            out = _FrozenALinear.apply(xi, W, bi, A, Bi, 0.5)
        else:
            out = xi @ W.t() + (0 if bi is None else bi) + 0.5 * (xi @ A.t()) @ Bi.t()
        out.pow(2).sum().backward()
        grads[label] = (out.detach(), xi.grad, Bi.grad, None if bi is None else bi.grad)
    for ours, reference in zip(grads["ours"], grads["reference"]):
        if reference is not None:
            torch.testing.assert_close(ours, reference)


def saved_bytes_per_layer(model, batch) -> dict:
    """Bytes of the activations autograd keeps for backward, per adapted layer, during one forward
    (parameters, which autograd keeps by reference, not counted)."""
    params = {p.data_ptr() for p in model.parameters()}
    counts, running = {}, []
    def leave(module, args, output):
        running.pop()

    for name, layer in adapter_layers(model):
        layer.register_forward_pre_hook(lambda module, args, name=name: running.append(name))
        layer.register_forward_hook(leave)

    def pack(t):
        if running and t.data_ptr() not in params:
            counts[running[-1]] = counts.get(running[-1], 0) + t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch).loss.backward()
    return counts


def test_a_layer_keeps_x_A_not_its_input():
    batch = lm_batch()
    tokens = batch["input_ids"].numel()
    plain = peftlab.attach(make_llama(), f"lora[r={R}]")
    frozen_a = peftlab.attach(make_llama(), f"lora_fa[r={R}]")
    plain_bytes, fa_bytes = saved_bytes_per_layer(plain, batch), saved_bytes_per_layer(frozen_a, batch)
    layers = dict(adapter_layers(frozen_a))
    assert set(fa_bytes) == set(plain_bytes) == set(layers)  # every adapted linear layer, q_proj ... down_proj
    for name, layer in layers.items():
        d_in = layer.base_layer.in_features
        assert fa_bytes[name] == tokens * R * 4  # x A^T, fp32
        assert plain_bytes[name] == tokens * (d_in + R) * 4  # x and x A^T
    assert sum(fa_bytes.values()) * 8 < sum(plain_bytes.values())


def test_without_the_fused_path_the_input_is_not_kept_either(monkeypatch):
    """The plain LoRA computation with a frozen A (the path for dropout or quantized bases) keeps no
    copy of x either: nothing trainable needs it."""
    model = peftlab.attach(make_llama(), f"lora_fa[r={R}]")
    for _, layer in adapter_layers(model):
        monkeypatch.setattr(layer.adapters["default"], "fused_forward", lambda base, x: None)
    batch = lm_batch()
    for name, count in saved_bytes_per_layer(model, batch).items():
        assert count == batch["input_ids"].numel() * R * 4, name


def test_saved_as_a_lora_that_peft_loads(ids, tmp_path):
    model = peftlab.attach(make_llama(), f"lora_fa[r={R},alpha=8,targets=[q_proj,v_proj,down_proj]]")
    randomize_adapters(model)
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(make_llama(), str(tmp_path)).eval()
    assert type(theirs.peft_config["default"]).__name__ == "LoraConfig"
    torch.testing.assert_close(logits(theirs, ids), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(peftlab.load(make_llama(), tmp_path), ids), expected, rtol=0, atol=1e-6)


def test_an_adapter_trained_with_peft_lora_fa_optimizer_loads_here(ids, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_llama(), peft.LoraConfig(r=R, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        optimizer = create_lorafa_optimizer(theirs, r=R, lora_alpha=8, lr=1e-2)
        theirs.train()
        for step in range(3):
            theirs(**lm_batch(seed=step)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        theirs.eval()
        expected = logits(theirs, ids)
        theirs.save_pretrained(str(tmp_path))
    assert not torch.allclose(expected, logits(make_llama(), ids), atol=1e-4), "the adapter should matter"
    torch.testing.assert_close(logits(peftlab.load(make_llama(), tmp_path), ids), expected, rtol=0, atol=1e-5)


def test_bad_settings_say_what_to_do():
    with pytest.raises(peftlab.ConfigError, match="init must be one of default, gaussian.*use lora for init=pissa"):
        peftlab.attach(make_llama(), "lora_fa[init=pissa]")
