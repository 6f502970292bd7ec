"""The training loop: plain PyTorch, one screen per idea, no callbacks.

    for step in range(start, steps):
        set the learning rate for this step        (warmup, then cosine / linear / constant)
        forward + backward grad_accum micro-batches (loss averaged over them)
        stop on a NaN / inf loss or gradient        (before the bad update touches the weights)
        clip the gradient norm, AdamW step
        evaluate / checkpoint when due

With ``optimizer="mezo"`` a step is two forward passes and an update instead (``mezo.py``); with
``gradient_checkpointing`` the layers recompute their activations in backward (``checkpointing.py``).
Started by ``torchrun``, the same loop runs data-parallel (``dist/ddp.py``): each rank takes its
slice of every step's rows, DDP averages the gradients, rank 0 alone writes checkpoints.

Everything a resumed run needs is a function of (seed, step, data position) plus the tensors in
the checkpoint, so a run killed at any point and resumed ends with the same weights and losses as
one that never stopped.
"""
from __future__ import annotations

import contextlib
import functools
import math
import random
import time
import warnings

import torch
from tqdm.auto import tqdm

from ..core import adapters as core
from ..dist import ddp
from ..errors import ConfigError, StateError, TrainingError
from ..models import resolve_device
from .checkpoint import capture_rng, checkpoint_folder, has_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from .checkpointing import gradient_checkpointing
from .config import TRAJECTORY_KEYS, TrainConfig, TrainResult
from .data import pad_collate, pad_id_of
from .loraplus import loraplus_groups
from .loss import training_loss
from .mezo import MeZO, projected_gradient, step_seed


def train(model: torch.nn.Module, data, cfg: TrainConfig | None = None, eval_fn=None, on_step=None) -> TrainResult:
    """Train the trainable parameters of ``model`` on ``data``; return a ``TrainResult``.

    ``model(**batch)`` must return an object with ``.loss`` (Hugging Face models do when the batch
    has ``labels``); a causal LM's loss is computed blockwise without the full logits
    (``cfg.chunked_loss``, see ``loss.py``). ``data`` is a map-style dataset (a list will do) of
    tokenized rows; its ``collate(list_of_examples)`` makes a batch if it has one, else the rows
    are padded by ``pad_collate`` with the model's pad id (``data.py``).
    ``eval_fn(model) -> dict`` runs every ``cfg.eval_every`` steps and at the end, in eval mode
    without gradients, and never disturbs the training random streams.
    ``on_step(step)`` runs after each optimizer step (``step`` counts from 1), gradients still
    there: for a model that needs its own per-step call, such as HF PEFT's AdaLoRA
    (``update_and_allocate``); peftlab's methods use their own hooks (``core/adapters.py``).
    """
    cfg = cfg or TrainConfig()
    if len(data) == 0:
        raise TrainingError("the training data is empty")
    place = ddp.world()
    device = ddp.device_for(place, resolve_device(cfg.device))
    if place.distributed and cfg.optimizer == "mezo":
        raise ConfigError("MeZO trains by forward passes alone and has no gradients for data-parallel ranks to "
                          "average; run it in one process")
    ddp.setup(place, device)
    was_training = model.training
    prepare_model(model, device)
    trainable_parameters(model)  # a clear error before anything else when nothing trains
    order = DataOrder(len(data), cfg.seed, row_lengths(data) if cfg.group_by_length else None,
                      cfg.batch_size * place.size)
    collate = getattr(data, "collate", None) or functools.partial(pad_collate, pad_id=pad_id_of(model_config(model)))
    if not resuming(cfg):
        seed_everything(cfg.seed)
    # before sharding (the whole model on every rank); on resume too: an init chosen from data (LoRA's eva, corda,
    # lora_ga) is rebuilt from the same first batches, deterministically, before the checkpoint's values replace it
    calibrate(model, data, collate, order, cfg, device)
    loss_fn = functools.partial(training_loss, chunked=cfg.chunked_loss)
    forward = parallel_forward(model, loss_fn, cfg, device, place)
    params = trainable_parameters(model)  # after sharding: FSDP replaces parameters by their shards
    saved = {**params, **adapter_buffers(model)}  # what a checkpoint holds besides the optimizer
    optimizer = make_optimizer(params, cfg)
    run = start_or_resume(cfg, saved, optimizer, place)
    batches = Batches(data, collate, order, cfg, device, place)
    sharded = place.distributed and cfg.strategy == "fsdp"

    model.train()
    bar = tqdm(total=cfg.steps, initial=run.steps, disable=not (cfg.progress and place.main), desc="train",
               unit="step", dynamic_ncols=True)
    try:
        for step in range(run.steps, cfg.steps):
            started = time.perf_counter()
            lr = lr_at(step, cfg)
            with gradient_checkpointing(model, cfg.gradient_checkpointing):
                loss, tokens = train_step(model, forward, batches, run.position, optimizer, params, lr, step, cfg,
                                          on_step)
            run.record(loss, lr, tokens, time.perf_counter() - started, batches.rows_per_step)
            if run.steps % cfg.log_every == 0 or run.steps == cfg.steps:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{run.session_tokens_per_second():.0f}")
            bar.update(1)
            if eval_fn is not None and (place.main or sharded) and due(run.steps, cfg.eval_every, cfg.steps):
                run.eval_history.append(evaluate(model, eval_fn, run.steps, forward if sharded else None))
                bar.write(f"step {run.steps}: {format_metrics(run.eval_history[-1])}")
            if cfg.out_dir and due(run.steps, cfg.save_every, cfg.steps):
                # every rank takes part (sharded tensors are gathered), rank 0 writes
                save_checkpoint(checkpoint_folder(cfg.out_dir), run.steps, saved, optimizer, run.progress(cfg),
                                write=place.main)
                ddp.barrier(place)  # no rank runs ahead of a checkpoint it might have to resume from
    finally:
        bar.close()
        model.train(was_training)
    if sharded:
        forward.unshard()  # the root's weights whole again, so the model runs (on every rank) as a model
    if eval_fn is not None and (place.main or sharded) and (not run.eval_history
                                                            or run.eval_history[-1]["step"] != run.steps):
        run.eval_history.append(evaluate(model, eval_fn, run.steps))  # e.g. resumed from a finished run
    return run.result(device)


def resuming(cfg: TrainConfig) -> bool:
    return bool(cfg.resume and cfg.out_dir and has_checkpoint(checkpoint_folder(cfg.out_dir)))


def parallel_forward(model, loss_fn, cfg: TrainConfig, device, place: ddp.World):
    """``forward(batch) -> loss``: plain in one process, through DDP or FSDP2 under torchrun."""
    if not place.distributed:
        return functools.partial(loss_fn, model)
    if cfg.strategy == "fsdp":
        from ..dist import fsdp
        return fsdp.shard(model, loss_fn)
    return ddp.wrap(model, loss_fn, device)


# ---------------------------------------------------------------------------------------------
# Setup


def prepare_model(model: torch.nn.Module, device: torch.device) -> None:
    """Move the model to ``device``. On CPU, half-precision weights are cast to fp32: CPUs have no
    fast bf16/fp16 matmul (about 30x slower than fp32 on a typical laptop)."""
    if any(p.device != device for p in model.parameters()):
        model.to(device)
    if device.type == "cpu" and any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters()):
        model.float()


def model_config(model: torch.nn.Module):
    """A transformers model's config (the text model's, for a multimodal one), or None."""
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def trainable_parameters(model: torch.nn.Module) -> dict:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise StateError("the model has no trainable parameters; attach an adapter first, "
                         "e.g. peftlab.attach(model, 'lora[r=16]')")
    return params


def adapter_buffers(model: torch.nn.Module) -> dict:
    """Buffers of adapter modules (masks, ranks, importance scores): a method's training state
    that is not a parameter, saved in checkpoints so a resumed run continues exactly."""
    mine = {id(b) for _, module in core.all_adapters(model) for b in module.buffers()}
    return {name: b for name, b in model.named_buffers() if id(b) in mine}


def calibrate(model, data, collate, order, cfg: TrainConfig, device, batches: int = 8) -> None:
    """Let data-driven methods (FishMask's Fisher information) see the first training batches,
    in eval mode and without touching the random streams training uses next."""
    if not any(True for _ in core.active_hooks(model, "calibrate")):
        return
    count = min(batches, max(1, len(data) // cfg.batch_size))
    rows = [order.take(i * cfg.batch_size, cfg.batch_size) for i in range(count)]

    def loss_fn(m, batch):
        return training_loss(m, batch, cfg.chunked_loss)

    was_training = model.training
    model.eval()
    try:
        with _preserved_rng():
            core.calibrate(model, [to_device(collate([data[i] for i in r]), device) for r in rows], loss_fn)
    finally:
        model.train(was_training)


def make_optimizer(params: dict, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (or MeZO) with weight decay on matrices only: decaying biases and norm scales toward
    zero hurts more than it regularizes (the usual GPT recipe). With ``cfg.loraplus_lr_ratio``,
    LoRA+'s groups (``loraplus.py``), each rate a multiple ``lr_scale`` of the schedule's."""
    if cfg.loraplus_lr_ratio is not None:
        return torch.optim.AdamW(loraplus_groups(params, cfg.lr, cfg.loraplus_lr_ratio, cfg.loraplus_lr_embedding,
                                                 cfg.weight_decay), lr=cfg.lr)
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "mezo":
        return MeZO(groups, lr=cfg.lr, eps=cfg.mezo_eps)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's ``lr`` for this step, times each group's ``lr_scale`` (LoRA+; 1 otherwise)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass


class _Run:
    """The mutable progress of one run: what a checkpoint stores besides tensors."""

    def __init__(self):
        self.steps, self.position, self.tokens, self.train_seconds = 0, 0, 0, 0.0
        self.losses, self.learning_rates, self.eval_history = [], [], []
        self.resumed_from = None
        self.session_tokens, self.session_seconds = 0, 0.0  # this process only, for the progress bar

    def record(self, loss: float, lr: float, tokens: int, seconds: float, rows: int) -> None:
        self.steps += 1
        self.position += rows
        self.losses.append(loss)
        self.learning_rates.append(lr)
        self.tokens, self.session_tokens = self.tokens + tokens, self.session_tokens + tokens
        self.train_seconds, self.session_seconds = self.train_seconds + seconds, self.session_seconds + seconds

    def session_tokens_per_second(self) -> float:
        return self.session_tokens / max(self.session_seconds, 1e-9)

    def progress(self, cfg: TrainConfig) -> dict:
        return {"position": self.position, "world_size": ddp.world().size, "losses": self.losses, "learning_rates": self.learning_rates,
                "eval_history": self.eval_history, "tokens": self.tokens, "train_seconds": self.train_seconds,
                "config": cfg.to_dict()}

    def result(self, device) -> TrainResult:
        return TrainResult(steps=self.steps, losses=list(self.losses), learning_rates=list(self.learning_rates),
                           eval_history=list(self.eval_history), train_seconds=self.train_seconds, tokens=self.tokens,
                           tokens_per_second=self.tokens / self.train_seconds if self.train_seconds else 0.0,
                           peak_memory_mb=peak_memory_mb(device), device=str(device), resumed_from=self.resumed_from)


def start_or_resume(cfg: TrainConfig, params: dict, optimizer, place: ddp.World = ddp.World()) -> _Run:
    """A fresh run seeds every generator; a resumed one restores weights, optimizer, generators
    and history from ``out_dir/checkpoint`` (and starts fresh when there is none yet). Every rank
    of a data-parallel run reads the same checkpoint; the data position is global, so a run may
    resume on another number of ranks (the global batch then changes, with a warning)."""
    run = _Run()
    folder = checkpoint_folder(cfg.out_dir) if cfg.out_dir else None
    if not (cfg.resume and has_checkpoint(folder)):
        seed_everything(cfg.seed)
        return run
    state = load_checkpoint(folder, params, optimizer)
    changed = [k for k in TRAJECTORY_KEYS if state.get("config", {}).get(k) != getattr(cfg, k)]
    if state.get("world_size", 1) != place.size:
        changed.append(f"number of data-parallel ranks ({state.get('world_size', 1)} -> {place.size}, so the global "
                       "batch)")
    if changed and place.main:
        warnings.warn(f"resuming with different {', '.join(changed)} than the checkpoint was trained with; "
                      "the result will differ from an uninterrupted run", stacklevel=3)
    run.steps = run.resumed_from = state["step"]
    run.position, run.tokens, run.train_seconds = state["position"], state["tokens"], state["train_seconds"]
    run.losses, run.learning_rates, run.eval_history = state["losses"], state["learning_rates"], state["eval_history"]
    return run


# ---------------------------------------------------------------------------------------------
# One step


def due(step: int, every: int, last: int) -> bool:
    """Evaluations and checkpoints happen every ``every`` steps (0 = never) and after the last."""
    return step == last or (every > 0 and step % every == 0)


class Batches:
    """Which rows this process trains on at a data position: micro-batch ``m`` of a step gives rank
    ``r`` of ``R`` the rows ``position + (m R + r) batch_size`` onward (one process: ``R = 1``)."""

    def __init__(self, data, collate, order: "DataOrder", cfg: TrainConfig, device, place: ddp.World):
        self.data, self.collate, self.order, self.cfg, self.device, self.place = data, collate, order, cfg, device, place
        self.rows_per_step = cfg.batch_size * cfg.grad_accum * place.size

    def micro(self, position: int, micro: int) -> dict:
        start = position + (micro * self.place.size + self.place.rank) * self.cfg.batch_size
        rows = self.order.take(start, self.cfg.batch_size)
        return to_device(self.collate([self.data[i] for i in rows]), self.device)


def train_step(model, forward, batches: Batches, position: int, optimizer, params: dict, lr: float, step: int,
               cfg: TrainConfig, on_step=None) -> tuple[float, int]:
    """One optimizer step; return (mean loss, tokens), over all ranks under DDP. A non-finite loss or
    gradient raises before ``optimizer.step()``, so the weights and optimizer state stay those of
    the last good step (under DDP every rank sees the same averages, so all of them stop)."""
    set_learning_rate(optimizer, lr)
    if isinstance(optimizer, MeZO):
        return mezo_step(model, batches, position, optimizer, lr, step, cfg, on_step)
    loss, tokens = accumulate_gradients(model, forward, batches, position, cfg)
    loss, tokens = ddp.mean(loss, batches.place), ddp.total(tokens, batches.place)
    if batches.place.distributed:
        ddp.require_gradients(params)
    grad_norm = clip_gradients(params, cfg.max_grad_norm)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise non_finite_error(loss, grad_norm, step + 1, cfg)
    optimizer.step()
    core.after_step(model, step + 1, cfg.steps, lr)  # budget schedules, proximal updates (gradients still here)
    if on_step is not None:
        on_step(step + 1)
    optimizer.zero_grad(set_to_none=True)
    return loss, tokens


def mezo_step(model, batches: Batches, position: int, optimizer: MeZO, lr: float, step: int, cfg: TrainConfig,
              on_step=None) -> tuple[float, int]:
    """One MeZO step over ``grad_accum`` micro-batches: two forward passes of each, no backward.
    The reported loss is the mean of the two passes; a non-finite loss or estimate raises, and
    MeZO made no update."""
    micro_batches = [batches.micro(position, micro) for micro in range(cfg.grad_accum)]
    losses = []

    def objective() -> float:
        total = 0.0
        for batch in micro_batches:
            loss = require_loss(training_loss(model, batch, cfg.chunked_loss))
            penalty = core.regularization(model)  # the reported loss excludes it, as with backprop
            losses.append(loss.item())
            total += (loss if penalty is None else loss + penalty).item() / len(micro_batches)
        return total

    plus, minus = optimizer.step(objective, seed=step_seed(cfg.seed, step))
    loss = sum(losses) / len(losses)
    estimate = projected_gradient(plus, minus, cfg.mezo_eps)
    if not (math.isfinite(loss) and math.isfinite(estimate)):
        raise non_finite_error(loss, estimate, step + 1, cfg)
    core.after_step(model, step + 1, cfg.steps, lr)
    if on_step is not None:
        on_step(step + 1)
    return loss, sum(count_tokens(batch) for batch in micro_batches)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of 0-based optimizer step ``step``: linear warmup to ``cfg.lr`` over
    ``warmup_steps``, then cosine or linear decay toward 0 at ``cfg.steps``, or constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return cfg.lr * (1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class DataOrder:
    """Which rows each batch gets: a seeded permutation per epoch, read as one endless stream.

    Position ``p`` is row ``perm(p // n)[p % n]``, a pure function of (seed, p), so the position
    alone restores the data order exactly on resume, and a batch may straddle two epochs.

    With ``lengths`` (``group_by_length``), each epoch's permutation is cut into windows of
    ``GROUP_WINDOW`` batches and each window is sorted longest first, so a batch holds rows of
    similar length and pads little (the idea of Hugging Face Trainer's length-grouped sampler).
    The windows still come in random order of their rows, so the data mix stays random.
    """

    GROUP_WINDOW = 50

    def __init__(self, n: int, seed: int, lengths: list | None = None, batch_size: int = 1):
        self.n, self.seed, self.lengths = n, seed, lengths
        self.window = self.GROUP_WINDOW * batch_size
        self._epoch, self._perm = -1, None

    def take(self, position: int, count: int) -> list[int]:
        return [self._permutation(p // self.n)[p % self.n] for p in range(position, position + count)]

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=generator).tolist()
            if self.lengths is not None:
                perm = [i for start in range(0, self.n, self.window)
                        for i in sorted(perm[start:start + self.window], key=lambda i: -self.lengths[i])]
            self._epoch, self._perm = epoch, perm
        return self._perm


def row_lengths(data) -> list[int]:
    """Tokens per row, for length-grouped batches (rows are dicts with ``input_ids``)."""
    rows = [data[i] for i in range(len(data))]
    if not all(isinstance(row, dict) and "input_ids" in row for row in rows):
        raise ConfigError("group_by_length needs rows with 'input_ids' (CausalLMData and ClassificationData "
                          "have them); turn it off for this data")
    return [len(row["input_ids"]) for row in rows]


def accumulate_gradients(model, forward, batches: Batches, position: int, cfg: TrainConfig) -> tuple[float, int]:
    """Forward and backward ``grad_accum`` micro-batches; return (mean loss, tokens seen).

    Each micro-batch's loss is scaled by 1/grad_accum so the summed gradient is the mean's. Under
    DDP the ranks' gradients are averaged once, in the last micro-batch's backward."""
    total_loss, tokens = 0.0, 0
    for micro in range(cfg.grad_accum):
        batch = batches.micro(position, micro)
        last = micro == cfg.grad_accum - 1
        with contextlib.nullcontext() if last or not hasattr(forward, "no_sync") else forward.no_sync():
            loss = require_loss(forward(batch))
            penalty = core.regularization(model)  # e.g. L0 gates, orthogonality; reported loss excludes it
            ((loss if penalty is None else loss + penalty) / cfg.grad_accum).backward()
        total_loss += loss.item() / cfg.grad_accum
        tokens += count_tokens(batch)
    return total_loss, tokens


def require_loss(loss):
    if loss is None:
        raise TrainingError("the model returned no loss; the batches need 'labels' "
                            "(CausalLMData and ClassificationData add them)")
    return loss


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def count_tokens(batch: dict) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    ids = batch.get("input_ids")
    return ids.numel() if torch.is_tensor(ids) else 0


def clip_gradients(params: dict, max_norm: float) -> float:
    """Clip the global gradient norm to ``max_norm`` (0 = leave as is); return the norm before."""
    grads = [p for p in params.values() if p.grad is not None]
    if not grads:
        raise TrainingError("no trainable parameter received a gradient; "
                            "is the adapter on the path from input to loss?")
    return float(torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else float("inf")))


def non_finite_error(loss: float, grad_norm: float, step: int, cfg: TrainConfig) -> TrainingError:
    what = f"loss became {loss}" if not math.isfinite(loss) else f"gradient norm became {grad_norm} (loss {loss:.4g})"
    folder = checkpoint_folder(cfg.out_dir) if cfg.out_dir else None
    kept = (f"the last good checkpoint in {folder} is kept; resume=True continues from it"
            if folder and has_checkpoint(folder) else "no checkpoint was written yet")
    return TrainingError(
        f"the {what} at step {step}; training stopped before this update reached the weights ({kept}). "
        f"Try a lower learning rate (now lr={cfg.lr:g}), more warmup_steps or a smaller max_grad_norm, "
        "and check the data for empty or garbled rows"
    )


# ---------------------------------------------------------------------------------------------
# Evaluation and reporting


def evaluate(model, eval_fn, step: int, sharded_root=None) -> dict:
    """Run ``eval_fn(model)`` in eval mode without gradients. The generators are put back
    afterwards, so evaluating (even sampling text) never changes what training does next. Under
    FSDP every rank evaluates together, with the root's weights gathered first (``sharded_root``);
    the next training step shards them again."""
    if sharded_root is not None:
        sharded_root.unshard()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _preserved_rng():
            metrics = eval_fn(model) or {}
    finally:
        model.train(was_training)
    return {"step": step, **{key: _plain(value) for key, value in metrics.items()}}


@contextlib.contextmanager
def _preserved_rng():
    tensors, rest = capture_rng()
    try:
        yield
    finally:
        restore_rng(tensors, rest)


def _plain(value):
    """Metric values as JSON numbers (checkpoints store the eval history as JSON)."""
    if torch.is_tensor(value):
        return value.item()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return value


def format_metrics(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items() if k != "step")


def peak_memory_mb(device) -> float | None:
    """Peak CUDA memory allocated on a GPU; on CPU the process's peak resident set (Linux, macOS)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:
        import resource
        import sys
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)
