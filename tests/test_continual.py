"""peftlab.continual: metric definitions, each method's promise, the CLI end to end on a tiny model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import peftlab
import peftlab.continual as cl
from peftlab.continual.adaptercl import AdapterCL, entropy, select_by_entropy
from peftlab.continual.methods import get_method
from peftlab.continual.model import build_classifier
from peftlab.continual.olora import OLora, olora_penalty, orthogonality
from peftlab.continual.progressive import ProgressivePrompts
from peftlab.continual.replay import Replay
from peftlab.continual.sequence import TaskData, label_space, load_task, resolve_sequence, resolve_task
from peftlab.errors import ConfigError
from peftlab.train import ClassificationData, TrainConfig, train

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "continual"


# ---- metrics ---------------------------------------------------------------------------------

MATRIX = [[0.9, 0.2, 0.1],
          [0.7, 0.8, 0.3],
          [0.5, 0.6, 0.9]]
BASELINE = [0.3, 0.1, 0.2]


def test_metrics_on_a_hand_written_matrix():
    assert cl.average_accuracy(MATRIX) == pytest.approx((0.5 + 0.6 + 0.9) / 3)
    assert cl.backward_transfer(MATRIX) == pytest.approx(((0.5 - 0.9) + (0.6 - 0.8)) / 2)  # -0.3: forgetting
    assert cl.forward_transfer(MATRIX, BASELINE) == pytest.approx(((0.2 - 0.1) + (0.3 - 0.2)) / 2)
    assert cl.summarize(MATRIX, BASELINE)["bwt"] == pytest.approx(-0.3)


def test_no_forgetting_is_zero_bwt_and_one_stage_has_none():
    kept = [[0.8, 0.1], [0.8, 0.9]]
    assert cl.backward_transfer(kept) == 0
    assert cl.backward_transfer([[0.7, 0.6]]) is None and cl.forward_transfer([[0.7, 0.6]], [0.1, 0.1]) is None
    assert cl.average_accuracy([[0.7, 0.6]]) == pytest.approx(0.65)


def test_metrics_reject_ragged_matrices_and_short_baselines():
    with pytest.raises(ConfigError, match="one entry per task"):
        cl.average_accuracy([[0.1, 0.2], [0.3]])
    with pytest.raises(ConfigError, match="baseline"):
        cl.forward_transfer(MATRIX, [0.1])


# ---- a tiny encoder and tiny tasks -----------------------------------------------------------

def tiny_encoder(seed: int = 0):
    from test_tasks import char_tokenizer
    from transformers import BertConfig, BertModel

    tokenizer = char_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertModel(config).float().eval(), tokenizer


def tiny_rows(task: str, labels: list, count: int = 12) -> list:
    return [{"text": f"{labels[i % len(labels)]} {task} row {i}", "label": labels[i % len(labels)], "task": task}
            for i in range(count)]


def classifier(labels):
    encoder, tokenizer = tiny_encoder()
    return build_classifier(encoder, tokenizer, labels), tokenizer


def train_stage(model, tokenizer, method, stage, rows, labels, steps=3):
    torch.manual_seed(stage)
    method.before_stage(model, stage)
    data = ClassificationData(tokenizer, method.training_rows(stage, rows), label2id={l: i for i, l in enumerate(labels)},
                              max_length=32)
    train(model, data, TrainConfig(lr=5e-2, steps=steps, batch_size=4, warmup_steps=0, device="cpu", progress=False))
    method.after_stage(model, stage, rows)


def snapshot(model, name):
    return [p.detach().clone() for _, a in peftlab.core.adapters.all_adapters(model, name) for p in a.parameters()]


# ---- O-LoRA ------------------------------------------------------------------------------------

def test_orthogonality_is_zero_for_orthogonal_subspaces_and_positive_otherwise():
    basis = torch.linalg.qr(torch.randn(16, 16))[0].t()  # orthonormal rows
    A_old, A_new = basis[:4], basis[4:8]
    assert orthogonality(A_new, [A_old]).item() == pytest.approx(0.0, abs=1e-10)
    assert orthogonality(A_new, [A_old, basis[8:12]]).item() == pytest.approx(0.0, abs=1e-10)
    overlapping = A_new + 0.5 * A_old
    # ||(A_new + 0.5 A_old) A_old^T||^2 = ||0.5 I||^2 = 0.25 * 4
    assert orthogonality(overlapping, [A_old]).item() == pytest.approx(1.0, rel=1e-5)
    assert orthogonality(A_new, []).item() == 0


def test_olora_penalty_sums_layers_and_adds_l2():
    labels = ["a", "b"]
    model, _ = classifier(labels)
    method = OLora(r=2)
    method.before_stage(model, 0)
    method.before_stage(model, 1)
    penalty = olora_penalty(model, "task1", ["task0"], lambda1=1.0, lambda2=0.0)
    layers = list(peftlab.core.adapters.adapter_layers(model, "task1"))
    expected = sum(orthogonality(l.adapters["task1"].lora_A.weight, [l.adapters["task0"].lora_A.weight]) for _, l in layers)
    assert len(layers) == 4 and penalty.item() == pytest.approx(expected.item()) and penalty.item() > 0
    l2 = sum(p.pow(2).sum() for _, a in peftlab.core.adapters.all_adapters(model, "task1") for p in a.parameters())
    both = olora_penalty(model, "task1", ["task0"], lambda1=1.0, lambda2=0.1)
    assert both.item() == pytest.approx(expected.item() + 0.1 * l2.item(), rel=1e-5)
    penalty.backward()  # the penalty trains the new A only
    assert all(l.adapters["task0"].lora_A.weight.grad is None for _, l in layers)
    assert all(l.adapters["task1"].lora_A.weight.grad is not None for _, l in layers)


def test_olora_keeps_earlier_loras_frozen_and_active():
    labels = ["a", "b", "c"]
    model, tokenizer = classifier(labels)
    method = OLora(r=2, lambda1=0.5)
    train_stage(model, tokenizer, method, 0, tiny_rows("t0", ["a", "b"]), labels)
    first = snapshot(model, "task0")
    train_stage(model, tokenizer, method, 1, tiny_rows("t1", ["c", "b"]), labels)
    after = snapshot(model, "task0")
    assert all(torch.equal(x, y) for x, y in zip(first, after))  # bit-identical
    assert peftlab.core.state.require_state(model).active == ["task0", "task1"]
    assert any(not torch.equal(p, torch.zeros_like(p)) for p in snapshot(model, "task1"))  # the new B trained
    assert model.penalty is None  # the penalty belongs to its stage only


# ---- Progressive Prompts ----------------------------------------------------------------------

def test_progressive_prompts_keep_earlier_prompts_and_concatenate_them():
    labels = ["a", "b", "c"]
    model, tokenizer = classifier(labels)
    method = ProgressivePrompts(length=3)
    train_stage(model, tokenizer, method, 0, tiny_rows("t0", ["a", "b"]), labels)
    first = snapshot(model, "task0")
    train_stage(model, tokenizer, method, 1, tiny_rows("t1", ["c", "b"]), labels)
    assert all(torch.equal(x, y) for x, y in zip(first, snapshot(model, "task0")))
    assert peftlab.core.state.require_state(model).active == ["task0", "task1"]
    seen = []
    handle = model.base_model.embeddings.register_forward_hook(lambda m, a, kw, out: seen.append(out.shape[1]),
                                                               with_kwargs=True)
    ids = torch.tensor([[10, 11, 12, 13, 14]])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    handle.remove()
    assert seen == [5 + 3 + 3]  # both prompts in front of the 5 tokens


# ---- AdapterCL ---------------------------------------------------------------------------------

def test_select_by_entropy_picks_the_most_confident_adapter_per_row():
    confident, flat = torch.tensor([9.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 0.9])
    per_adapter = torch.stack([torch.stack([flat, confident.roll(1)]),  # adapter 0: sure of row 1 only
                               torch.stack([confident, flat])])  # adapter 1: sure of row 0 only
    choice, logits = select_by_entropy(per_adapter)
    assert choice.tolist() == [1, 0]
    assert torch.equal(logits, torch.stack([confident, confident.roll(1)]))
    assert entropy(torch.zeros(1, 4)).item() == pytest.approx(torch.log(torch.tensor(4.0)).item())


def test_adaptercl_answers_each_row_with_its_lowest_entropy_adapter():
    labels = ["a", "b", "c"]
    model, tokenizer = classifier(labels)
    method = AdapterCL(bottleneck=8)
    method.before_stage(model, 0)
    method.before_stage(model, 1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # task1 made decisive (large weights), task0 left as the base model
        for _, adapter in peftlab.core.adapters.all_adapters(model, "task1"):
            for p in adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 2)
    ids = torch.randint(4, 90, (6, 9), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model.eval()
    with torch.no_grad():
        chosen = method.logits(model, batch)
        each = []
        for name in ("task0", "task1"):
            peftlab.set_active(model, name)
            each.append(model(**batch).logits)
    best = torch.stack([entropy(e) for e in each]).argmin(0)
    assert torch.allclose(chosen, torch.stack(each)[best, torch.arange(6)])
    assert set(best.tolist()) == {1}  # the decisive adapter wins here, as constructed
    assert not torch.allclose(chosen, each[0])


# ---- experience replay -------------------------------------------------------------------------

def test_replay_mixes_in_rows_of_earlier_tasks_only():
    method = Replay(memory=3, seed=0)
    stages = [tiny_rows(f"t{i}", ["a", "b"], count=10) for i in range(3)]
    for stage, rows in enumerate(stages):
        mixed = method.training_rows(stage, rows)
        replayed = mixed[len(rows):]
        assert mixed[:len(rows)] == rows
        assert len(replayed) == 3 * stage
        assert {r["task"] for r in replayed} == {f"t{i}" for i in range(stage)}
        assert all(r in stages[int(r["task"][1:])] for r in replayed)
        method.after_stage(None, stage, rows)


# ---- task sequences and errors -----------------------------------------------------------------

def test_shared_label_words_are_one_class():
    task_a, task_b = resolve_task("amazon"), resolve_task("yelp")
    ratings = ["negative", "positive", "very negative"]
    datas = [TaskData(task_a, tiny_rows("amazon", ratings), []), TaskData(task_b, tiny_rows("yelp", ratings[::-1]), [])]
    assert label_space(datas) == ["negative", "positive", "very negative"]


def test_order_reorders_by_name_or_position():
    names = lambda seq: [t.name for t in seq]  # noqa: E731
    assert names(resolve_sequence("agnews,amazon,yelp", "yelp,agnews,amazon")) == ["yelp", "agnews", "amazon"]
    assert names(resolve_sequence(["agnews", "amazon"], "1,0")) == ["amazon", "agnews"]


@pytest.mark.parametrize("call, message", [
    (lambda: resolve_sequence(""), "empty"),
    (lambda: resolve_sequence("agnews,nosuchtask"), "unknown task 'nosuchtask'"),
    (lambda: resolve_sequence("agnews,agnews"), "twice"),
    (lambda: resolve_sequence("agnews,amazon", "agnews,yelp"), "same tasks"),
    (lambda: resolve_sequence("gsm8k"), "classification"),
    (lambda: get_method("o-lora2"), "unknown continual method 'o-lora2' \\(did you mean 'o-lora'\\?\\)"),
    (lambda: get_method("o-lora", {"lambda": 1}), "unknown option 'lambda'"),
    (lambda: get_method("progressive", {"length": "long"}), "option length should be a int"),
    (lambda: cl.run("agnews", "seq-lora", steps=0), "steps must be a positive integer"),
])
def test_bad_input_is_one_clear_config_error(call, message):
    with pytest.raises(ConfigError, match=message) as error:
        call()
    assert "\n" not in str(error.value)


def test_task_label_space_scores_each_row_over_its_own_labels_only():
    from peftlab.continual.model import MASKED

    model, tokenizer = classifier(["a", "b", "c", "d"])
    ids = torch.randint(4, 90, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]])
    with torch.no_grad():
        free = model(input_ids=ids).logits
        scored = model(input_ids=ids, label_mask=mask).logits
    assert torch.equal(scored[mask == 1], free[mask == 1]) and (scored[mask == 0] == MASKED).all()
    assert scored[0].argmax() < 2 <= scored[1].argmax()
    loss = model(input_ids=ids, labels=torch.tensor([1, 3]), label_mask=mask).loss
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(scored, torch.tensor([1, 3])).item())
    with pytest.raises(ConfigError, match="label_space must be one of union, task"):
        cl.run("agnews", "seq-lora", label_space="tasks")


# ---- end to end: the CLI on a tiny model and tiny task files ---------------------------------

def write_task(folder: Path, name: str, labels: list) -> Path:
    for split, count in (("train", 16), ("test", 8)):
        with open(folder / f"{name}_{split}.jsonl", "w") as f:
            for row in tiny_rows(name, labels, count):
                f.write(json.dumps({"sentence": row["text"], "label": row["label"]}) + "\n")
    spec = {"name": name, "kind": "classification", "model": "tiny", "metric": "accuracy", "train": f"{name}_train.jsonl",
            "eval": f"{name}_test.jsonl", "text_key": "sentence"}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.fixture
def tiny_model(monkeypatch):
    import peftlab.models

    calls = []

    def fake_load_model(name_or_path="tiny", task="causal-lm", **kwargs):
        calls.append((name_or_path, task))
        return tiny_encoder()

    monkeypatch.setattr(peftlab.models, "load_model", fake_load_model)
    return calls


def test_cli_runs_the_sequence_and_writes_jsonl_report_and_heatmaps(tmp_path, tiny_model, capsys):
    from peftlab.cli import main

    first = write_task(tmp_path, "alpha", ["red", "green"])
    second = write_task(tmp_path, "beta", ["green", "blue", "gold"])
    out = tmp_path / "out"
    code = main(["continual", "--tasks", f"{first},{second}", "--method", "seq-lora,o-lora,multitask", "--steps", "2",
                 "--batch-size", "4", "--option", "lambda1=1.0", "--out", str(out), "--max-length", "32"])
    assert code == 0, capsys.readouterr().err
    assert tiny_model[0][1] == "feature-extraction"
    lines = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    assert [(l["method"], l["stage"]) for l in lines] == [("seq-lora", 0), ("seq-lora", 1), ("o-lora", 0), ("o-lora", 1),
                                                          ("multitask", 0)]
    assert lines[-1]["trained_on"] == ["alpha", "beta"] and lines[-1]["steps"] == 4
    summary = json.loads((out / "summary.json").read_text())
    olora = summary["o-lora"]
    assert olora["options"]["lambda1"] == 1.0 and olora["labels"] == ["green", "red", "blue", "gold"]
    assert len(olora["matrix"]) == 2 and all(len(row) == 2 and all(0 <= a <= 1 for a in row) for row in olora["matrix"])
    assert olora["bwt"] == pytest.approx(olora["matrix"][1][0] - olora["matrix"][0][0])
    assert summary["multitask"]["bwt"] is None
    report = (out / "report.md").read_text()
    assert "| o-lora |" in report and "| multitask |" in report and "BWT" in report
    for method in ("seq-lora", "o-lora", "multitask"):
        assert (out / f"{method}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "average accuracy" in capsys.readouterr().out
    assert "Label space: union" in report


def test_cli_task_label_space_writes_masks_into_every_batch(tmp_path, tiny_model, capsys):
    from peftlab.cli import main

    first = write_task(tmp_path, "alpha", ["red", "green"])
    second = write_task(tmp_path, "beta", ["blue", "gold", "grey"])
    out = tmp_path / "out"
    assert main(["continual", "--tasks", f"{first},{second}", "--method", "adaptercl", "--steps", "1", "--batch-size", "4",
                 "--label-space", "task", "--out", str(out), "--max-length", "32"]) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())["adaptercl"]
    assert summary["settings"]["label_space"] == "task"
    assert "Label space: task" in (out / "report.md").read_text()


def test_cli_bad_method_or_option_is_one_line_error(tmp_path, tiny_model, capsys):
    from peftlab.cli import main

    assert main(["continual", "--method", "ewc", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown continual method 'ewc'") and "\n" not in err
    assert main(["continual", "--method", "seq-lora", "--option", "length=3", "--out", str(tmp_path)]) == 2
    assert "length is not a setting of seq-lora" in capsys.readouterr().err
    assert not tiny_model  # nothing was loaded


# ---- the real data (skipped where ../shared/data/continual is absent) -------------------------

@pytest.mark.skipif(not (DATA / "agnews_train.jsonl").exists(), reason="the continual data is not here")
def test_builtin_tasks_read_the_shared_data_with_shared_rating_labels():
    datas = [load_task(resolve_task(name), train_rows=40, test_rows=20, seed=0) for name in cl.DEFAULT_SEQUENCE]
    assert [len(d.train) for d in datas] == [40] * 4 and [len(d.test) for d in datas] == [20] * 4
    labels = label_space(datas)
    assert "Sports" in labels and "very negative" in labels and "Company" in labels
    assert labels.count("very positive") == 1  # amazon and yelp share it
    assert load_task(resolve_task("agnews"), 40, 20, 0).train == datas[0].train  # seeded
