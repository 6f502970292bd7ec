"""P-tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally Across Scales and Tasks
(Liu et al., 2022, arXiv:2110.07602).

Why: input-level prompts (prompt tuning, P-tuning) fall behind fine-tuning on models under ~10B
parameters and on hard sequence-labelling tasks. P-tuning v2 shows that deep prompts, trainable
virtual tokens at every layer, match fine-tuning across scales (300M to 10B) and tasks (NLU and
sequence labelling) while training 0.1-3% of the parameters, and that the reparameterization
network of prefix tuning is unnecessary, even harmful on some tasks.

What: prefix tuning without reparameterization (``prefix.py`` with ``reparam=false``): per
layer, ``length`` key and value vectors, trained directly and fed to every attention layer
through the KV cache. The paper also drops the verbalizer for a plain classification head on
the encoder's output; with peftlab that is a BERT-style model's own head, trained through
``modules_to_save=[classifier]``.

HF PEFT stores this as ``PREFIX_TUNING`` with ``prefix_projection: false`` (its default prefix
tuning), and such files load here as ``ptuning2``.

Mergeable: no. The deep prompts are extra attention context, not a change to any weight.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..core.config import MethodConfig
from .prefix import Prefix, make_prefix
from .prompting import check_length
from .prompting import EXAMPLE_MODEL_SETTINGS  # noqa: F401  (the registry tests' model)

CATEGORY = "additive"
PAPER = "Liu et al., 2022 (arXiv:2110.07602)"
MERGEABLE = False
IDENTITY_AT_INIT = False
DEFAULT_LR = 1e-2
INVALID_SETTINGS = ("length=0", "length=2.5")


@dataclass
class PTuningV2Config(MethodConfig):
    """length: virtual tokens per layer."""

    method: ClassVar[str] = "ptuning2"
    length: int = 20

    def validate(self) -> None:
        super().validate()
        check_length(self)


Config = PTuningV2Config


def make_model_adapter(model: nn.Module, config: PTuningV2Config) -> Prefix:
    return make_prefix(model, config, hidden=None)
