"""The training loop: schedules, data order, a short run that learns, accumulation, evaluation,
classification, and settings that fail clearly."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import peftlab
from peftlab.errors import ConfigError, DataError, StateError, TrainingError
from peftlab.train import CausalLMData, ClassificationData, TrainConfig, train
from peftlab.train.data import pad_collate, pad_id_of
from peftlab.train.loop import DataOrder, lr_at
from test_train_helpers import qa_rows, tiny_bert, tiny_llama, tiny_tokenizer


def quiet(**settings) -> TrainConfig:
    return TrainConfig(**{"progress": False, "device": "cpu", "warmup_steps": 0, **settings})


def snapshot(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_lr_schedules():
    cfg = quiet(lr=1.0, steps=10, warmup_steps=4, schedule="cosine")
    lrs = [lr_at(s, cfg) for s in range(10)]
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # warmup, then the peak
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 0.1
    linear = [lr_at(s, quiet(lr=1.0, steps=10, schedule="linear")) for s in range(10)]
    assert linear == pytest.approx([1 - s / 10 for s in range(10)])
    assert {lr_at(s, quiet(lr=0.5, steps=10, schedule="constant")) for s in range(10)} == {0.5}


def test_data_order_is_a_seeded_permutation_per_epoch():
    order = DataOrder(5, seed=3)
    stream = order.take(0, 15)
    assert [sorted(stream[i:i + 5]) for i in (0, 5, 10)] == [list(range(5))] * 3
    assert stream[0:5] != stream[5:10] or stream[5:10] != stream[10:15]  # epochs are reshuffled
    assert DataOrder(5, seed=3).take(7, 6) == stream[7:13]  # any position restores exactly
    assert DataOrder(5, seed=4).take(0, 15) != stream


def test_length_grouped_order_pads_less_and_still_covers_each_row_once_per_epoch():
    lengths = [int(x) for x in torch.randint(1, 60, (400,), generator=torch.Generator().manual_seed(0))]
    grouped, plain = DataOrder(400, 1, lengths, batch_size=8), DataOrder(400, 1)
    stream = grouped.take(0, 800)
    assert sorted(stream[:400]) == sorted(stream[400:]) == list(range(400))

    def padded(order):  # tokens after padding each batch of 8 to its longest row
        return sum(8 * max(lengths[i] for i in order.take(p, 8)) for p in range(0, 400, 8))

    assert padded(grouped) < 0.6 * padded(plain)
    assert DataOrder(400, 1, lengths, batch_size=8).take(123, 40) == stream[123:163]  # resume is exact
    assert grouped.take(0, 400) != sorted(range(400), key=lambda i: -lengths[i])  # sorted within windows only


def test_group_by_length_needs_token_rows():
    with pytest.raises(ConfigError, match="group_by_length needs rows"):
        train(torch.nn.Linear(2, 2), [torch.zeros(2)], quiet(group_by_length=True))


def test_a_short_run_learns_and_touches_only_adapter_weights():
    torch.manual_seed(0)
    model = tiny_llama().eval()
    before = snapshot(model)
    data = CausalLMData(tiny_tokenizer(), qa_rows(8), max_length=64)
    result = train(model, data, quiet(lr=2e-2, steps=12, batch_size=4, warmup_steps=2))
    assert result.steps == 12 and len(result.losses) == 12 and len(result.learning_rates) == 12
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3 - 0.1
    after = snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora" in n for n in changed)
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}
    summary = result.summary()
    assert summary["steps"] == 12 and summary["final_loss"] == result.losses[-1]
    assert summary["tokens"] > 0 and summary["tokens_per_second"] > 0 and summary["train_seconds"] > 0
    assert summary["device"] == "cpu" and not model.training  # back in the mode it came in


def test_plain_tokenized_rows_train_padded_with_the_models_pad_id():
    """A list of dicts of int lists of different lengths is a dataset: padded per batch, masked, and
    the first step's loss is the padded batch's loss under the untrained model."""
    model = tiny_llama().eval()
    rows = [{"input_ids": list(range(3, 3 + n)), "labels": list(range(3, 3 + n))} for n in (5, 9, 7, 4)]
    batch = pad_collate(rows, pad_id=pad_id_of(model.config))
    assert batch["attention_mask"].sum(1).tolist() == [5, 9, 7, 4]
    with torch.no_grad():
        expected = model(**batch).loss.item()
    result = train(model, rows, quiet(lr=1e-2, steps=2, batch_size=4))
    assert result.losses[0] == pytest.approx(expected, abs=1e-5)
    assert result.tokens == 2 * 25


def test_rows_that_are_not_tokenized_are_a_clear_error():
    with pytest.raises(DataError, match="field 'prompt' holds str values.*CausalLMData"):
        train(tiny_llama(), [{"prompt": "hi", "response": "there"}] * 4, quiet(steps=1))
    with pytest.raises(DataError, match="must be a dict of model inputs"):
        train(tiny_llama(), [[1, 2, 3]] * 4, quiet(steps=1))


def test_pad_collate_is_a_datasets_collate_as_it_is():
    class Rows(torch.utils.data.Dataset):
        collate = staticmethod(pad_collate)

        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    rows = Rows([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}])
    assert train(tiny_llama(), rows, quiet(steps=1, batch_size=2)).steps == 1
    batch = Rows.collate([rows[0], rows[1]])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]] and batch["labels"][1, 2] == -100


def test_pad_collate_stacks_equal_shapes_and_refuses_ragged_ones():
    images = [{"pixel_values": torch.ones(3, 4, 4), "labels": 1}, {"pixel_values": torch.zeros(3, 4, 4), "labels": 0}]
    assert pad_collate(images)["pixel_values"].shape == (2, 3, 4, 4)
    images[1]["pixel_values"] = torch.zeros(3, 5, 5)
    with pytest.raises(DataError, match="only 1-D fields"):
        pad_collate(images)
    with pytest.raises(DataError, match="the same fields"):
        pad_collate([{"input_ids": [1]}, {"input_ids": [1], "labels": [1]}])


def test_grad_accum_matches_one_big_batch():
    """Rows of equal length: the mean of micro-batch means equals the mean over the big batch."""
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(8)]
    data = CausalLMData(tiny_tokenizer(), rows, max_length=32)
    big = train(tiny_llama(), data, quiet(lr=1e-2, steps=4, batch_size=8, grad_accum=1))
    small = train(tiny_llama(), data, quiet(lr=1e-2, steps=4, batch_size=2, grad_accum=4))
    assert small.losses == pytest.approx(big.losses, abs=1e-5)


def test_eval_runs_on_schedule_and_never_changes_training():
    data = CausalLMData(tiny_tokenizer(), qa_rows(8), max_length=64)
    calls = []

    def eval_fn(model):
        calls.append(model.training)
        torch.rand(100)  # randomness inside eval must not shift the training streams
        return {"score": torch.tensor(1.5), "n": 3}

    spec = "lora[r=4,dropout=0.2]"
    with_eval = train(tiny_llama(spec=spec), data, quiet(lr=1e-2, steps=6, batch_size=2, eval_every=4), eval_fn=eval_fn)
    without = train(tiny_llama(spec=spec), data, quiet(lr=1e-2, steps=6, batch_size=2))
    assert [e["step"] for e in with_eval.eval_history] == [4, 6] and calls == [False, False]
    assert with_eval.eval_history[0] == {"step": 4, "score": 1.5, "n": 3}
    assert with_eval.summary()["last_eval"]["step"] == 6
    assert with_eval.losses == without.losses


def test_classification_training_on_a_tiny_bert():
    rows = [{"text": "good" if i % 2 else "bad", "label": i % 2} for i in range(8)]
    data = ClassificationData(tiny_tokenizer(), rows, max_length=16)
    model = tiny_bert(num_labels=data.num_labels)
    result = train(model, data, quiet(lr=5e-2, steps=10, batch_size=4))
    assert len(result.losses) == 10 and all(math.isfinite(x) for x in result.losses)
    assert result.losses[-1] < result.losses[0]


def test_bad_settings_fail_clearly():
    with pytest.raises(ConfigError, match="schedule must be one of cosine, linear, constant"):
        TrainConfig(schedule="step")
    with pytest.raises(ConfigError, match="steps must be a positive integer"):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError, match="resume=True needs out_dir"):
        TrainConfig(resume=True)
    with pytest.warns(UserWarning, match="never reaches lr"):
        TrainConfig(steps=5, warmup_steps=10)
    with pytest.warns(UserWarning, match="ignoring unknown settings fancy"):
        cfg = TrainConfig.from_dict({"lr": 0.1, "fancy": True, "out_dir": Path("x")})
    assert cfg.lr == 0.1 and cfg.out_dir == "x" and TrainConfig.from_dict(cfg.to_dict()) == cfg
    data = CausalLMData(tiny_tokenizer(), qa_rows(2))
    model = tiny_llama()
    peftlab.unload(model)
    with pytest.raises(StateError, match="no trainable parameters"):
        train(model, data, quiet(steps=1))
    with pytest.raises(TrainingError, match="returned no loss"):
        train(tiny_llama(), [{"input_ids": torch.tensor([1, 2])}], quiet(steps=1, batch_size=1))
