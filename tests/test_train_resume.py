"""Checkpoints: a run killed mid-way and resumed ends exactly where an uninterrupted run ends; a
NaN loss stops training and keeps the last good checkpoint; a kill while writing a checkpoint
leaves the previous one usable; nothing is pickled."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from peftlab.errors import TrainingError
from peftlab.formats.files import read_tensors
from peftlab.train import CausalLMData, TrainConfig, train
from peftlab.train import checkpoint as checkpoint_module
from test_train_helpers import qa_rows, tiny_llama, tiny_tokenizer

SPEC = "lora[r=4,dropout=0.1]"  # dropout: resuming must restore the random streams too


class Killed(Exception):
    pass


class Sabotaged(nn.Module):
    """Wraps a model; on forward call number ``kill_at`` raises (a simulated kill) or turns the
    loss into ``nan`` from call ``nan_from`` on."""

    def __init__(self, model, kill_at=None, nan_from=None):
        super().__init__()
        self.model, self.kill_at, self.nan_from, self.calls = model, kill_at, nan_from, 0

    def forward(self, **batch):
        self.calls += 1
        if self.calls == self.kill_at:
            raise Killed(f"killed at forward {self.calls}")
        output = self.model(**batch)
        if self.nan_from is not None and self.calls >= self.nan_from:
            output.loss = output.loss * float("nan")
        return output


def config(out_dir, **settings) -> TrainConfig:
    base = dict(lr=1e-2, steps=10, batch_size=3, grad_accum=2, warmup_steps=2, schedule="cosine", weight_decay=0.1,
                eval_every=3, save_every=4, seed=7, out_dir=str(out_dir), device="cpu", progress=False)
    return TrainConfig(**{**base, **settings})


def data():
    return CausalLMData(tiny_tokenizer(), qa_rows(7), max_length=64)  # 7 rows: batches straddle epochs


def eval_fn(model):
    torch.rand(3)  # consumes randomness, which must not matter
    return {"probe": float(sum(p.sum() for p in model.parameters() if p.requires_grad))}


def trainable(model) -> dict:
    return {n.removeprefix("model."): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_resume_after_a_kill_reaches_the_same_weights_and_losses(tmp_path):
    straight_model = Sabotaged(tiny_llama(spec=SPEC))
    straight = train(straight_model, data(), config(tmp_path / "straight"), eval_fn=eval_fn)

    killed = Sabotaged(tiny_llama(spec=SPEC), kill_at=2 * 6 + 1)  # dies in step 7; last checkpoint: step 4
    with pytest.raises(Killed):
        train(killed, data(), config(tmp_path / "cut"), eval_fn=eval_fn)
    assert json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())["step"] == 4

    torch.manual_seed(1234)  # the resumed process starts with different global random state
    resumed_model = Sabotaged(tiny_llama(spec=SPEC))
    resumed = train(resumed_model, data(), config(tmp_path / "cut", resume=True), eval_fn=eval_fn)

    assert resumed.resumed_from == 4 and resumed.steps == straight.steps == 10
    assert resumed.losses == pytest.approx(straight.losses, abs=1e-6, rel=0)
    assert resumed.learning_rates == straight.learning_rates
    assert [e["step"] for e in resumed.eval_history] == [3, 6, 9, 10]
    for step_a, step_b in zip(resumed.eval_history, straight.eval_history):
        assert step_a["probe"] == pytest.approx(step_b["probe"], abs=1e-6, rel=0)
    a, b = trainable(resumed_model), trainable(straight_model)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)
    # The final checkpoint holds the final weights.
    saved, _ = read_tensors(next((tmp_path / "cut" / "checkpoint").glob("adapter-*.safetensors")))
    for name in a:
        torch.testing.assert_close(saved[f"model.{name}"], a[name], atol=0, rtol=0)


def test_resuming_a_finished_run_returns_its_result_without_training(tmp_path):
    first = train(Sabotaged(tiny_llama(spec=SPEC)), data(), config(tmp_path, steps=4), eval_fn=eval_fn)
    again_model = Sabotaged(tiny_llama(spec=SPEC), kill_at=1)  # any forward call would raise
    again = train(again_model, data(), config(tmp_path, steps=4, resume=True), eval_fn=eval_fn)
    assert again.losses == first.losses and again.eval_history == first.eval_history and again.steps == 4


def test_resume_without_a_checkpoint_starts_fresh(tmp_path):
    fresh = train(tiny_llama(spec=SPEC), data(), config(tmp_path / "a", steps=3))
    resumed = train(tiny_llama(spec=SPEC), data(), config(tmp_path / "b", steps=3, resume=True))
    assert resumed.resumed_from is None and resumed.losses == fresh.losses


def test_checkpoint_is_safetensors_and_json_only_with_one_set_of_files(tmp_path):
    train(tiny_llama(spec=SPEC), data(), config(tmp_path, steps=8))
    names = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert names == ["adapter-00000008.safetensors", "optimizer-00000008.safetensors", "rng-00000008.safetensors",
                     "state.json"]
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["step"] == 8 and state["position"] == 8 * 3 * 2 and len(state["losses"]) == 8


def test_resume_onto_a_different_adapter_fails_clearly(tmp_path):
    train(tiny_llama(spec=SPEC), data(), config(tmp_path, steps=3))
    with pytest.raises(TrainingError, match="other trainable parameters.*different shape"):
        train(tiny_llama(spec="lora[r=2]"), data(), config(tmp_path, steps=4, resume=True))


def test_changed_settings_on_resume_warn(tmp_path):
    train(tiny_llama(spec=SPEC), data(), config(tmp_path, steps=3))
    with pytest.warns(UserWarning, match="different lr"):
        train(tiny_llama(spec=SPEC), data(), config(tmp_path, steps=3, lr=1e-3, resume=True))


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    model = Sabotaged(tiny_llama(spec=SPEC), nan_from=2 * 5 + 2)  # second micro-batch of step 6
    with pytest.raises(TrainingError) as caught:
        train(model, data(), config(tmp_path, save_every=2))
    message = str(caught.value)
    assert "loss became nan at step 6" in message and "lower learning rate" in message and "check the data" in message
    assert "last good checkpoint" in message
    folder = tmp_path / "checkpoint"
    state = json.loads((folder / "state.json").read_text())
    assert state["step"] == 4 and all(torch.isfinite(torch.tensor(state["losses"])))
    saved, _ = read_tensors(folder / state["files"]["adapter"])
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad update never happened
    assert all(p.grad is None for p in model.parameters())
    resumed = train(Sabotaged(tiny_llama(spec=SPEC)), data(), config(tmp_path, save_every=2, resume=True))
    assert resumed.resumed_from == 4 and resumed.steps == 10


def test_a_kill_while_writing_a_checkpoint_leaves_the_previous_one_usable(tmp_path, monkeypatch):
    write_tensors = checkpoint_module.write_tensors

    def dies_on_step_8_optimizer(path, tensors, metadata=None):
        if path.name == "optimizer-00000008.safetensors":
            raise Killed("killed while writing")
        return write_tensors(path, tensors, metadata)

    monkeypatch.setattr(checkpoint_module, "write_tensors", dies_on_step_8_optimizer)
    with pytest.raises(Killed):
        train(tiny_llama(spec=SPEC), data(), config(tmp_path))
    monkeypatch.setattr(checkpoint_module, "write_tensors", write_tensors)
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4
    straight = train(tiny_llama(spec=SPEC), data(), config(tmp_path / "straight"))
    resumed = train(tiny_llama(spec=SPEC), data(), config(tmp_path, resume=True))
    assert resumed.losses == pytest.approx(straight.losses, abs=1e-6, rel=0)
    assert not [p for p in (tmp_path / "checkpoint").iterdir() if "00000008" in p.name or p.name.endswith(".tmp")]
