"""FishMask: the k entries of each weight with the largest empirical Fisher information (mean of
squared per-example gradients) are chosen before training, and only those k entries ever change."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import Killed, dies_at_forward, make_bert, make_gpt2, make_llama, model_loss
from conftest import random_lm_batches as batches
from conftest import random_lm_rows as rows

import peftlab
from peftlab.core import adapters as core
from peftlab.formats.files import read_tensors
from peftlab.methods import fishmask as fm
from peftlab.train import CausalLMData, TrainConfig, train
from test_train_helpers import qa_rows, tiny_llama, tiny_tokenizer

SPEC = "fishmask[density=0.05]"


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batches()[0]["input_ids"]).logits


def masks(model) -> dict:
    return {name: layer.adapters["default"] for name, layer in core.adapter_layers(model, "default")}


def fisher_by_hand(names) -> dict:
    """Per-example squared gradients of the plain base model, averaged, by ordinary backward passes."""
    model = make_llama()
    weights = {n: model.get_submodule(n).weight for n in names}
    totals = {n: torch.zeros_like(w) for n, w in weights.items()}
    examples = [{k: v[i:i + 1] for k, v in b.items()} for b in batches() for i in range(3)]
    for example in examples:
        model.zero_grad()
        model(**example).loss.backward()
        for n, w in weights.items():
            totals[n] += w.grad ** 2
    return {n: t / len(examples) for n, t in totals.items()}


def fit(model, steps: int = 5, lr: float = 1e-2):
    config = TrainConfig(lr=lr, steps=steps, batch_size=3, warmup_steps=0, schedule="constant", progress=False,
                         device="cpu")
    return train(model, rows(), config)


def test_calibration_picks_the_top_k_entries_of_each_weight_by_per_example_fisher_information():
    model = peftlab.attach(make_llama(), SPEC)
    core.calibrate(model, batches(), model_loss)
    fisher = fisher_by_hand(masks(model))
    for name, module in masks(model).items():
        k = module.values.numel()
        assert k == round(0.05 * fisher[name].numel())
        expected = fisher[name].reshape(-1).topk(k).indices.sort().values
        assert torch.equal(module.indices, expected), name
    by_magnitude = fm.top_positions(make_llama().model.layers[0].self_attn.q_proj.weight.abs(), k=51)
    assert not torch.equal(masks(model)["model.layers.0.self_attn.q_proj"].indices, by_magnitude)


def test_training_changes_exactly_the_k_chosen_entries_and_nothing_else():
    model = peftlab.attach(make_llama(), SPEC)
    fit(model)  # the trainer calibrates first
    k = sum(m.values.numel() for m in masks(model).values())
    peftlab.merge(model)
    base = dict(make_llama().named_parameters())
    changed = 0
    for name, module in masks(model).items():
        merged, original = model.get_submodule(name).weight, base[f"{name}.weight"]
        moved = (merged != original).reshape(-1)
        changed += int(moved.sum())
        assert moved[module.indices].all() and int(moved.sum()) == module.indices.numel(), name
    assert changed == k
    untouched = {n for n in base if not any(n == f"{m}.weight" for m in masks(model))}
    current = dict(model.named_parameters())
    assert all(torch.equal(current[n], base[n]) for n in untouched if n in current)


def test_an_uncalibrated_adapter_trains_the_largest_magnitude_entries():
    model = peftlab.attach(make_llama(), SPEC)
    base = dict(make_llama().named_modules())
    for name, module in masks(model).items():
        assert torch.equal(module.indices, fm.top_positions(base[name].weight.abs(), module.values.numel()))
    # a hand-written loop that never calls calibrate trains that deterministic set
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**batches()[0]).loss.backward()
    optimizer.step()
    module = masks(model)["model.layers.1.mlp.down_proj"]
    assert module.delta_weight().reshape(-1)[module.indices].ne(0).all()


def test_calibration_leaves_the_base_frozen_and_no_gradients_behind():
    model = peftlab.attach(make_llama(), SPEC)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    core.calibrate(model, batches(), model_loss)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen
    assert all(p.grad is None for p in model.parameters())
    assert all(not m.values.any() for m in masks(model).values()), "a new mask starts from the base"


def test_a_trained_adapter_keeps_its_mask_when_calibrated_again():
    model = peftlab.attach(make_llama(), SPEC)
    fit(model)
    before = {n: (m.indices.clone(), m.values.detach().clone()) for n, m in masks(model).items()}
    core.calibrate(model, batches()[1:], model_loss)
    for name, module in masks(model).items():
        assert torch.equal(module.indices, before[name][0]) and torch.equal(module.values, before[name][1])


def test_the_saved_adapter_holds_k_positions_and_k_values_and_restores_the_calibrated_mask(tmp_path):
    model = peftlab.attach(make_llama(), SPEC)
    fit(model)
    expected = logits(model)
    peftlab.save(model, tmp_path)
    tensors, _ = read_tensors(tmp_path / "adapter_model.safetensors")
    k = sum(m.values.numel() for m in masks(model).values())
    assert sum(t.numel() for t in tensors.values()) == 2 * k
    loaded = peftlab.load(make_llama(), tmp_path)
    for name, module in masks(loaded).items():
        assert torch.equal(module.indices, masks(model)[name].indices)
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)


@pytest.mark.parametrize("make", [make_gpt2, make_bert], ids=["gpt2-conv1d", "bert"])
def test_other_architectures_calibrate_merge_and_unmerge(make):
    model = peftlab.attach(make(), SPEC)
    data = batches()
    labels = torch.tensor([0, 1, 2]) if make is make_bert else data[0]["labels"]
    core.calibrate(model, [{**data[0], "labels": labels}], model_loss)
    with torch.no_grad():
        for module in masks(model).values():
            module.values.normal_(0, 0.05)
    expected = logits(model)
    peftlab.merge(model)
    torch.testing.assert_close(logits(model), expected, rtol=1e-4, atol=1e-5)
    peftlab.unmerge(model)
    torch.testing.assert_close(logits(model), expected, rtol=1e-4, atol=1e-5)


def test_calibration_without_usable_batches_is_a_clear_error():
    model = peftlab.attach(make_llama(), SPEC)
    with pytest.raises(peftlab.StateError, match="at least one batch"):
        core.calibrate(model, [], model_loss)
    with pytest.raises(peftlab.StateError, match="no example with a finite loss"):
        core.calibrate(model, [{"input_ids": batches()[0]["input_ids"]}], model_loss)  # no labels: no loss
    assert all(not p.requires_grad for n, p in model.named_parameters() if "values" not in n)


def test_resume_after_a_kill_keeps_the_calibrated_mask_and_is_exact(tmp_path):
    data = CausalLMData(tiny_tokenizer(), qa_rows(6), max_length=64)

    def config(out_dir, **more):
        return TrainConfig(lr=1e-2, steps=6, batch_size=3, warmup_steps=0, save_every=2, seed=3, out_dir=str(out_dir),
                           device="cpu", progress=False, **more)

    straight_model = tiny_llama(spec=SPEC)
    straight = train(straight_model, data, config(tmp_path / "straight"))
    killed_model = tiny_llama(spec=SPEC)
    dies_at_forward(killed_model, 6 + 5)  # 6 calibration examples, then step 5; the last checkpoint is step 4's
    with pytest.raises(Killed):
        train(killed_model, data, config(tmp_path / "cut"))
    resumed_model = tiny_llama(spec=SPEC)
    resumed = train(resumed_model, data, config(tmp_path / "cut", resume=True))
    assert resumed.resumed_from == 4 and resumed.losses == pytest.approx(straight.losses, abs=1e-6, rel=0)
    uncalibrated = masks(tiny_llama(spec=SPEC))
    for name, module in masks(resumed_model).items():
        assert torch.equal(module.indices, masks(straight_model)[name].indices), "the mask comes from the checkpoint"
        torch.testing.assert_close(module.values, masks(straight_model)[name].values, rtol=0, atol=1e-6)
    assert any(not torch.equal(m.indices, uncalibrated[n].indices) for n, m in masks(resumed_model).items())


def test_a_saved_mask_that_does_not_fit_is_a_clear_error(tmp_path):
    peftlab.save(peftlab.attach(make_llama(), SPEC), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["methods"][0]["density"] = 0.1  # the file now claims more entries per weight than it holds
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(peftlab.IncompatibleBaseError, match="another density"):
        peftlab.load(make_llama(), tmp_path)
