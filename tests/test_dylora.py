"""DyLoRA: one training run serves every rank up to r; the truncation, scale and frozen update."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import logits, make_llama
from torch import nn

import peftlab
from peftlab.core import adapters as core
from peftlab.methods import dylora
from peftlab.methods.lora import delta_weight
from peftlab.train import TrainConfig, train

Q0 = "model.layers.0.self_attn.q_proj"


def stacked(adapter):
    """(A, B) of all r ranks, as one (r x in) and one (out x r) matrix."""
    return torch.cat(list(adapter.lora_A), 0).detach(), torch.cat(list(adapter.lora_B), 1).detach()


def perturbed(spec):
    model = peftlab.attach(make_llama(), spec)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


# ---- the defining property: after training, every rank 1..r works ----------------------------

def _teacher_task(seed=0, d=16):
    """A linear layer and targets from it plus a rank-4 update with decaying singular values."""
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(d, d))
    U, _ = torch.linalg.qr(torch.randn(d, d))
    V, _ = torch.linalg.qr(torch.randn(d, d))
    update = U[:, :4] @ torch.diag(torch.tensor([3.0, 1.5, 0.8, 0.4])) @ V[:, :4].T
    X = torch.randn(512, d)
    with torch.no_grad():
        Y = base(X) + X @ update.T
    return base, X, Y


def _fit(model, X, Y, steps=300):
    """A hand-written loop: step, then the methods' after_step (DyLoRA draws the next rank there)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    for step in range(1, steps + 1):
        nn.functional.mse_loss(model(X), Y).backward()
        optimizer.step()
        core.after_step(model, step, steps)
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def _mse(model, X, Y):
    with torch.no_grad():
        return nn.functional.mse_loss(model(X), Y).item()


def test_every_rank_works_after_training():
    base, X, Y = _teacher_task()
    untrained = _mse(base, X, Y)
    model = peftlab.attach(copy.deepcopy(base), "dylora[r=4,targets=all-linear]")
    _fit(model, X, Y)
    losses = []
    for b in range(1, 5):
        dylora.set_rank(model, "default", b)
        losses.append(_mse(model, X, Y))
    # rank 1 can at best remove the top singular direction: 25% of the error is left
    assert all(loss < 0.3 * untrained for loss in losses), (losses, untrained)
    assert losses[-1] < 0.15 * untrained


def test_plain_lora_truncated_does_not_work():
    """The contrast: a LoRA of rank 4 trained as usual is useless cut to rank 1."""
    base, X, Y = _teacher_task()
    untrained = _mse(base, X, Y)
    model = peftlab.attach(copy.deepcopy(base), "lora[r=4,targets=all-linear]")
    _fit(model, X, Y)
    adapter = model[0].adapters["default"]
    truncated = copy.deepcopy(base)
    with torch.no_grad():
        truncated[0].weight += delta_weight(adapter.lora_A.weight[:1], adapter.lora_B.weight[:, :1], adapter.alpha / 1)
    assert _mse(model, X, Y) < 0.05 * untrained
    assert _mse(truncated, X, Y) > 0.5 * untrained


# ---- truncation and scale --------------------------------------------------------------------

@pytest.mark.parametrize("b", [1, 2, 3, 4])
def test_truncated_rank_is_the_leading_block(b):
    model = perturbed("dylora[r=4,alpha=12,targets=[q_proj,v_proj]]")
    dylora.set_rank(model, "default", b)
    layer = model.get_submodule(Q0)
    adapter = layer.adapters["default"]
    A, B = stacked(adapter)
    expected = (12 / b) * B[:, :b] @ A[:b]
    torch.testing.assert_close(adapter.delta_weight().detach(), expected, rtol=0, atol=1e-6)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (layer.base_layer.weight + expected).T, rtol=0, atol=1e-5)


def test_rslora_scale_follows_the_rank():
    model = perturbed("dylora[r=4,alpha=8,rslora=true,targets=q_proj]")
    dylora.set_rank(model, "default", 2)
    adapter = model.get_submodule(Q0).adapters["default"]
    A, B = stacked(adapter)
    torch.testing.assert_close(adapter.delta_weight().detach(), 8 / 2 ** 0.5 * B[:, :2] @ A[:2], rtol=0, atol=1e-6)


def _step_grads(spec, b, ids):
    model = perturbed(spec)
    model.train()
    for _, adapter in core.method_adapters(model, "default", "dylora"):
        adapter.train_rank.fill_(b)
    model(input_ids=ids, labels=ids).loss.backward()
    adapter = model.get_submodule(Q0).adapters["default"]
    return [p.grad for p in adapter.lora_A], [p.grad for p in adapter.lora_B]


def test_frozen_mode_updates_only_the_sampled_rank(ids):
    grads_A, grads_B = _step_grads("dylora[r=4,targets=q_proj]", 3, ids)
    for i in range(4):
        trained = i == 2
        assert (grads_A[i] is not None) == trained and (grads_B[i] is not None) == trained, i
    assert grads_A[2].abs().sum() > 0 and grads_B[2].abs().sum() > 0


def test_unfrozen_mode_updates_every_rank_up_to_the_sampled_one(ids):
    grads_A, grads_B = _step_grads("dylora[r=4,frozen=false,targets=q_proj]", 3, ids)
    assert all(g is not None and g.abs().sum() > 0 for g in grads_A[:3] + grads_B[:3])
    assert grads_A[3] is None and grads_B[3] is None


def test_frozen_ranks_do_not_move_even_with_adam_momentum(ids):
    model = perturbed("dylora[r=4,targets=q_proj]")
    model.train()
    adapter = model.get_submodule(Q0).adapters["default"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for b in (1, 2):  # rank 1 gets momentum, then rank 2 trains alone
        adapter.train_rank.fill_(b)
        model(input_ids=ids, labels=ids).loss.backward()
        before = [p.detach().clone() for p in adapter.lora_A]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    moved = [not torch.equal(p, q) for p, q in zip(adapter.lora_A, before)]
    assert moved == [False, True, False, False]


def test_after_step_draws_one_rank_for_the_whole_adapter():
    config = dylora.DyLoraConfig(r=4, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    model = peftlab.attach(make_llama(), config)
    modules = dict(core.method_adapters(model, "default", "dylora"))
    seen = set()
    torch.manual_seed(0)
    for step in range(1, 101):
        core.after_step(model, step, 100)
        b = int(modules[Q0].train_rank)
        assert all(int(m.train_rank) == b for m in modules.values())
        seen.add(b)
    assert seen == {1, 2, 3, 4}
    model.train()
    v_proj = modules["model.layers.0.self_attn.v_proj"]
    v_proj.train_rank.fill_(4)
    assert v_proj.factors()[0].shape[0] == 2  # min(b, its own r)


# ---- inference rank: merge, save, errors -------------------------------------------------------

def test_merge_at_the_chosen_rank(ids):
    model = perturbed("dylora[r=4,targets=[q_proj,v_proj]]")
    dylora.set_rank(model, "default", 2)
    expected = logits(model, ids)
    peftlab.merge(model)
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-5)
    with pytest.raises(peftlab.StateError, match="unmerge"):
        dylora.set_rank(model, "default", 3)
    peftlab.unmerge(model)
    dylora.set_rank(model, "default", 3)
    assert not torch.allclose(logits(model, ids), expected, atol=1e-4)


def test_the_chosen_rank_is_saved(ids, tmp_path):
    model = perturbed("dylora[r=4,targets=q_proj]")
    dylora.set_rank(model, "default", 3)
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    loaded = peftlab.load(make_llama(), tmp_path)
    assert dylora.get_rank(loaded, "default") == 3
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", [0, 5, "2", 2.0, True])
def test_set_rank_rejects_ranks_outside_1_to_r(bad):
    model = peftlab.attach(make_llama(), "dylora[r=4,targets=q_proj]")
    with pytest.raises(peftlab.ConfigError, match="from 1 to r=4"):
        dylora.set_rank(model, "default", bad)


def test_set_rank_names_unknown_adapters():
    model = peftlab.attach(make_llama(), "dylora[r=4,targets=q_proj]")
    with pytest.raises(peftlab.ConfigError, match="no adapter named 'other'"):
        dylora.set_rank(model, "other", 2)


# ---- checkpoints -------------------------------------------------------------------------------

class Killed(Exception):
    pass


@pytest.mark.parametrize("spec", ["dylora[r=4]", "adalora[r=4,target_r=2,delta_t=2]"])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(spec, tmp_path):
    """Training state outside the parameters lives in adapter buffers, which checkpoints keep:
    DyLoRA's drawn rank, AdaLoRA's importance averages and masks."""
    ids = torch.randint(3, 90, (4, 10), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]

    def run(out_dir, kill_at=None):
        model = peftlab.attach(make_llama(), spec)
        calls = []

        def kill(module, args, kwargs):
            calls.append(1)
            if len(calls) == kill_at:
                raise Killed

        # on the backbone: the trainer's blockwise loss does not call the whole model
        model.model.register_forward_pre_hook(kill, with_kwargs=True)
        train(model, rows, TrainConfig(lr=1e-2, steps=8, batch_size=2, warmup_steps=0, save_every=3, resume=True,
                                       out_dir=str(out_dir), progress=False, device="cpu"))
        return {**dict(model.named_parameters()), **dict(model.named_buffers())}

    expected = run(tmp_path / "straight")
    with pytest.raises(Killed):
        run(tmp_path / "resumed", kill_at=5)
    resumed = run(tmp_path / "resumed")
    for name, value in expected.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)
