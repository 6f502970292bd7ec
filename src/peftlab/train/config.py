"""The training settings and the result of a run, as plain dataclasses that serialize to JSON."""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, fields

from ..errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")
STRATEGIES = ("ddp", "fsdp")
OPTIMIZERS = ("adamw", "mezo")

# Settings that decide the exact sequence of updates; a resume with different values cannot
# reproduce the uninterrupted run, so it warns.
TRAJECTORY_KEYS = ("lr", "steps", "batch_size", "grad_accum", "warmup_steps", "schedule", "weight_decay",
                   "max_grad_norm", "seed", "chunked_loss", "optimizer", "mezo_eps", "group_by_length",
                   "loraplus_lr_ratio", "loraplus_lr_embedding")


@dataclass
class TrainConfig:
    """lr: peak learning rate (AdamW); steps: optimizer steps in total; batch_size: rows per
    forward; grad_accum: forwards per optimizer step (effective batch = batch_size * grad_accum);
    warmup_steps: linear warmup from 0 to lr, then ``schedule`` decays to 0 at ``steps`` (cosine,
    linear) or holds (constant); weight_decay: AdamW decay on matrices only (not biases or norms);
    max_grad_norm: clip the global gradient norm (0 = no clipping); eval_every: call eval_fn every
    N steps (0 = only at the end); seed: model-independent randomness (data order, dropout);
    out_dir: checkpoints go to ``out_dir/checkpoint/``; save_every: checkpoint every N steps (0 =
    only at the end); resume: continue from the checkpoint in out_dir if there is one; device:
    "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1"...; chunked_loss: compute a
    causal LM's head and loss blockwise, never holding the full logits (same loss, less memory and
    time); log_every: refresh the progress bar's numbers every N steps; progress: show a progress bar;
    gradient_checkpointing: recompute each layer's activations in the backward pass instead of keeping
    them (less memory, about one more forward of compute; ``checkpointing.py``); optimizer: "adamw",
    or "mezo" (zeroth-order, forward passes only, no gradients or optimizer state: ``mezo.py``; it wants
    a much smaller lr and many more steps, e.g. 1e-4 for LoRA, 1e-6 for full weights, and ignores
    max_grad_norm); mezo_eps: MeZO's perturbation scale; group_by_length: batch rows of similar
    length together (within windows of 50 batches of a random order), so short rows are not padded
    to long ones: the same data, a fraction of the padding (``loop.DataOrder``); strategy: under
    torchrun, "ddp" (every rank holds the whole model, ``dist/ddp.py``) or "fsdp" (every parameter
    sharded across the ranks, ``dist/fsdp.py``); one process ignores it; loraplus_lr_ratio: LoRA+
    (``loraplus.py``): lora_B and 1-D parameters train at ``ratio * lr`` (None = off, the paper
    suggests 16), embedding LoRA factors at ``loraplus_lr_embedding`` (HF PEFT's default 1e-6), the
    schedule scaling every rate alike."""

    lr: float = 2e-3
    steps: int = 120
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 10
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 0
    seed: int = 0
    out_dir: str | None = None
    save_every: int = 0
    resume: bool = False
    device: str = "auto"
    chunked_loss: bool = True
    log_every: int = 1
    progress: bool = True
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    mezo_eps: float = 1e-3
    group_by_length: bool = False
    strategy: str = "ddp"
    loraplus_lr_ratio: float | None = None
    loraplus_lr_embedding: float = 1e-6

    def __post_init__(self):
        if self.out_dir is not None:
            self.out_dir = str(self.out_dir)  # a Path is welcome, but the checkpoint stores JSON
        self.validate()

    @classmethod
    def from_dict(cls, settings: dict) -> "TrainConfig":
        """From a YAML/JSON config; unknown keys (e.g. from a newer peftlab) warn and are skipped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            warnings.warn(f"train: ignoring unknown settings {', '.join(unknown)}", stacklevel=2)
        return cls(**{k: v for k, v in settings.items() if k in known})

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"train: {name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"train: {name} must be an integer >= 0, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ConfigError(f"train: lr must be a positive number, got {self.lr!r}")
        for name in ("weight_decay", "max_grad_norm"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) >= 0):
                raise ConfigError(f"train: {name} must be a number >= 0, got {getattr(self, name)!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"train: optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not (isinstance(self.mezo_eps, (int, float)) and not isinstance(self.mezo_eps, bool) and self.mezo_eps > 0):
            raise ConfigError(f"train: mezo_eps (MeZO's perturbation scale) must be a positive number, got {self.mezo_eps!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train: schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"train: strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.warmup_steps >= self.steps:
            warnings.warn(f"train: warmup_steps={self.warmup_steps} covers the whole run (steps={self.steps}), so the "
                          f"learning rate never reaches lr={self.lr:g}", stacklevel=4)
        if self.loraplus_lr_ratio is not None:
            from .loraplus import check_ratio

            check_ratio(self.loraplus_lr_ratio)
            if self.optimizer != "adamw":
                raise ConfigError(f"train: loraplus_lr_ratio sets AdamW's per-group learning rates; it does not apply to "
                                  f"optimizer={self.optimizer}")
        if not (isinstance(self.loraplus_lr_embedding, (int, float)) and not isinstance(self.loraplus_lr_embedding, bool)
                and self.loraplus_lr_embedding > 0):
            raise ConfigError(f"train: loraplus_lr_embedding must be a positive number, got {self.loraplus_lr_embedding!r}")
        if self.resume and not self.out_dir:
            raise ConfigError("train: resume=True needs out_dir, the folder whose checkpoint/ to continue from")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    """What a run did. ``losses`` has one mean loss per optimizer step (from step 1, including steps
    done before a resume); ``eval_history`` one dict per evaluation, with its ``step``."""

    steps: int
    losses: list = field(default_factory=list)
    learning_rates: list = field(default_factory=list)
    eval_history: list = field(default_factory=list)
    train_seconds: float = 0.0
    tokens: int = 0
    tokens_per_second: float = 0.0
    peak_memory_mb: float | None = None
    device: str = "cpu"
    resumed_from: int | None = None

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    def summary(self) -> dict:
        """The short, JSON-ready account a CLI prints at the end."""
        return {
            "steps": self.steps,
            "final_loss": self.final_loss,
            "train_seconds": round(self.train_seconds, 3),
            "tokens": self.tokens,
            "tokens_per_second": round(self.tokens_per_second, 1),
            "peak_memory_mb": self.peak_memory_mb,
            "device": self.device,
            "resumed_from": self.resumed_from,
            "last_eval": self.eval_history[-1] if self.eval_history else None,
        }
