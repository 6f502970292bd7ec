"""DiffPruning: a diff z * w on frozen weights with hard-concrete gates z; the expected L0 norm of
the gates in the loss makes the diff sparse; magnitude projection to a target sparsity; the diff is
stored sparsely."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, Killed, dies_at_forward, make_gpt2, make_llama

import peftlab
from peftlab.core import adapters as core
from peftlab.formats.files import read_tensors
from peftlab.methods import diff_pruning as dp
from peftlab.train import CausalLMData, TrainConfig, train
from test_train_helpers import qa_rows, tiny_llama, tiny_tokenizer


def rows(count: int = 4, length: int = 8, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (count, length), generator=g)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]


def ids() -> torch.Tensor:
    return torch.stack([r["input_ids"] for r in rows()])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids()).logits


def fit(model, steps: int = 20, lr: float = 1e-3, **settings):
    config = TrainConfig(lr=lr, steps=steps, batch_size=4, warmup_steps=0, schedule="constant", progress=False,
                         device="cpu", **settings)
    return train(model, rows(), config)


def randomize_diffs(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in dp._deltas(model, "default"):
            module.diff.copy_(torch.randn(module.diff.shape, generator=g) * 0.05)


def test_a_gate_is_nonzero_with_the_probability_the_l0_penalty_counts():
    log_alpha = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0])
    torch.manual_seed(0)
    draws = dp.sample_gates(log_alpha.expand(40_000, 5))
    torch.testing.assert_close((draws > 0).float().mean(0), dp.open_probability(log_alpha), atol=0.01, rtol=0)
    assert (draws == 0).any() and (draws == 1).any() and ((draws > 0) & (draws < 1)).any(), "hard concrete: 0, 1 and between"


def test_training_samples_gates_and_eval_uses_the_deterministic_estimate():
    model = peftlab.attach(make_llama(), "diff_pruning")
    module = dp._deltas(model, "default")[0]
    with torch.no_grad():
        module.diff.normal_(0, 0.05)
        module.scaled_log_alpha.copy_(torch.linspace(-3, 3, module.diff.numel()).view_as(module.diff) / module.alpha_lr_ratio)
    expected = (torch.sigmoid(module.log_alpha()) * 3 - 1.5).clamp(0, 1) * module.diff
    torch.testing.assert_close(module.current_delta(), expected)  # eval mode: Louizos' test-time gates
    assert torch.equal(logits(model), logits(model))
    model.train()
    assert not torch.equal(module.current_delta(), module.current_delta())


def test_the_diff_starts_at_zero_so_the_model_is_the_base():
    model = peftlab.attach(make_llama(), "diff_pruning")
    for module in dp._deltas(model, "default"):
        assert not module.diff.any() and torch.equal(module.log_alpha(), torch.full_like(module.diff, 5.0))
    torch.testing.assert_close(logits(model), logits(make_llama()), rtol=0, atol=0)


def test_the_trainer_adds_the_expected_l0_norm_to_the_loss():
    model = peftlab.attach(make_llama(), "diff_pruning[l0_weight=0.5]")
    modules = dp._deltas(model, "default")
    by_hand = 0.5 * sum(torch.sigmoid(m.log_alpha()).sum() for m in modules)  # log(-l/r) = 0 for l = -r
    torch.testing.assert_close(core.regularization(model), by_hand)
    assert core.regularization(peftlab.attach(make_llama(), "diff_pruning[l0_weight=0]")) is None


def test_the_l0_penalty_makes_the_learned_diff_sparse():
    penalized = peftlab.attach(make_llama(), "diff_pruning[l0_weight=1e-4,alpha_lr_ratio=1000]")
    free = peftlab.attach(make_llama(), "diff_pruning[l0_weight=0,alpha_lr_ratio=1000]")
    penalized_run = fit(penalized)
    fit(free)
    assert dp.diff_sparsity(penalized) > 0.5 > 0.1 > dp.diff_sparsity(free)
    assert penalized_run.losses[-1] < penalized_run.losses[0] * 0.97, "it still learns the task"


def test_projection_keeps_the_largest_entries_of_the_whole_diff_and_fixes_the_mask():
    model = peftlab.attach(make_llama(), "diff_pruning")
    randomize_diffs(model)
    modules = dp._deltas(model, "default")
    before = torch.cat([m.delta_weight().reshape(-1) for m in modules])
    dp.finalize(model, sparsity=0.9)
    after = torch.cat([m.delta_weight().reshape(-1) for m in modules])
    kept = round(0.1 * before.numel())
    assert int(after.count_nonzero()) == kept and dp.diff_sparsity(model) == 1 - kept / before.numel()
    largest = before.abs().topk(kept).indices
    torch.testing.assert_close(after[largest], before[largest], rtol=0, atol=0)
    expected = logits(model)
    model.train()
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)  # gates fixed: training draws change nothing


def test_the_trainer_projects_after_its_last_step_and_a_second_run_trains_only_the_kept_entries():
    model = peftlab.attach(make_llama(), "diff_pruning[target_sparsity=0.99]")
    fit(model, steps=5)
    modules = dp._deltas(model, "default")
    total = sum(m.diff.numel() for m in modules)
    assert dp.diff_sparsity(model) == pytest.approx(1 - round(0.01 * total) / total)
    kept = [m.delta_weight() != 0 for m in modules]
    before = [m.delta_weight() for m in modules]
    fit(model, steps=5)
    moved = [m.delta_weight() != b for m, b in zip(modules, before)]
    assert any(x.any() for x in moved)
    assert all(not (x & ~k).any() for x, k in zip(moved, kept)), "pruned entries stay exactly zero"


def test_the_saved_adapter_holds_only_the_nonzero_entries(tmp_path):
    model = peftlab.attach(make_llama(), "diff_pruning")
    randomize_diffs(model)
    dp.finalize(model, sparsity=0.99)
    expected = logits(model)
    peftlab.save(model, tmp_path)
    tensors, _ = read_tensors(tmp_path / "adapter_model.safetensors")
    entries = sum(m.diff.numel() for m in dp._deltas(model, "default"))
    kept = round(0.01 * entries)
    assert sum(t.numel() for k, t in tensors.items() if k.endswith(".values")) == kept
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == kept * (4 + 4)  # fp32 values, int32 positions
    assert (tmp_path / "adapter_model.safetensors").stat().st_size < entries * 4 / 10  # the dense fp32 diff / 10
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "PEFTLAB"
    loaded = peftlab.load(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)
    assert dp.diff_sparsity(loaded) == dp.diff_sparsity(model)


def test_a_corrupt_sparse_diff_is_a_clear_error(tmp_path):
    model = peftlab.attach(make_llama(), "diff_pruning")
    randomize_diffs(model)
    peftlab.save(model, tmp_path)
    tensors, metadata = read_tensors(tmp_path / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("q_proj.indices"))
    tensors[key] = tensors[key] + 10_000
    from safetensors.torch import save_file
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata)
    with pytest.raises(peftlab.IncompatibleBaseError, match="another base model"):
        peftlab.load(make_llama(), tmp_path)


@pytest.mark.parametrize("spec", ["diff_pruning", "diff_pruning[targets=[wte,c_attn]]"])
def test_gpt2_conv1d_and_embeddings_merge_and_round_trip(spec, tmp_path):
    def gpt2():
        return make_gpt2(tie_word_embeddings=False)  # a tied embedding cannot be merged

    model = peftlab.attach(gpt2(), spec)
    randomize_diffs(model)
    expected = logits(model)
    assert not torch.allclose(expected, logits(gpt2()))
    peftlab.save(model, tmp_path)
    torch.testing.assert_close(logits(peftlab.load(gpt2(), tmp_path)), expected, rtol=0, atol=1e-6)
    peftlab.merge(model)
    torch.testing.assert_close(logits(model), expected, rtol=1e-4, atol=1e-5)


def test_misuse_is_a_clear_error():
    model = peftlab.attach(make_llama(), "diff_pruning")
    with pytest.raises(peftlab.ConfigError, match="needs a sparsity"):
        dp.finalize(model)
    with pytest.raises(peftlab.ConfigError, match="sparsity must be in"):
        dp.finalize(model, sparsity=1.5)
    peftlab.merge(model)
    with pytest.raises(peftlab.StateError, match="unmerge"):
        dp.finalize(model, sparsity=0.9)
    lora = peftlab.attach(make_llama(), "lora")
    with pytest.raises(peftlab.StateError, match="no diff_pruning modules"):
        dp.diff_sparsity(lora)


def test_resume_after_a_kill_is_exact(tmp_path):
    """Gates are random in training: a resumed run must draw the same ones (the RNG is checkpointed)."""
    spec = "diff_pruning[l0_weight=1e-4,alpha_lr_ratio=1000,target_sparsity=0.9]"
    data = CausalLMData(tiny_tokenizer(), qa_rows(6), max_length=64)

    def config(out_dir, **more):
        return TrainConfig(lr=1e-3, steps=6, batch_size=3, warmup_steps=0, save_every=2, seed=3, out_dir=str(out_dir),
                           device="cpu", progress=False, **more)

    straight_model = tiny_llama(spec=spec)
    straight = train(straight_model, data, config(tmp_path / "straight"))
    killed_model = tiny_llama(spec=spec)
    dies_at_forward(killed_model, 5)  # in step 5; the last checkpoint is step 4's
    with pytest.raises(Killed):
        train(killed_model, data, config(tmp_path / "cut"))
    torch.manual_seed(1234)
    resumed_model = tiny_llama(spec=spec)
    resumed = train(resumed_model, data, config(tmp_path / "cut", resume=True))
    assert resumed.resumed_from == 4 and resumed.losses == pytest.approx(straight.losses, abs=1e-6, rel=0)
    assert dp.diff_sparsity(resumed_model) == dp.diff_sparsity(straight_model) > 0.9
    for a, b in zip(dp._deltas(resumed_model, "default"), dp._deltas(straight_model, "default")):
        torch.testing.assert_close(a.delta_weight(), b.delta_weight(), rtol=0, atol=1e-6)
