"""LayerNorm tuning: train only the affine parameters of the normalisation layers.

Zhao et al., 2023, "Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning"
(arXiv:2312.11420) find that turning an LLM into a multi-modal one needs little more than training
the LayerNorm parameters inside its attention blocks: it performs on par with full fine-tuning
and LoRA with far fewer trainable parameters and less memory. The norms set the scale (and
offset) of every feature entering attention and the MLP. HF PEFT has it as ``LN_TUNING``.

The default targets are every norm of the model (the role ``norms``: the blocks' pre-attention
and pre-MLP norms and the final norm of a Llama; every ``LayerNorm`` of a BERT). As in HF PEFT,
other modules may be named too (LLaVA's recipe also trains the projector and the output head).

It is structured selection (``select.py``) restricted to the norms: each norm gets a trainable
delta (init zero) for its weight and bias and computes with ``weight + delta``, so the model
equals the base at init and ``disabled()`` is exactly the base. Mergeable: merging adds the deltas
to the norm's parameters. Saved in HF PEFT's exact format (``formats/hf_ln_tuning.py``), which
stores the trained parameters themselves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..core.config import MethodConfig
from . import select
from .select import ParameterDelta

CATEGORY = "selective"
PAPER = "Zhao et al., 2023 (arXiv:2312.11420)"
MERGEABLE = True
INVALID_SETTINGS = ("targets=[]", "layers=[-1]", "exclude=[1]")
DEFAULT_LR = 5e-3
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}  # weights at a pretrained scale: a random tiny model's blocks barely act


@dataclass
class LnTuningConfig(MethodConfig):
    """targets: the norms to train (default: every LayerNorm / RMSNorm of the model)."""

    method: ClassVar[str] = "ln_tuning"
    targets: Any = "norms"


Config = LnTuningConfig
can_wrap = select.can_wrap  # norms, and any module with parameters of its own


def make_adapter(module, config: LnTuningConfig, name: str) -> ParameterDelta:
    return ParameterDelta(module)
