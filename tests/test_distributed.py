"""Data-parallel training under torchrun (gloo, 2 ranks on this machine): the same adapter as one
process at the global batch, only rank 0 writes, a missing gradient is a clear error, a dead rank
stops the others and leaves the last checkpoint resumable on another number of ranks."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftlab.train.checkpoint import has_checkpoint

WORKER = Path(__file__).resolve().parent / "dist_worker.py"
TIMEOUT = 240


def run(out: Path, *options, ranks: int = 2) -> subprocess.CompletedProcess:
    """The worker on ``ranks`` processes through torchrun (1: started directly, no torchrun)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command = (launch if ranks > 1 else [sys.executable]) + [str(WORKER), str(out), *map(str, options)]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def weights(out: Path) -> dict:
    return load_file(str(out / "weights.safetensors"))


def assert_same(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def one_process_at_the_global_batch(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    done = run(out, "--batch", 4, ranks=1)
    assert done.returncode == 0, done.stderr
    return out


def test_two_ranks_at_batch_b_train_the_adapter_of_one_process_at_2b(tmp_path, one_process_at_the_global_batch):
    done = run(tmp_path, "--batch", 2, "--save-every", 5)
    assert done.returncode == 0, done.stderr
    assert_same(weights(tmp_path), weights(one_process_at_the_global_batch))
    import json
    ours = json.loads((tmp_path / "result.json").read_text())
    theirs = json.loads((one_process_at_the_global_batch / "result.json").read_text())
    assert ours["losses"] == pytest.approx(theirs["losses"], abs=1e-5)  # the logged loss is the ranks' mean
    assert ours["tokens"] == theirs["tokens"]
    assert has_checkpoint(tmp_path / "checkpoint")
    assert not (tmp_path / "checkpoint" / "state.json.tmp").exists()


def test_gradient_accumulation_splits_the_same_way(tmp_path, one_process_at_the_global_batch):
    done = run(tmp_path, "--batch", 1, "--grad-accum", 2)
    assert done.returncode == 0, done.stderr
    assert_same(weights(tmp_path), weights(one_process_at_the_global_batch))


def test_gradient_checkpointing_under_ddp_gives_the_same_adapter(tmp_path, one_process_at_the_global_batch):
    done = run(tmp_path, "--batch", 2, "--checkpointing")
    assert done.returncode == 0, done.stderr
    assert_same(weights(tmp_path), weights(one_process_at_the_global_batch))


def test_a_trainable_parameter_without_a_gradient_is_named_not_a_hang(tmp_path):
    done = run(tmp_path, "--stray")
    assert done.returncode != 0
    assert "stray got none in this step" in done.stderr


def test_a_dead_rank_stops_the_others_and_the_checkpoint_resumes_in_one_process(tmp_path,
                                                                               one_process_at_the_global_batch):
    started = time.monotonic()
    done = run(tmp_path, "--batch", 2, "--save-every", 2, "--die-at", 3)
    assert done.returncode != 0 and time.monotonic() - started < 120
    assert has_checkpoint(tmp_path / "checkpoint")
    # the data order is global: one process at the global batch continues exactly where the two stopped
    resumed = run(tmp_path, "--batch", 4, "--save-every", 2, "--resume", ranks=1)
    assert resumed.returncode == 0, resumed.stderr
    assert "number of data-parallel ranks (2 -> 1" in resumed.stderr
    assert_same(weights(tmp_path), weights(one_process_at_the_global_batch))


def test_peftlab_train_nproc_starts_torchrun_and_rank_0_alone_reports_and_saves(tmp_path):
    """``peftlab train --nproc 2`` at batch 2 writes the adapter ``--nproc 1`` writes at batch 4."""
    import json

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_tasks import char_tokenizer, tiny_llama

    tokenizer = char_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = tmp_path / "rows.jsonl"  # equal lengths: each rank's batch weighs what its half of the big one does
    rows.write_text("".join(json.dumps({"prompt": f"say {i} twice", "response": f"{i} {i}"}) + "\n" for i in range(10, 26)))

    def train(out, *options):
        command = [sys.executable, "-m", "peftlab", "train", "--model", str(tmp_path / "model"), "--data", str(rows),
                   "--method", "lora[r=4,dropout=0]", "--steps", "3", "--no-progress", "--out", str(tmp_path / out),
                   *options]
        if "--eval-rows" not in options:
            command += ["--eval-rows", "0"]
        return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)

    two = train("two", "--nproc", "2", "--batch-size", "2")
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("training 3 steps on 2 data-parallel ranks") == 1
    assert two.stdout.count("saved ") == 1
    sharded = train("fsdp", "--nproc", "2", "--batch-size", "2", "--strategy", "fsdp")
    assert sharded.returncode == 0, sharded.stderr
    assert_same(load_file(str(tmp_path / "fsdp/adapter/adapter_model.safetensors")),
                load_file(str(tmp_path / "two/adapter/adapter_model.safetensors")))
    evaluated = train("fsdp-eval", "--nproc", "2", "--strategy", "fsdp", "--eval-rows", "2", "--max-new-tokens", "4")
    assert evaluated.returncode == 0, evaluated.stderr  # generation on a sharded model: every rank takes part
    assert evaluated.stdout.count("held-out") >= 2 and (tmp_path / "fsdp-eval/adapter/adapter_config.json").exists()
    refused = train("mezo", "--nproc", "2", "--optimizer", "mezo")
    assert refused.returncode == 2
    assert "MeZO trains by forward passes alone" in refused.stderr
    assert "error: data-parallel training failed: rank" in refused.stderr and "--resume" in refused.stderr
    one = train("one", "--batch-size", "4")
    assert one.returncode == 0, one.stderr
    assert_same(load_file(str(tmp_path / "two/adapter/adapter_model.safetensors")),
                load_file(str(tmp_path / "one/adapter/adapter_model.safetensors")))


# ---- FSDP2 ----------------------------------------------------------------------------------------

def test_fsdp_trains_the_adapter_of_one_process_at_the_global_batch(tmp_path, one_process_at_the_global_batch):
    done = run(tmp_path, "--batch", 2, "--strategy", "fsdp", "--save-every", 2)
    assert done.returncode == 0, done.stderr
    assert_same(weights(tmp_path), weights(one_process_at_the_global_batch))
    import json
    shards = json.loads((tmp_path / "shards.json").read_text())
    assert shards["frozen_sharded"] > 0 and shards["local"] == shards["whole"] // 2  # the frozen base is split too


def test_fsdp_refuses_a_quantized_base():
    import peftlab
    from peftlab.dist import fsdp
    from peftlab.errors import ConfigError

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import make_llama

    model = make_llama()
    peftlab.quantize(model, "int4", group_size=16)
    peftlab.attach(model, "lora[r=2]")
    with pytest.raises(ConfigError, match="cannot shard a quantized base.*use strategy='ddp'"):
        fsdp.shard(model, lambda m, batch: None)


def test_fsdp_checkpoints_are_whole_and_resume_in_one_process(tmp_path, one_process_at_the_global_batch):
    done = run(tmp_path, "--batch", 2, "--strategy", "fsdp", "--save-every", 2, "--die-at", 3)
    assert done.returncode != 0 and has_checkpoint(tmp_path / "checkpoint")
    resumed = run(tmp_path, "--batch", 4, "--resume", ranks=1)
    assert resumed.returncode == 0, resumed.stderr
    assert_same(weights(tmp_path), weights(one_process_at_the_global_batch))


def test_fsdp_resumes_a_single_process_checkpoint_on_two_ranks(tmp_path, one_process_at_the_global_batch):
    first = run(tmp_path, "--batch", 4, "--save-every", 2, "--die-at", 3, "--dying-rank", 0, ranks=1)
    assert first.returncode != 0 and has_checkpoint(tmp_path / "checkpoint")
    resumed = run(tmp_path, "--batch", 2, "--strategy", "fsdp", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same(weights(tmp_path), weights(one_process_at_the_global_batch))


def test_saving_under_fsdp_gathers_every_ranks_shard(tmp_path):
    """Each rank's shard filled with rank + 1, then saved: the file holds both values, laid out as
    the gathered tensors are, and loads into a fresh unsharded model as exactly that."""
    import peftlab
    from transformers import LlamaConfig, LlamaForCausalLM

    done = run(tmp_path, "--strategy", "fsdp", "--steps", 1, "--shard-fill")
    assert done.returncode == 0, done.stderr
    gathered = weights(tmp_path)
    assert all(set(t.unique().tolist()) == {1.0, 2.0} for t in gathered.values()), "both ranks' parts are saved"
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    loaded = peftlab.load(base, tmp_path / "filled")
    assert_same({name: p.detach() for name, p in loaded.named_parameters() if p.requires_grad}, gathered, atol=0)
