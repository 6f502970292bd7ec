"""MeZO: the SPSA estimate is the gradient in expectation; training with forward passes only lowers
the loss, never allocates a gradient or keeps an activation for backward, has no optimizer state,
resumes exactly and still stops on a NaN (``train/mezo.py``, ``TrainConfig(optimizer="mezo")``)."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import default_collate
from conftest import VOCAB, make_llama
from test_cli import TINY, run
from test_method_properties import attached
from test_train_helpers import tiny_llama
from test_train_resume import Killed, Sabotaged, data, trainable
from test_train_resume import config as resume_config

import peftlab
from peftlab.errors import ConfigError, TrainingError
from peftlab.formats.files import read_tensors
from peftlab.methods import METHODS
from peftlab.train import TrainConfig, train
from peftlab.train.loss import training_loss
from peftlab.train.mezo import MeZO, noise, projected_gradient, spsa_losses, step_seed


LLAMA_METHODS = [m for m in METHODS if "llama" in getattr(METHODS[m], "ARCHITECTURES", ("llama",))]


def rows(count=4, length=8, seed=0) -> list[dict]:
    ids = torch.randint(3, VOCAB, (count, length), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long), "labels": ids[i]}
            for i in range(count)]


def mezo(**settings) -> TrainConfig:
    base = dict(lr=1e-2, steps=30, batch_size=4, warmup_steps=0, schedule="constant", optimizer="mezo",
                progress=False, device="cpu")
    return TrainConfig(**{**base, **settings})


def test_the_spsa_estimate_is_the_gradient_in_expectation():
    """On a quadratic, each estimate is exactly the gradient projected on z, the parameters come back
    where they were, and the average of g z over many seeds points along the true gradient."""
    g = torch.Generator().manual_seed(0)
    M = torch.randn(20, 20, generator=g, dtype=torch.float64)
    H, b = M @ M.t() / 20 + torch.eye(20, dtype=torch.float64), torch.randn(20, generator=g, dtype=torch.float64)
    params = [torch.randn(12, generator=g, dtype=torch.float64), torch.randn(2, 4, generator=g, dtype=torch.float64)]
    start = [p.clone() for p in params]

    def loss():
        theta = torch.cat([p.reshape(-1) for p in params])
        return 0.5 * theta @ H @ theta - b @ theta

    theta = torch.cat([p.reshape(-1) for p in params])
    true_gradient = H @ theta - b
    estimate = torch.zeros(20, dtype=torch.float64)
    for seed in range(400):
        projected = projected_gradient(*spsa_losses(params, loss, 1e-3, seed), 1e-3)
        z = torch.cat([z.reshape(-1) for _, z in noise(params, seed)])
        assert projected == pytest.approx(float(z @ true_gradient), rel=1e-6, abs=1e-6)
        estimate += projected * z
    for p, p0 in zip(params, start):
        torch.testing.assert_close(p, p0, rtol=0, atol=1e-12)
    assert torch.nn.functional.cosine_similarity(estimate, true_gradient, dim=0) > 0.95


def test_mezo_lowers_the_loss_of_a_tiny_llama_with_lora():
    model = peftlab.attach(make_llama(), "lora[r=4]")
    result = train(model, rows(), mezo())
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 0.05, result.losses


def test_forward_passes_only_no_gradient_and_nothing_kept_for_backward():
    model = peftlab.attach(make_llama(), "lora[r=4]")
    grad_modes, saved = [], []
    for module in model.modules():
        module.register_forward_pre_hook(lambda module, args: grad_modes.append(torch.is_grad_enabled()))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        train(model, rows(), mezo(steps=3))
    assert grad_modes and not any(grad_modes)
    assert saved == []  # no activation kept for a backward pass: inference memory
    assert all(p.grad is None for p in model.parameters())


def test_the_forward_only_loss_never_builds_the_full_logits(monkeypatch):
    """Without gradients the causal-LM loss is still computed blockwise from the hidden states (the
    head's full logits would be the largest activation of a small model's forward)."""
    model = peftlab.attach(make_llama(), "lora[r=4]")
    batch = default_collate(rows())
    with torch.no_grad():
        expected = model(**batch).loss
        monkeypatch.setattr(model.lm_head, "forward", lambda hidden: pytest.fail("the full logits were computed"))
        torch.testing.assert_close(training_loss(model, batch), expected)


def make_resumable():
    return tiny_llama(spec="lora[r=4,dropout=0.1]")  # dropout: both passes of a step must see the same mask


def test_no_optimizer_state_and_an_exact_resume(tmp_path):
    straight_model = Sabotaged(make_resumable())
    straight = train(straight_model, data(), resume_config(tmp_path / "straight", optimizer="mezo", lr=1e-3))
    killed = Sabotaged(make_resumable(), kill_at=2 * 2 * 6 + 1)  # 2 passes x 2 micro-batches per step: dies in step 7
    with pytest.raises(Killed):
        train(killed, data(), resume_config(tmp_path / "cut", optimizer="mezo", lr=1e-3))
    folder = tmp_path / "cut" / "checkpoint"
    state = json.loads((folder / "state.json").read_text())
    assert state["step"] == 4
    assert read_tensors(folder / state["files"]["optimizer"])[0] == {}  # MeZO keeps no moments
    torch.manual_seed(1234)
    resumed_model = Sabotaged(make_resumable())
    resumed = train(resumed_model, data(), resume_config(tmp_path / "cut", optimizer="mezo", lr=1e-3, resume=True))
    assert resumed.resumed_from == 4 and resumed.losses == pytest.approx(straight.losses, abs=1e-6, rel=0)
    a, b = trainable(resumed_model), trainable(straight_model)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


def test_a_nan_loss_stops_before_the_update(tmp_path):
    model = Sabotaged(make_resumable(), nan_from=2 * 2 * 4 + 1)  # the first pass of step 5
    with pytest.raises(TrainingError, match="loss became nan at step 5"):
        train(model, data(), resume_config(tmp_path, optimizer="mezo", lr=1e-3, save_every=4))
    saved, _ = read_tensors(next((tmp_path / "checkpoint").glob("adapter-*.safetensors")))
    for name, p in trainable(model).items():  # step 4's weights (up to the rounding of +eps z, -2 eps z, +eps z)
        torch.testing.assert_close(p, saved[f"model.{name}"], atol=1e-6, rtol=0)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", LLAMA_METHODS)
def test_mezo_moves_exactly_the_trainable_parameters_of_any_method(method):
    model = attached(method, "llama")
    model.train()
    batch = default_collate(rows())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    plus, minus = MeZO(trainable_params, lr=1e-3).step(lambda: training_loss(model, batch), seed=0)
    assert plus != minus
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}
    result = train(model, rows(), mezo(steps=2))  # and the trainer runs it, with the method's own hooks
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_step_seeds_differ_per_step_and_run():
    seeds = {step_seed(seed, step) for seed in range(3) for step in range(100)}
    assert len(seeds) == 300


def test_bad_settings_fail_clearly():
    with pytest.raises(ConfigError, match="optimizer must be one of adamw, mezo"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ConfigError, match="mezo_eps"):
        TrainConfig(optimizer="mezo", mezo_eps=0)


def test_the_cli_trains_with_mezo(tmp_path, capsys, fake_models):
    code, _, err = run(capsys, "train", "--out", tmp_path / "run", *TINY, "--optimizer", "mezo", "--mezo-eps", "0.01",
                       "--lr", "1e-3")
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train_config"]["optimizer"] == "mezo" and metrics["train_config"]["mezo_eps"] == 0.01
    code, _, err = run(capsys, "train", "--out", tmp_path / "bad", *TINY, "--optimizer", "sgd")
    assert code == 2 and "optimizer must be one of adamw, mezo" in err
