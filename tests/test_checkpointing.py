"""Gradient checkpointing works with every registered method (on the registry tests' tiny Llama and
BERT): the gradients equal those without it, fewer activations are kept, and the trainer runs with
it (``train/checkpointing.py``)."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import make_llama
from test_cli import TINY, run
from test_method_properties import IDS, attached, base_model, batch, perturb

import peftlab
from peftlab.methods import METHODS
from peftlab.train import TrainConfig, train
from peftlab.train.checkpointing import gradient_checkpointing, is_enabled
from peftlab.train.loss import training_loss

LLAMA_METHODS = [m for m in METHODS if "llama" in getattr(METHODS[m], "ARCHITECTURES", ("llama",))]


def gradients_and_saved_bytes(model, data) -> tuple[dict, int]:
    """The trainable parameters' gradients of one training loss, and the bytes of the activations
    autograd kept for the backward pass (parameters, which it keeps by reference, not counted)."""
    params = {p.data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append(t.numel() * t.element_size())
        return t

    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same draws for methods that sample in training (gates, ranks)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = training_loss(model, data)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return grads, sum(saved)


@IDS
def test_gradients_with_checkpointing_equal_those_without(method, arch):
    model = attached(method, arch)
    perturb(model)
    model.train()
    data = batch(arch)
    plain, plain_bytes = gradients_and_saved_bytes(model, data)
    with gradient_checkpointing(model):
        checkpointed, checkpointed_bytes = gradients_and_saved_bytes(model, data)
    assert plain and plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-5, msg=name)
    if method in ("ladder", "meft"):  # backbones that keep nothing for backward: nothing to recompute
        assert checkpointed_bytes == plain_bytes
    else:
        assert checkpointed_bytes < plain_bytes  # the layers really were checkpointed


@pytest.mark.parametrize("method", LLAMA_METHODS)
def test_training_runs_with_checkpointing_and_leaves_the_model_as_it_was(method):
    model = attached(method, "llama")
    rows = [{k: v[i] for k, v in batch("llama").items()} for i in range(4)]
    result = train(model, rows, TrainConfig(lr=1e-3, steps=2, batch_size=4, warmup_steps=0, gradient_checkpointing=True,
                                            progress=False, device="cpu"))
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert not is_enabled(model)


def test_a_frozen_embedding_needs_no_input_grads():
    """Only the second layer has an adapter: the first layer's input and weights need no gradient,
    which the reentrant form of checkpointing cannot handle; the non-reentrant form can."""
    model = peftlab.attach(make_llama(), "lora[layers=[1]]")
    perturb(model)
    model.train()
    data = batch("llama")
    plain, _ = gradients_and_saved_bytes(model, data)
    with gradient_checkpointing(model):
        assert not model.get_input_embeddings()(data["input_ids"]).requires_grad
        checkpointed, _ = gradients_and_saved_bytes(model, data)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-5)


def test_a_prefix_cache_does_not_leak_into_other_calls():
    """After a checkpointed prefix forward, a base-model forward with a KV cache (disabled adapters)
    and a cached generate (eval mode) behave as without checkpointing."""
    model = attached("prefix", "llama")
    perturb(model)
    base = base_model("prefix", "llama")
    data = batch("llama")
    model.train()
    with gradient_checkpointing(model):
        training_loss(model, data).backward()
        with peftlab.disabled(model):
            torch.testing.assert_close(model(**data, use_cache=True).loss, base(**data).loss)
        model.eval()
        during = model.generate(data["input_ids"][:1], max_new_tokens=4, do_sample=False)
    after = model.generate(data["input_ids"][:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(during, after)


def test_a_model_without_checkpointable_layers_is_a_clear_error():
    model = peftlab.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)), "lora[r=2]")
    with pytest.raises(peftlab.ConfigError, match="gradient checkpointing needs a transformers model"):
        train(model, [{"x": torch.zeros(4)}], TrainConfig(steps=1, warmup_steps=0, gradient_checkpointing=True, progress=False,
                                                          device="cpu"))


def test_the_cli_trains_with_gradient_checkpointing(tmp_path, capsys, fake_models):
    code, _, err = run(capsys, "train", "--out", tmp_path / "run", *TINY, "--gradient-checkpointing")
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train_config"]["gradient_checkpointing"] is True
