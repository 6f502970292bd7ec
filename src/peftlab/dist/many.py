"""Many adapters trained in one pass: K fine-tuning jobs on one frozen base (multi-tenant training,
as in mLoRA, Ye et al., 2023, arXiv:2312.02515, and ASPEN).

Each job has its own data, learning rate, schedule, steps, seed and output folder, and its own
LoRA-family adapter on the shared base. A step concatenates the running jobs' batches, runs the
base once with each row routed to its job's adapter (``core.routing``: one sort-and-segment per
step, reused by every layer), takes each job's mean loss over its own rows, sums them and runs one
backward: a job's adapter only sees its own rows, so its gradient is the one it would get alone.
Then each job clips and steps its own optimizer at its own learning rate. So the base's weights
are read once per step for all K jobs, and held in memory once instead of K times.

A job that reaches its steps leaves (its adapter is saved) and a queued one joins (``max_jobs``);
a job whose loss or gradient is not finite stops alone with the reason, its last checkpoint
intact, and the others go on. Each job checkpoints and resumes exactly as ``train()`` does.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError, TrainingError
from ..train.config import TrainConfig, TrainResult

HOOKS = ("regularization", "after_step", "calibrate")  # methods whose training needs more than gradients


@dataclass
class Job:
    """One fine-tuning job: adapter ``name`` (attached with ``method`` unless the model has it),
    trained on ``data`` (tokenized rows, or a dataset with ``collate``) as ``config`` says.
    ``base``, when given, is the base model the job was written for; it must be the model's."""

    name: str
    data: Any
    config: TrainConfig = field(default_factory=TrainConfig)
    method: str = "lora[r=16]"
    base: str | None = None


@dataclass
class JobOutcome:
    """What became of a job: its ``result`` and, when it stopped early, the ``error`` that stopped it."""

    name: str
    result: TrainResult
    error: str | None = None


class _Running:
    """A job in flight: its parameters, optimizer, data order and progress."""

    def __init__(self, job: Job, model: nn.Module, device):
        from ..core import adapters as core
        from ..train.data import pad_collate, pad_id_of
        from ..train.loop import DataOrder, adapter_buffers, make_optimizer, model_config, start_or_resume

        self.job, self.cfg = job, job.config
        mine = {id(p) for _, module in core.all_adapters(model, job.name) for p in module.parameters()}
        self.params = {n: p for n, p in model.named_parameters() if id(p) in mine and p.requires_grad}
        buffers = {id(b) for _, module in core.all_adapters(model, job.name) for b in module.buffers()}
        saved = {**self.params, **{n: b for n, b in adapter_buffers(model).items() if id(b) in buffers}}
        self.saved = saved
        self.optimizer = make_optimizer(self.params, self.cfg)
        self.order = DataOrder(len(job.data), self.cfg.seed, None, self.cfg.batch_size)
        self.collate = getattr(job.data, "collate", None) or (
            lambda rows: pad_collate(rows, pad_id_of(model_config(model))))
        self.run = start_or_resume(self.cfg, saved, self.optimizer)
        self.device = device
        self.error = None

    @property
    def done(self) -> bool:
        return self.run.steps >= self.cfg.steps

    def batch(self) -> dict:
        from ..train.loop import to_device

        rows = self.order.take(self.run.position, self.cfg.batch_size)
        return to_device(self.collate([self.job.data[i] for i in rows]), self.device)


def train_many(model: nn.Module, jobs: list[Job], max_jobs: int | None = None,
               progress: bool = True) -> dict[str, JobOutcome]:
    """Train every job's adapter on the shared frozen ``model``, at most ``max_jobs`` at a time
    (default: all), in one forward and one backward per step; return each job's outcome by name."""
    from ..core import adapters as core
    from ..core.state import require_state
    from ..models import resolve_device
    from ..train.loop import prepare_model

    check_jobs(model, jobs, max_jobs)
    device = resolve_device(jobs[0].config.device)
    prepare_model(model, device)
    attach_jobs(model, jobs)
    previous_active = list(require_state(model).active)
    core.set_active(model, [job.name for job in jobs])  # every job's adapter trains (each on its own rows)
    waiting, running, finished = list(jobs), [], {}
    limit = max_jobs or len(jobs)
    bar = tqdm(total=sum(job.config.steps for job in jobs), disable=not progress, desc="train-many", unit="step")
    was_training = model.training
    model.train()
    try:
        while waiting or running:
            while waiting and len(running) < limit:
                entry = _Running(waiting.pop(0), model, device)
                bar.update(entry.run.steps)  # a resumed job's steps already done
                if entry.done:
                    finished[entry.job.name] = entry
                else:
                    running.append(entry)
            if not running:
                break
            stepped = fused_step(model, running)
            bar.update(stepped)
            for entry in [e for e in running if e.done or e.error]:
                running.remove(entry)
                finished[entry.job.name] = entry
                if entry.error is None:
                    save_adapter(model, entry)
    finally:
        bar.close()
        model.train(was_training)
        core.set_active(model, previous_active or [job.name for job in jobs])
    return {job.name: JobOutcome(job.name, finished[job.name].run.result(device), finished[job.name].error)
            for job in jobs}


def fused_step(model: nn.Module, running: list[_Running]) -> int:
    """One optimizer step of every running job, from one forward and one backward of all their
    rows; return how many jobs stepped."""
    from .. import routing
    from ..train.checkpoint import checkpoint_folder, save_checkpoint
    from ..train.checkpointing import gradient_checkpointing
    from ..train.loop import clip_gradients, count_tokens, due, lr_at, set_learning_rate
    from ..train.loss import group_losses

    started = time.perf_counter()
    batches = [entry.batch() for entry in running]
    batch = concatenate(batches, model)
    rows = [entry.job.name for entry, b in zip(running, batches) for _ in range(len(b["input_ids"]))]
    # backward inside the routing too: checkpointed layers run their forward again in it
    with routing(model, rows), gradient_checkpointing(model, running[0].cfg.gradient_checkpointing):
        losses = group_losses(model, batch, [len(b["input_ids"]) for b in batches])
        healthy = []
        for entry, loss, job_batch in zip(running, losses, batches):
            if math.isfinite(loss.item()):
                healthy.append((entry, loss, job_batch))
            else:
                entry.error = stop_message(entry, "loss", loss.item())
        if healthy:
            sum(loss for _, loss, _ in healthy).backward()
    seconds = time.perf_counter() - started
    stepped = 0
    for entry, loss, job_batch in healthy:
        cfg, step = entry.cfg, entry.run.steps
        norm = clip_gradients(entry.params, cfg.max_grad_norm)
        if not math.isfinite(norm):
            entry.optimizer.zero_grad(set_to_none=True)
            entry.error = stop_message(entry, "gradient norm", norm)
            continue
        lr = lr_at(step, cfg)
        set_learning_rate(entry.optimizer, lr)  # LoRA+ groups keep their ratio
        entry.optimizer.step()
        entry.optimizer.zero_grad(set_to_none=True)
        entry.run.record(loss.item(), lr, count_tokens(job_batch), seconds, cfg.batch_size)
        stepped += 1
        if cfg.out_dir and due(entry.run.steps, cfg.save_every, cfg.steps):
            save_checkpoint(checkpoint_folder(cfg.out_dir), entry.run.steps, entry.saved, entry.optimizer,
                            entry.run.progress(cfg))
    for entry in running:  # a stopped job's gradients must not leak into anything
        if entry.error is not None:
            entry.optimizer.zero_grad(set_to_none=True)
    return stepped


def concatenate(batches: list[dict], model: nn.Module) -> dict:
    """The jobs' batches as one, job after job, right-padded to the longest row (ids with the
    model's pad id, masks with 0, labels with -100)."""
    from ..train.data import IGNORE_INDEX, pad_id_of
    from ..train.loop import model_config

    keys = set(batches[0])
    if any(set(b) != keys for b in batches) or not {"input_ids", "labels"} <= keys:
        raise ConfigError("train_many: every job's batches need the same fields, with input_ids and labels; got "
                          f"{sorted(sorted(b) for b in batches)}")
    fills = {"input_ids": pad_id_of(model_config(model)), "labels": IGNORE_INDEX}
    width = max(b["input_ids"].shape[1] for b in batches)
    joined = {}
    for key in batches[0]:
        parts = []
        for b in batches:
            value = b[key]
            if value.dim() == 2 and value.shape[1] < width:
                pad = value.new_full((value.shape[0], width - value.shape[1]), fills.get(key, 0))
                value = torch.cat([value, pad], dim=1)
            parts.append(value)
        joined[key] = torch.cat(parts, dim=0)
    if "attention_mask" not in joined:
        joined["attention_mask"] = torch.cat([
            torch.cat([torch.ones_like(b["input_ids"]), b["input_ids"].new_zeros(len(b["input_ids"]),
                                                                                 width - b["input_ids"].shape[1])], 1)
            for b in batches])
    return joined


def stop_message(entry: _Running, what: str, value: float) -> str:
    kept = f"; its last checkpoint in {entry.cfg.out_dir} is intact" if entry.cfg.out_dir else ""
    return (f"job {entry.job.name!r} stopped at step {entry.run.steps + 1}: its {what} is {value} (lower its lr, or "
            f"check its data){kept}; the other jobs went on")


def save_adapter(model: nn.Module, entry: _Running) -> None:
    if entry.cfg.out_dir:
        from ..formats.io import save

        save(model, Path(entry.cfg.out_dir) / "adapter", name=entry.job.name)


# ---- checks before any training --------------------------------------------------------------

def check_jobs(model: nn.Module, jobs: list[Job], max_jobs: int | None) -> None:
    if not jobs or not all(isinstance(job, Job) for job in jobs):
        raise ConfigError("train_many needs a list of peftlab.Job (name, data, config, method)")
    names = [job.name for job in jobs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"train_many: job names must differ (each names its adapter); {repeated} appear twice")
    folders = [str(Path(job.config.out_dir).resolve()) for job in jobs if job.config.out_dir]
    shared = sorted({f for f in folders if folders.count(f) > 1})
    if shared:
        raise ConfigError(f"train_many: two jobs would write to {shared[0]}; give each job its own out_dir")
    bases = {job.base for job in jobs if job.base}
    ours = getattr(getattr(model, "config", None), "_name_or_path", None)
    if len(bases) > 1 or (bases and ours and bases != {ours}):
        raise ConfigError(f"train_many: the jobs are for different base models ({', '.join(sorted(bases))}"
                          f"{'' if not ours else f'; the model is {ours}'}); one pass trains jobs of one base only")
    for setting in ("device", "gradient_checkpointing", "chunked_loss"):
        values = {getattr(job.config, setting) for job in jobs}
        if len(values) > 1:
            raise ConfigError(f"train_many: the jobs share one model, so their {setting} must agree; got {sorted(values)}")
    for job in jobs:
        if len(job.data) == 0:
            raise TrainingError(f"train_many: job {job.name!r} has no training data")
        if job.config.optimizer != "adamw" or job.config.grad_accum != 1:
            raise ConfigError(f"train_many: job {job.name!r} asks for optimizer={job.config.optimizer!r}, "
                              f"grad_accum={job.config.grad_accum}; jobs in one pass train with AdamW, one batch a "
                              "step (raise batch_size instead of grad_accum)")
    if max_jobs is not None and (not isinstance(max_jobs, int) or max_jobs < 1):
        raise ConfigError(f"train_many: max_jobs must be a positive integer, got {max_jobs!r}")


def attach_jobs(model: nn.Module, jobs: list[Job]) -> None:
    """Attach each job's adapter (seeded by the job's seed, as ``train`` alone would see it) unless
    the model has it, and refuse adapters that cannot be routed row by row or need training hooks."""
    from ..core import adapters as core
    from ..core import model_adapters
    from ..core.state import get_state
    from ..train.loop import seed_everything

    for job in jobs:
        state = get_state(model)
        if state is None or job.name not in state.configs:
            seed_everything(job.config.seed)
            core.attach(model, job.method, name=job.name)
        if any(True for _ in model_adapters.model_adapters(model, job.name)):
            raise ConfigError(f"train_many: job {job.name!r} uses soft prompts or prefixes, which change the model's "
                              "inputs for the whole batch and cannot differ row by row; train it alone with train()")
        for config in get_state(model).configs[job.name]:
            hooks = [hook for hook in HOOKS if core.method_hook(config, hook) is not None]
            if hooks:
                raise ConfigError(f"train_many: job {job.name!r} uses {config.method}, whose training needs "
                                  f"{', '.join(hooks)} hooks per adapter; train it alone with train()")
