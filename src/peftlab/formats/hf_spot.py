"""SPoT adapters written as HF PEFT's ``PROMPT_TUNING`` (write only).

A SPoT prompt, once started from its source, is an ordinary prompt-tuning prompt: it is saved as
one (``hf_prompt.py``'s ``PROMPT_TUNING`` file), so HF PEFT loads it, and peftlab loads it back as
``prompt`` without needing the source again. HF PEFT has no SPoT type, so this converter reads
nothing (``PEFT_TYPES`` is empty).
"""
from __future__ import annotations

from torch import nn

from ..methods.prompt_tuning import PromptTuningConfig
from ..methods.spot import SpotConfig
from . import hf_prompt

PEFT_TYPES = ()
MODULES_PREFIX = hf_prompt.MODULES_PREFIX


def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == SpotConfig.method


def to_hf(model: nn.Module, name: str, config: SpotConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes a prompt-tuning prompt."""
    as_prompt = PromptTuningConfig(length=config.length, init="random", modules_to_save=list(config.modules_to_save))
    return hf_prompt.to_hf(model, name, as_prompt)
