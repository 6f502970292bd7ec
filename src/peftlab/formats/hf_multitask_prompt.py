"""Hugging Face PEFT's ``MULTITASK_PROMPT_TUNING`` format, read and written exactly.

``adapter_config.json`` is PEFT's ``MultitaskPromptTuningConfig`` (prompt tuning's fields plus
``num_tasks``, ``num_ranks``, ``prompt_tuning_init_state_dict_path`` and ``prompt_tuning_init_task``);
``adapter_model.safetensors`` holds the shared prompt ``prompt_embeddings`` (length x hidden, not
multiplied by any task's factors) and the factors ``prefix_task_cols`` (tasks x length x r) and
``prefix_task_rows`` (tasks x r x hidden). The prompt-tuning bookkeeping (heads under
``base_model.``, encoder-decoder refusal) is ``hf_prompt``'s.

A source-initialized adapter records its source file (``prompt_tuning_init_state_dict_path``), as
PEFT does; PEFT reads that file again whenever it builds the adapter, loading included, so such a
file loads in PEFT only where the source is; peftlab loads it without the source.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from ..core import adapters as core
from ..core import model_adapters
from ..core.state import require_state
from ..errors import AdapterFormatError
from ..methods.multitask_prompt import COLS, ROWS, SOURCE_INITS, MultitaskPromptConfig
from ..methods.prompting import SAVED_KEY
from . import hf_prompt, native

PEFT_TYPES = ("MULTITASK_PROMPT_TUNING",)
MODULES_PREFIX = hf_prompt.MODULES_PREFIX
INIT_NAMES = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT",
              **{init: init.upper() for init in SOURCE_INITS}}
KEYS = (SAVED_KEY, COLS, ROWS)


def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == MultitaskPromptConfig.method


def to_hf(model: nn.Module, name: str, config: MultitaskPromptConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes it."""
    module = hf_prompt.model_level_module(model, name)
    tensors = {k: v.detach() for k, v in native.export_state(module).items()}
    config_of_model = getattr(model_adapters.backbone(model), "config", None)
    text = config.init == "text" and config.tokenizer is not None
    # PEFT's TEXT needs a tokenizer name; a prompt made from given token ids is one sampled from the vocabulary
    init = INIT_NAMES[config.init] if text or config.init != "text" else "SAMPLE_VOCAB"
    hf = {
        "peft_type": PEFT_TYPES[0],
        "base_model_name_or_path": require_state(model).base_name,
        "num_virtual_tokens": config.length,
        "token_dim": tensors[SAVED_KEY].shape[1],
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(config_of_model, "num_attention_heads", None),
        "num_layers": getattr(config_of_model, "num_hidden_layers", None),
        "modules_to_save": list(config.modules_to_save) or None,
        "auto_mapping": None,
        "prompt_tuning_init": init,
        "prompt_tuning_init_text": config.init_text if text else None,
        "tokenizer_name_or_path": config.tokenizer if text else None,
        "tokenizer_kwargs": None,
        "prompt_tuning_init_state_dict_path": config.source,
        "prompt_tuning_init_task": config.source_task,
        "num_ranks": config.r,
        "num_tasks": config.tasks,
    }
    return hf, tensors


def config_from_hf(hf: dict) -> MultitaskPromptConfig:
    if hf.get("num_transformer_submodules") not in (None, 1):
        raise AdapterFormatError(f"this MULTITASK_PROMPT_TUNING adapter is for an encoder-decoder model "
                                 f"(num_transformer_submodules={hf['num_transformer_submodules']}); peftlab's soft "
                                 "prompts support decoder-only and encoder-only models")
    init = {v: k for k, v in INIT_NAMES.items()}.get(str(hf.get("prompt_tuning_init", "RANDOM")).upper())
    if init is None:
        raise AdapterFormatError(f"unknown prompt_tuning_init {hf.get('prompt_tuning_init')!r}")
    extra = {}
    if init == "text":
        extra = dict(init_text=hf.get("prompt_tuning_init_text"), tokenizer=hf.get("tokenizer_name_or_path"))
    elif init in SOURCE_INITS:
        extra = dict(source=hf.get("prompt_tuning_init_state_dict_path"))
    try:
        config = MultitaskPromptConfig(length=hf.get("num_virtual_tokens"), tasks=_or_one(hf.get("num_tasks")),
                                       r=_or_one(hf.get("num_ranks")), init=init,
                                       source_task=hf.get("prompt_tuning_init_task") or 0, **extra)
        config.modules_to_save = list(hf.get("modules_to_save") or [])
        config.validate()
    except (TypeError, ValueError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    return config


def _or_one(value):
    return 1 if value is None else value  # PEFT's default for num_tasks and num_ranks


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the adapter in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    missing = [k for k in KEYS if k not in tensors]
    if missing:
        raise AdapterFormatError(f"{source}: a MULTITASK_PROMPT_TUNING weights file needs {', '.join(KEYS)}; missing {missing}")
    config = config_from_hf(hf)
    config.modules_to_save = hf_prompt.present_modules(model, config.modules_to_save)
    # built with a random shared prompt: the saved one replaces it, so no tokenizer or source file is needed
    built = dataclasses.replace(config, init="random", init_text=None, tokenizer=None, init_ids=None, source=None)
    core.attach(model, built, name=name)
    require_state(model).configs[name] = [config]
    native.import_state(hf_prompt.model_level_module(model, name), {k: tensors[k] for k in KEYS}, config.method, source)
