"""LoRA+ (Hayou et al., 2024, arXiv:2402.12354): B learns ``ratio`` times faster than A.

LoRA's two factors play different roles: with B at zero and A random, equal learning rates are
inefficient for wide layers, and the paper shows that a larger rate for B (``eta_B = ratio * eta_A``,
ratio around 16) trains faster and to a better loss at no cost. Here it is an optimizer option of
the trainer (``TrainConfig.loraplus_lr_ratio``, ``peftlab train --loraplus-lr-ratio``).

The parameter groups are those of HF PEFT's ``peft.optimizers.create_loraplus_optimizer``:

- embedding LoRA factors (``lora_embedding_A/B``): their own rate, ``loraplus_lr_embedding``
  (PEFT's default 1e-6, an absolute rate, not a multiple);
- ``lora_B`` and every 1-D trainable parameter (biases, norm scales, DoRA's magnitude): ``ratio * lr``;
- everything else (``lora_A``, other trained matrices): ``lr``.

Weight decay follows peftlab's rule (matrices only, ``loop.make_optimizer``); PEFT decays 1-D
parameters whose name lacks "bias" (e.g. an RMSNorm scale) with ``loraplus_weight_decay``, which is
0 by default, so with the defaults the optimizers are the same. Each group keeps its rate as
``lr_scale`` (a multiple of the schedule's current ``lr``), so warmup and decay apply to all of
them, as the Hugging Face Trainer's scheduler does.
"""
from __future__ import annotations

from ..errors import ConfigError

EMBEDDING_KEYS = ("lora_embedding_A", "lora_embedding_B")


def role(name: str, param) -> str:
    """"embedding", "B" or "A": which of LoRA+'s rates the parameter ``name`` gets (PEFT's rule)."""
    if any(key in name.split(".") for key in EMBEDDING_KEYS):
        return "embedding"
    if "lora_B" in name or param.ndim == 1:
        return "B"
    return "A"


def loraplus_groups(params: dict, lr: float, ratio: float, lr_embedding: float = 1e-6,
                    weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups (non-empty ones) for ``{name: parameter}``: each with ``lr``,
    ``lr_scale`` (its rate over ``lr``) and ``weight_decay`` (matrices only)."""
    check_ratio(ratio)
    if not (isinstance(lr_embedding, (int, float)) and not isinstance(lr_embedding, bool) and lr_embedding > 0):
        raise ConfigError(f"train: loraplus_lr_embedding must be a positive number, got {lr_embedding!r}")
    rates = {"A": lr, "embedding": lr_embedding, "B": lr * ratio}
    groups = []
    for which in ("A", "embedding", "B"):
        members = [(n, p) for n, p in params.items() if role(n, p) == which]
        for decay in (True, False):
            chosen = [p for _, p in members if (p.dim() >= 2) == decay]
            if chosen:
                groups.append({"params": chosen, "lr": rates[which], "lr_scale": rates[which] / lr,
                               "weight_decay": weight_decay if decay else 0.0, "loraplus": which})
    return groups


def check_ratio(ratio) -> None:
    if not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio > 0):
        raise ConfigError(f"train: loraplus_lr_ratio (B's learning rate over A's, LoRA+) must be a positive number, "
                          f"e.g. 16; got {ratio!r}")
