"""train_many: K jobs on one frozen base in one forward and one backward per step. Each job's
adapter equals training it alone; a failing job stops alone; per-job checkpoints resume exactly;
bad job lists fail before any training."""
from __future__ import annotations

import pytest
import torch
from conftest import make_llama

import peftlab
from peftlab import Job, train_many
from peftlab.errors import ConfigError
from peftlab.train import TrainConfig, train
from peftlab.train.loop import seed_everything

METHOD = "lora[r=4,alpha=8,dropout=0,targets=all-linear]"


def rows(count: int, length: int, seed: int) -> list[dict]:
    ids = torch.randint(3, 96, (count, length), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]


def jobs(tmp_path=None, **changes) -> list[Job]:
    """Three jobs that differ in everything a job owns: data, lengths, batch, lr, schedule, steps, seed."""
    settings = [("a", rows(12, 10, 1), dict(lr=1e-2, steps=4, batch_size=2, schedule="cosine", seed=3)),
                ("b", rows(9, 14, 2), dict(lr=5e-3, steps=6, batch_size=3, schedule="linear", seed=4)),
                ("c", rows(8, 7, 3), dict(lr=5e-3, steps=3, batch_size=2, schedule="constant", seed=5))]
    # a and b train bit for bit as alone; c's rows are padded to b's length, so its matrix products
    # have other shapes and round differently, and Adam turns that rounding in near-zero gradients
    # into weight differences proportional to lr (5e-7 at lr 1e-2, 3e-6 at 2e-2 on this tiny model)
    out = []
    for name, data, cfg in settings:
        cfg = {"warmup_steps": 1, "progress": False, "device": "cpu", **cfg, **changes.get(name, {})}
        if tmp_path is not None:
            cfg["out_dir"] = str(tmp_path / name)
        out.append(Job(name, data, TrainConfig(**cfg), METHOD))
    return out


def alone(job: Job) -> dict:
    model = make_llama()
    seed_everything(job.config.seed)
    peftlab.attach(model, job.method, name=job.name)
    train(model, job.data, job.config)
    return adapter_of(model, job.name)


def adapter_of(model, name: str) -> dict:
    return {k: p.detach().clone() for k, p in model.named_parameters() if f".{name}." in k and "lora_" in k}


def assert_same(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def test_each_job_trains_the_adapter_it_would_train_alone():
    model = make_llama()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    outcomes = train_many(model, jobs(), progress=False)
    for job in jobs():
        assert outcomes[job.name].error is None and outcomes[job.name].result.steps == job.config.steps
        assert_same(adapter_of(model, job.name), alone(job))
    base = {k: p for k, p in model.named_parameters() if "lora_" not in k}
    assert all(torch.equal(p, before[k.replace("base_layer.", "")]) for k, p in base.items() if k.replace(
        "base_layer.", "") in before), "the base stays frozen"


def test_a_loraplus_job_keeps_its_ratio_in_the_fused_step():
    """The schedule sets each group's lr times its LoRA+ scale, as train() does, not one lr for all."""
    changed = jobs(a={"loraplus_lr_ratio": 8.0})
    model = make_llama()
    train_many(model, changed, progress=False)
    assert_same(adapter_of(model, "a"), alone(changed[0]))
    assert not torch.allclose(adapter_of(model, "a")[next(k for k in adapter_of(model, "a") if "lora_B" in k)],
                              alone(jobs()[0])[next(k for k in adapter_of(model, "a") if "lora_B" in k)], atol=1e-4)


def test_queued_jobs_join_when_a_slot_frees_and_still_match():
    model = make_llama()
    outcomes = train_many(model, jobs(), max_jobs=2, progress=False)
    assert [o.result.steps for o in outcomes.values()] == [4, 6, 3]
    for job in jobs():
        assert_same(adapter_of(model, job.name), alone(job))


def test_checkpointed_activations_recompute_inside_the_routing_and_train_the_same_adapters():
    """With gradient checkpointing the layers run their forward again during backward; run outside
    the step's routing, every row would go through every job's adapter there."""
    checkpointed = {name: {"gradient_checkpointing": True} for name in "abc"}
    model = make_llama()
    outcomes = train_many(model, jobs(**checkpointed), progress=False)
    assert all(o.error is None for o in outcomes.values())
    for job in jobs():
        assert_same(adapter_of(model, job.name), alone(job))


class Poisoning(list):
    """Rows that, when row access number ``at`` comes, turn adapter ``name``'s weights to NaN."""

    def __init__(self, data, model, name, at):
        super().__init__(data)
        self.model, self.name, self.calls, self.at = model, name, 0, at

    def __getitem__(self, i):
        self.calls += 1
        if self.calls == self.at:
            with torch.no_grad():
                for key, p in self.model.named_parameters():
                    if f".{self.name}." in key:
                        p.fill_(float("nan"))
        return super().__getitem__(i)


def test_a_job_whose_loss_goes_nan_stops_alone(tmp_path):
    model = make_llama()
    poisoned = jobs(tmp_path, b={"save_every": 1})
    poisoned[1] = Job("b", Poisoning(poisoned[1].data, model, "b", at=3 * 3 + 1), poisoned[1].config, METHOD)
    outcomes = train_many(model, poisoned, progress=False)
    assert outcomes["b"].error and "job 'b' stopped at step 4: its loss is nan" in outcomes["b"].error
    assert outcomes["b"].result.steps == 3 and (tmp_path / "b" / "checkpoint").is_dir()
    assert not (tmp_path / "b" / "adapter").exists()
    for job in jobs():
        if job.name != "b":
            assert outcomes[job.name].error is None
            assert_same(adapter_of(model, job.name), alone(job))
            assert (tmp_path / job.name / "adapter" / "adapter_model.safetensors").exists()


class Interrupted(Exception):
    pass


class Fragile(list):
    """Rows that raise once, at access number ``at`` (a kill in the middle of a pass)."""

    def __init__(self, data, at):
        super().__init__(data)
        self.calls, self.at = 0, at

    def __getitem__(self, i):
        self.calls += 1
        if self.calls == self.at:
            raise Interrupted
        return super().__getitem__(i)


def test_each_job_resumes_from_its_own_checkpoint_exactly(tmp_path):
    reference = make_llama()
    train_many(reference, jobs(), progress=False)
    killed = jobs(tmp_path, a={"save_every": 1}, b={"save_every": 1}, c={"save_every": 1})
    killed[1] = Job("b", Fragile(killed[1].data, at=3 * 3 + 2), killed[1].config, METHOD)  # in b's 4th batch
    with pytest.raises(Interrupted):
        train_many(make_llama(), killed, progress=False)
    resumed = jobs(tmp_path, a={"resume": True}, b={"resume": True}, c={"resume": True})
    model = make_llama()
    outcomes = train_many(model, resumed, progress=False)
    assert outcomes["b"].result.resumed_from == 3
    for job in jobs():
        assert_same(adapter_of(model, job.name), adapter_of(reference, job.name))


@pytest.mark.parametrize("change,message", [
    (lambda js: js + [Job("a", js[0].data, js[0].config, METHOD)], "job names must differ"),
    (lambda js: [Job(j.name, j.data, TrainConfig(out_dir="/tmp/same-folder", progress=False), METHOD) for j in js],
     "two jobs would write to"),
    (lambda js: [Job(j.name, j.data, j.config, METHOD, base=f"model-{i}") for i, j in enumerate(js)],
     "different base models"),
    (lambda js: [Job("p", js[0].data, js[0].config, "prompt[length=2]")], "soft prompts or prefixes"),
    (lambda js: [Job("s", js[0].data, js[0].config, "sora[r=4]")], "hooks per adapter"),
    (lambda js: [Job("g", js[0].data, TrainConfig(grad_accum=2, progress=False), METHOD)], "one batch a step"),
])
def test_bad_job_lists_fail_before_any_training(change, message):
    model = make_llama()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    with pytest.raises(ConfigError, match=message):
        train_many(model, change(jobs()), progress=False)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[k], v) for k, v in before.items() if k in after)


# ---- the command line ---------------------------------------------------------------------------

def test_peftlab_train_many_trains_each_job_into_its_folder(tmp_path, capsys):
    import json

    from peftlab.cli import main
    from safetensors.torch import load_file
    from test_tasks import char_tokenizer, tiny_llama

    tokenizer = char_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    for name, count, lr, steps in (("sql", 12, 1e-2, 3), ("json", 10, 5e-3, 4)):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"prompt": f"{name} {i}", "response": f"{i}{i}"}) + "\n" for i in range(count)))
        (tmp_path / f"{name}.yaml").write_text(
            f"model: {tmp_path / 'model'}\ndata: {tmp_path / name}.jsonl\nmethod: lora[r=4]\nlr: {lr}\nsteps: {steps}\n"
            f"batch_size: 2\neval_rows: 0\nout: {tmp_path / 'runs' / name}\n")
    jobs = ["--job", f"sql={tmp_path / 'sql.yaml'}", "--job", f"json={tmp_path / 'json.yaml'}"]
    assert main(["train-many", *jobs, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2 of 2 jobs done" in out
    for name, steps in (("sql", 3), ("json", 4)):
        metrics = json.loads((tmp_path / "runs" / name / "metrics.json").read_text())
        assert metrics["train"]["steps"] == steps and metrics["error"] is None
        tensors = load_file(str(tmp_path / "runs" / name / "adapter" / "adapter_model.safetensors"))
        assert tensors and all(".sql." not in k and ".json." not in k for k in tensors)  # saved as a plain adapter

    (tmp_path / "other.yaml").write_text((tmp_path / "json.yaml").read_text().replace(str(tmp_path / "model"), "minilm"))
    assert main(["train-many", "--job", f"sql={tmp_path / 'sql.yaml'}", "--job", f"other={tmp_path / 'other.yaml'}"]) == 2
    assert "different base models" in capsys.readouterr().err
    (tmp_path / "twin.yaml").write_text((tmp_path / "json.yaml").read_text().replace("runs/json", "runs/sql"))
    assert main(["train-many", "--job", f"sql={tmp_path / 'sql.yaml'}", "--job", f"twin={tmp_path / 'twin.yaml'}"]) == 2
    assert "two jobs would write to" in capsys.readouterr().err
    assert main(["train-many", "--job", f"sql={tmp_path / 'sql.yaml'}", "--job", f"sql={tmp_path / 'json.yaml'}"]) == 2
    assert "--job names must differ; 'sql' is given twice" in capsys.readouterr().err
    assert main(["train-many", "--job", str(tmp_path / "sql.yaml")]) == 2
    assert "--job takes NAME=FILE" in capsys.readouterr().err
