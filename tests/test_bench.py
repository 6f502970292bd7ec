"""peftlab bench: tasks, metrics, the resumable results file, the report; one real grid on MiniLM."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab.bench import grid, report, runner
from peftlab.bench.tasks import TASKS, Task, classification_metric, final_number, get_task
from peftlab.errors import ConfigError, DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_classification_metrics_against_hand_computed_values():
    labels = [1, 1, 1, 0, 0, 0, 1, 0]
    predictions = [1, 1, 0, 0, 0, 1, 1, 0]  # tp 3, fp 1, fn 1, tn 3
    assert classification_metric("accuracy", predictions, labels) == 6 / 8
    assert classification_metric("f1", predictions, labels) == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert classification_metric("mcc", predictions, labels) == pytest.approx((3 * 3 - 1 * 1) / math.sqrt(4 * 4 * 4 * 4))
    assert classification_metric("mcc", [0, 1, 2], [0, 1, 2]) == pytest.approx(1.0)
    assert classification_metric("mcc", [0, 0, 0], [0, 1, 1]) == 0.0


def test_final_number_reads_gsm8k_answers():
    assert final_number("She makes 9 * 2 = $18.\n#### 18") == "18"
    assert final_number("#### 1,234") == "1234"
    assert final_number("so the answer is 42.0") == "42"
    assert final_number("no digits here") is None


def test_checks_compare_with_the_majority_class_full_fine_tuning_and_the_twins():
    from peftlab.bench.report import checks

    def summary(method, metric, std=0.01, seconds=10.0):
        return {"method": method, "metric": metric, "metric_std": std, "metric_name": "accuracy",
                "train_seconds": seconds}

    text = checks([summary("full", 0.80), summary("lora", 0.79), summary("hf:lora", 0.795, seconds=12.0),
                   summary("dylora", 0.52), summary("ia3", 0.70, 0.001), summary("hf:ia3", 0.75, 0.002)], 0.51)
    assert "less than 5 points above it: `dylora` (0.5200)" in text
    assert "LoRA 0.7900 vs full fine-tuning 0.8000: -1.00 points" in text
    assert "| `lora` | 0.7900 ± 0.0100 | 0.7950 ± 0.0100 | -0.0050 | yes (noise 0.0100) | 0.83x |" in text
    assert "| `ia3` | 0.7000 ± 0.0010 | 0.7500 ± 0.0020 | -0.0500 | no (noise 0.0020) | 1.00x |" in text


def test_a_cell_run_again_counts_once_with_its_last_result():
    from peftlab.bench.report import aggregate

    def row(seed, metric):
        return {"task": "t", "method": "m", "seed": seed, "metric": metric, "metric_name": "accuracy", "losses": [1.0],
                "trainable_params": 1, "trainable_percent": 1.0, "adapter_bytes": 1, "peak_rss_mb": 1.0,
                "train_seconds": 1.0, "tokens_per_second": 1.0}

    summary = aggregate([row(0, 0.5), row(1, 0.5), row(0, 0.9)])["t"][0]  # seed 0 again, at a new rate
    assert summary["runs"] == 2 and summary["metric"] == 0.7


def test_pareto_front_and_loss_spread():
    points = [(10, 0.80), (100, 0.85), (1000, 0.84), (50, 0.79), (5, 0.70)]
    assert sorted(report.pareto_front(points)) == [0, 1, 4]
    assert sorted(report.pareto_front([(1, 3.0), (2, 2.0), (3, 2.5)], lower_is_better=True)) == [0, 1]
    assert report.loss_spread([[1.0, 2.0], [3.0, 2.0]]) == pytest.approx((math.sqrt(2) + 0.0) / 2)
    assert report.loss_spread([[1.0]]) is None


def test_task_specs_and_their_errors(tmp_path):
    spec = tmp_path / "mine.yaml"
    spec.write_text("name: mine\nkind: classification\nmodel: minilm\nmetric: mcc\ntrain: train.tsv\neval: dev.tsv\n")
    (tmp_path / "train.tsv").write_text("text\tlabel\ngood\t1\n")
    task = get_task(str(spec))
    assert task.metric == "mcc" and task.train == str(tmp_path / "train.tsv")
    with pytest.raises(ConfigError, match="metric 'perplexity' does not fit"):
        get_task({"name": "x", "kind": "classification", "model": "minilm", "metric": "perplexity"})
    with pytest.raises(ConfigError, match="'model' is required"):
        get_task({"name": "x", "kind": "classification", "metric": "accuracy"})
    with pytest.raises(ConfigError, match="unknown keys"):
        get_task({"name": "x", "kind": "classification", "model": "m", "metric": "accuracy", "lables": "y"})
    with pytest.raises(ConfigError, match="unknown task"):
        get_task("no-such-task")
    with pytest.raises(DataError, match="does not exist"):
        task.rows()  # dev.tsv is missing: the error says where to point the task
    with pytest.raises(ConfigError, match="unknown settings"):
        TASKS["sst2"].with_settings(train_row=5)


def test_grid_keys_change_with_the_budget_and_twins_follow_their_method():
    task = TASKS["sst2"]
    assert grid.Cell(task, "lora", 0).key != grid.Cell(task.with_settings(train_rows=10), "lora", 0).key
    names = grid.method_names()
    assert names[0] == "full" and "hf:lora" in names
    assert "trained first" in grid.skip_reason(grid.Cell(task, "fusion", 0))
    assert "llama models only" in grid.skip_reason(grid.Cell(task, "llama_adapter", 0))  # sst2 runs MiniLM, a BERT
    assert grid.skip_reason(grid.Cell(task, "lora", 0)) is None
    assert grid.learning_rate("prompt", task) > 10 * grid.learning_rate("lora", task)
    with pytest.raises(ConfigError, match="unknown benchmark method"):
        grid.learning_rate("lorra", task)


def test_results_file_skips_finished_cells_and_survives_a_torn_line(tmp_path):
    results = tmp_path / "r.jsonl"
    runner.append(results, {"key": "a"})
    with open(results, "a") as f:
        f.write('{"key": "b", "metr')  # a kill in the middle of a write
    assert runner.finished_keys(results) == {"a"}
    assert [r["key"] for r in runner.read_results(results)] == ["a"]


@pytest.mark.skipif(not (SHARED / "sst2" / "dev.tsv").exists(), reason="needs ../shared/data/sst2")
def test_a_small_real_grid_runs_resumes_and_reports(tmp_path):
    results, out = tmp_path / "results.jsonl", tmp_path / "report"
    command = [sys.executable, "-m", "peftlab", "bench", "--task", "sst2", "--method", "lora", "--method", "hf:lora",
               "--seeds", "0", "--set", "train_rows=64", "--set", "eval_rows=64", "--results", str(results)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["lora", "hf:lora"]
    for row in rows:
        assert not row.get("failed"), row
        assert 0 <= row["metric"] <= 1 and row["trainable_params"] > 0 and row["peak_rss_mb"] > 100
        assert row["latency"]["base"] > 0 and row["latency"]["merged"] > 0 and row["adapter_bytes"] > 0
    assert rows[0]["trainable_params"] == rows[1]["trainable_params"]  # the twin has the same adapter
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "2 already in" in again.stdout
    assert len(results.read_text().splitlines()) == 2
    made = subprocess.run([sys.executable, "-m", "peftlab", "bench", "report", "--results", str(results),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    text = (out / "report.md").read_text()
    assert "| `lora` |" in text and "| `hf:lora` |" in text and "sst2_metric_vs_params.png" in text
    assert (out / "sst2_metric_vs_params.png").stat().st_size > 1000
    assert "Majority-class baseline: 0." in text and 0.4 < rows[0]["majority"] < 0.7
    assert "| `lora` | " in text.split("#### Checks")[1]  # the twin comparison row


def test_trainable_tokens_trains_the_tasks_most_frequent_tokens():
    """The one method whose settings come from the task: the rows of its most frequent token ids."""
    from peftlab.bench.cell import FREQUENT_TOKENS, task_spec
    from peftlab.core.adapters import build_configs

    rows = [[5, 9, 9, 7], [9, 5, 2], list(range(100, 160))]
    spec = task_spec("trainable_tokens", rows)
    ids = build_configs(spec)[0].token_indices
    assert len(ids) == FREQUENT_TOKENS and {5, 9} <= set(ids) and list(ids) == sorted(ids)
    assert task_spec("lora", rows) is None
