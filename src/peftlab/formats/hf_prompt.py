"""Hugging Face PEFT's prompt-learning formats (``PROMPT_TUNING``, ``PREFIX_TUNING``, ``P_TUNING``), read and written exactly.

``adapter_config.json`` is PEFT's ``PromptTuningConfig`` / ``PrefixTuningConfig`` /
``PromptEncoderConfig``; ``adapter_model.safetensors`` holds one adapter tensor,
``prompt_embeddings``: the final virtual tokens (length x hidden) for prompt tuning and P-tuning,
the flat prefix (length x layers*2*kv_heads*head_dim) for prefix tuning. Never the networks that
produced them (P-tuning's encoder, prefix tuning's MLP): PEFT saves the folded form and so does
peftlab, and a loaded adapter is folded. A head trained with the adapter (``modules_to_save``)
is stored as ``base_model.<module>.<param>``, where PEFT keeps it for prompt learning.

Methods and types: ``prompt`` is ``PROMPT_TUNING`` (init vocab / random / text is
``SAMPLE_VOCAB`` / ``RANDOM`` / ``TEXT``), ``ptuning`` is ``P_TUNING``, ``prefix`` is
``PREFIX_TUNING`` with ``prefix_projection: true``, and ``ptuning2`` (or ``prefix[reparam=false]``)
is ``PREFIX_TUNING`` with ``prefix_projection: false``, which loads as ``ptuning2``.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from ..core import adapters as core
from ..core import model_adapters
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError
from ..methods.prefix import PrefixConfig
from ..methods.prompt_tuning import PromptTuningConfig
from ..methods.prompting import SAVED_KEY, PrefixShape
from ..methods.ptuning import PTuningConfig
from ..methods.ptuning_v2 import PTuningV2Config
from . import native

PEFT_TYPES = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING")
MODULES_PREFIX = "base_model."  # PEFT's place for modules_to_save of prompt-learning adapters
TYPE_OF = {"prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING", "ptuning2": "PREFIX_TUNING", "ptuning": "P_TUNING"}
INIT_NAMES = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method in TYPE_OF


def to_hf(model: nn.Module, name: str, config) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes it."""
    module = model_level_module(model, name)
    tokens = native.export_state(module)[SAVED_KEY].detach()
    model_config = getattr(model_adapters.backbone(model), "config", None)
    hf = {
        "peft_type": TYPE_OF[config.method],
        "base_model_name_or_path": require_state(model).base_name,
        "num_virtual_tokens": config.length,
        "token_dim": tokens.shape[1],
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(model_config, "num_attention_heads", None),
        "num_layers": getattr(model_config, "num_hidden_layers", None),
        "modules_to_save": list(config.modules_to_save) or None,
        "auto_mapping": None,
    }
    hf.update(_method_settings(config, module, tokens))
    return hf, {SAVED_KEY: tokens}


def _method_settings(config, module, tokens) -> dict:
    if config.method == "prompt":
        text = config.init == "text" and config.tokenizer is not None
        # PEFT's TEXT needs a tokenizer name; a prompt made from given token ids is one sampled from the vocabulary
        init = INIT_NAMES[config.init] if text or config.init != "text" else "SAMPLE_VOCAB"
        return {"prompt_tuning_init": init, "prompt_tuning_init_text": config.init_text if text else None,
                "tokenizer_name_or_path": config.tokenizer if text else None, "tokenizer_kwargs": None}
    if config.method == "ptuning":
        return {"encoder_reparameterization_type": config.encoder.upper(), "encoder_hidden_size": config.hidden or tokens.shape[1],
                "encoder_num_layers": config.encoder_layers, "encoder_dropout": config.dropout}
    reparam = getattr(config, "reparam", False)
    shape: PrefixShape = module.shape
    return {"token_dim": shape.width, "num_attention_heads": shape.kv_heads, "prefix_projection": reparam,
            "encoder_hidden_size": config.hidden if reparam else shape.width, "init_weights": None}


def model_level_module(model: nn.Module, name: str) -> nn.Module:
    found = [module for _, _, module in model_adapters.model_adapters(model, name)]
    if len(found) != 1:
        raise AdapterFormatError(f"adapter {name!r} should hold one soft prompt or prefix, found {len(found)}")
    return found[0]


# ---- load ------------------------------------------------------------------------------------

def config_from_hf(hf: dict):
    """The peftlab config a PEFT prompt-learning config stands for."""
    peft_type = hf.get("peft_type")
    if hf.get("num_transformer_submodules") not in (None, 1):
        raise AdapterFormatError(f"this {peft_type} adapter is for an encoder-decoder model (num_transformer_submodules="
                                 f"{hf['num_transformer_submodules']}); peftlab's soft prompts support decoder-only and "
                                 "encoder-only models")
    length = hf.get("num_virtual_tokens")
    try:
        if peft_type == "PROMPT_TUNING":
            init = {v: k for k, v in INIT_NAMES.items()}.get(str(hf.get("prompt_tuning_init", "RANDOM")).upper())
            if init is None:
                raise AdapterFormatError(f"unknown prompt_tuning_init {hf.get('prompt_tuning_init')!r}")
            text = dict(init_text=hf.get("prompt_tuning_init_text"), tokenizer=hf.get("tokenizer_name_or_path")) \
                if init == "text" else {}
            config = PromptTuningConfig(length=length, init=init, **text)
        elif peft_type == "P_TUNING":
            encoder = str(hf.get("encoder_reparameterization_type", "MLP")).lower()
            config = PTuningConfig(length=length, encoder=encoder, hidden=hf.get("encoder_hidden_size"),
                                   encoder_layers=hf.get("encoder_num_layers", 2) if encoder == "lstm" else 2,
                                   dropout=hf.get("encoder_dropout", 0.0))
        elif hf.get("prefix_projection"):
            config = PrefixConfig(length=length, reparam=True, hidden=hf.get("encoder_hidden_size"))
        else:
            config = PTuningV2Config(length=length)
        config.modules_to_save = list(hf.get("modules_to_save") or [])
        config.validate()
    except (TypeError, ValueError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    return config


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the adapter in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    if SAVED_KEY not in tensors:
        raise AdapterFormatError(f"{source}: the weights file has no '{SAVED_KEY}' tensor")
    config = config_from_hf(hf)
    config.modules_to_save = present_modules(model, config.modules_to_save)
    core.attach(model, _without_text_init(config), name=name)
    require_state(model).configs[name] = [config]
    native.import_state(model_level_module(model, name), {SAVED_KEY: tensors[SAVED_KEY]}, config.method, source)


def present_modules(model: nn.Module, names: list) -> list:
    """The ``modules_to_save`` this model has: PEFT writes every head name it might use for the task
    (["classifier", "score"] for SEQ_CLS)."""
    base_names = [n for n, _ in named_base_modules(model)]
    return [m for m in dict.fromkeys(names) if any(n == m or n.endswith("." + m) for n in base_names)]


def _without_text_init(config):
    """The config to build the adapter with: a text init would load a tokenizer only to be overwritten
    by the saved prompt, so a loaded text-initialized prompt is built with a random one."""
    if config.method == "prompt" and config.init == "text":
        return dataclasses.replace(config, init="random", init_text=None, tokenizer=None, init_ids=None)
    return config
