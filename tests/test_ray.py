"""Ray (``peftlab[dist]``): benchmark cells as Ray tasks and training under Ray Train's TorchTrainer.

One local Ray (conftest's ``local_ray``) serves every test of the run; peftlab joins it instead
of starting its own.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from peftlab import cli
from peftlab.errors import ConfigError

ray = pytest.importorskip("ray")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_distributed import assert_same  # noqa: E402
from test_tasks import char_tokenizer, tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama saved as a folder, and rows of equal length (each rank's half weighs alike)."""
    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = char_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    rows = folder / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"say {i} twice", "response": f"{i} {i}"}) + "\n"
                            for i in range(10, 26)))
    return folder


def test_bench_cells_run_as_ray_tasks_write_the_rows_the_local_runner_writes(tmp_path, tiny, local_ray):
    from peftlab.bench.grid import cells
    from peftlab.bench.runner import read_results, run_grid
    from peftlab.bench.tasks import get_task

    task = get_task({"name": "tiny", "kind": "causal-lm", "model": str(tiny / "model"), "metric": "perplexity",
                     "train": str(tiny / "rows.jsonl"), "eval": str(tiny / "rows.jsonl"), "train_rows": 8,
                     "eval_rows": 4, "batch_size": 4, "steps": 2})
    grid = cells([task], ["lora", "ia3"], [0])
    said = []
    on_ray = run_grid(grid, tmp_path / "ray.jsonl", threads=1, backend="ray", say=said.append)
    assert "2 to run as Ray tasks" in said[0]
    here = run_grid(grid, tmp_path / "local.jsonl", threads=1)
    for row in on_ray + here:
        assert not row.get("failed"), row
    by_key = {row["key"]: row for row in here}
    for row in on_ray:  # the same cell gives the same numbers wherever it runs
        assert row["metric"] == pytest.approx(by_key[row["key"]]["metric"], rel=1e-6)
        assert row["losses"] == by_key[row["key"]]["losses"]
    said.clear()
    assert run_grid(grid, tmp_path / "ray.jsonl", threads=1, backend="ray", say=said.append) == []
    assert "2 already in" in said[0] and len(read_results(tmp_path / "ray.jsonl")) == 2


def test_training_on_ray_train_gives_the_adapter_of_one_process_at_the_global_batch(tmp_path, tiny, local_ray,
                                                                                    capsys):
    """2 Ray Train workers at batch 2 = one process at batch 4. Ray Train made the process group
    before the loop ran; had peftlab set one up again, torch would have refused ("trying to
    initialize the default process group twice")."""
    common = ["train", "--model", str(tiny / "model"), "--data", str(tiny / "rows.jsonl"), "--method",
              "lora[r=4,dropout=0]", "--steps", "3", "--eval-rows", "0", "--no-progress"]
    assert cli.main([*common, "--backend", "ray", "--workers", "2", "--batch-size", "2",
                     "--out", str(tmp_path / "ray")]) == 0
    assert "2 Ray Train workers" in capsys.readouterr().out
    assert json.loads((tmp_path / "ray/metrics.json").read_text())["train"]["steps"] == 3
    assert cli.main([*common, "--batch-size", "4", "--out", str(tmp_path / "one")]) == 0
    assert_same(load_file(str(tmp_path / "ray/adapter/adapter_model.safetensors")),
                load_file(str(tmp_path / "one/adapter/adapter_model.safetensors")))

    # a worker's own error comes back as one line, and the run says how to continue
    assert cli.main([*common, "--backend", "ray", "--workers", "2", "--method", "lora[targets=[no_such_layer]]",
                     "--out", str(tmp_path / "bad")]) == 2
    error = capsys.readouterr().err
    assert "error: training on Ray failed: worker" in error and "no_such_layer" in error and "--resume" in error


def test_ray_options_are_checked_before_anything_starts(monkeypatch, capsys):
    with pytest.raises(ConfigError, match="give --workers N instead"):
        cli.resolve_train_options(cli.build_parser().parse_args(["train", "--backend", "ray", "--nproc", "2"]))
    assert cli.main(["train", "--backend", "slurm"]) == 2
    assert "--backend must be local or ray" in capsys.readouterr().err
    from peftlab.dist import cluster
    monkeypatch.setitem(sys.modules, "ray", None)  # as if peftlab[dist] were not installed
    with pytest.raises(ConfigError, match=r"pip install 'peftlab\[dist\]'"):
        cluster.connect()
