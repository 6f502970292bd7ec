"""Prefix tuning: Optimizing Continuous Prompts for Generation (Li & Liang, 2021, arXiv:2101.00190).

Why: a soft prompt at the input (prompt tuning) has to steer every layer through the model's
own computation; prefix tuning gives every layer its own ``length`` virtual tokens, as keys and
values that each attention layer attends to in front of the real tokens, so the frozen model is
steered at every depth with 0.1% of its parameters. The paper matches full fine-tuning on
table-to-text generation and extrapolates better to unseen topics.

What: per layer, ``length`` key and value vectors per key/value head, written into the KV cache
(a transformers ``DynamicCache``) before the real tokens run, so the model's own attention uses
them: nothing of the model's forward is copied (``prompting.py`` does the mask, position and
cache bookkeeping for training, ``generate`` and left-padded batches).

Training the prefix directly is unstable (the paper, section 4.3), so by default
(``reparam=true``) it is produced by an MLP from a smaller table: ``P = MLP(P')`` with
``P'`` (length x key/value width) and a ``hidden``-wide tanh layer (512 in the paper's code).
After training only ``P`` matters: ``fold(model)`` replaces the MLP by the prefix it computes
(same outputs, the MLP's parameters gone), and saving always writes that folded prefix, as HF
PEFT does (``PREFIX_TUNING`` with ``prefix_projection``, ``formats/hf_prompt.py``).
``reparam=false`` trains the prefix directly, which is P-tuning v2 (``ptuning_v2.py``).

Mergeable: no. The prefix is extra attention context, not a change to any weight.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core import kv_cache
from ..core.config import MethodConfig
from ..core.model_adapters import backbone
from ..errors import ConfigError, TargetError
from .prompting import SAVED_KEY, Folding, KVPrefix, PrefixShape, backbone_config, check_length
from .prompting import EXAMPLE_MODEL_SETTINGS, fold  # noqa: F401  (the registry tests' model; fold(model) drops the MLP)

CATEGORY = "additive"
PAPER = "Li & Liang, 2021 (arXiv:2101.00190)"
MERGEABLE = False
IDENTITY_AT_INIT = False
DEFAULT_LR = 5e-4  # through the MLP; on SmolLM2-135M 1e-3 spikes and 5e-3 diverges
INVALID_SETTINGS = ("length=0", "hidden=0", "reparam=maybe")


@dataclass
class PrefixConfig(MethodConfig):
    """length: virtual tokens per layer; reparam: train through an MLP of width ``hidden``."""

    method: ClassVar[str] = "prefix"
    length: int = 20
    reparam: bool = True
    hidden: int = 512

    def validate(self) -> None:
        super().validate()
        check_length(self)
        if not isinstance(self.reparam, bool):
            raise ConfigError(f"{self.method}: reparam must be true or false, got {self.reparam!r}")
        if not isinstance(self.hidden, int) or isinstance(self.hidden, bool) or self.hidden <= 0:
            raise ConfigError(f"{self.method}: hidden (the reparameterization MLP's width) must be a positive integer, "
                              f"got {self.hidden!r}")


class Prefix(Folding, KVPrefix):
    """The prefix in HF PEFT's flat layout (length x layers*2*kv_heads*head_dim): a parameter
    (``prompt_embeddings``) or, with a reparameterization, ``transform(embedding)``."""

    def __init__(self, stack: nn.Module, length: int, shape: PrefixShape, hidden: int | None, factory: dict):
        super().__init__(stack, length, shape)
        if hidden is None:
            self.prompt_embeddings = nn.Parameter(torch.randn(length, shape.flat, **factory))
            return
        self.embedding = nn.Parameter(torch.randn(length, shape.width, **factory))
        self.transform = nn.Sequential(nn.Linear(shape.width, hidden), nn.Tanh(), nn.Linear(hidden, shape.flat)).to(**factory)

    def network_names(self) -> tuple:
        return ("embedding", "transform")

    def final(self) -> torch.Tensor:
        return getattr(self, SAVED_KEY) if self.folded else self.transform(self.embedding)

    def prefix(self) -> torch.Tensor:
        return self.final()


def make_prefix(model: nn.Module, config, hidden: int | None, kind: type = Prefix) -> Prefix:
    """A prefix (of class ``kind``) for every layer of ``model``'s backbone; ``hidden`` None trains it directly."""
    stack = backbone(model)
    shape = PrefixShape(backbone_config(stack, config.method))
    if kv_cache.keyword(stack) is None:
        raise TargetError(f"{config.method} feeds its prefix through the KV cache, but {type(stack).__name__}.forward "
                          f"takes no KV cache (no argument named {' or '.join(kv_cache.NAMES)})")
    weight = stack.get_input_embeddings().weight
    return kind(stack, config.length, shape, hidden, dict(device=weight.device, dtype=weight.dtype))


Config = PrefixConfig


def make_model_adapter(model: nn.Module, config: PrefixConfig) -> Prefix:
    return make_prefix(model, config, config.hidden if config.reparam else None)
