"""Hugging Face PEFT's ``CARTRIDGE`` format, read and written exactly.

``adapter_config.json`` is PEFT's ``CartridgeConfig``: the prompt-learning fields prefix tuning
has (``num_virtual_tokens``, ``token_dim`` = kv_heads*head_dim, ``num_attention_heads`` = the
key/value heads, ``num_layers``, ...) plus ``num_frozen_tokens``; ``adapter_model.safetensors``
holds one tensor, ``prompt_embeddings``: the whole KV prefix (length x layers*2*token_dim), the
frozen tokens first, in prefix tuning's layout. PEFT records no initialisation, so a loaded
cartridge is built at ``init=random`` and takes the saved values.
"""
from __future__ import annotations

from torch import nn

from ..core import adapters as core
from ..core import model_adapters
from ..core.state import require_state
from ..errors import AdapterFormatError
from ..methods.cartridge import CartridgeConfig
from ..methods.prompting import SAVED_KEY
from . import hf_prompt, native

PEFT_TYPES = ("CARTRIDGE",)
MODULES_PREFIX = hf_prompt.MODULES_PREFIX


def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == CartridgeConfig.method


def to_hf(model: nn.Module, name: str, config: CartridgeConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes it."""
    module = hf_prompt.model_level_module(model, name)
    tokens = native.export_state(module)[SAVED_KEY].detach()
    hf = {
        "peft_type": PEFT_TYPES[0],
        "base_model_name_or_path": require_state(model).base_name,
        "num_virtual_tokens": config.length,
        "num_frozen_tokens": config.frozen,
        "token_dim": module.shape.width,
        "num_transformer_submodules": 1,
        "num_attention_heads": module.shape.kv_heads,
        "num_layers": getattr(model_adapters.backbone(model).config, "num_hidden_layers", module.shape.layers),
        "modules_to_save": list(config.modules_to_save) or None,
        "auto_mapping": None,
    }
    return hf, {SAVED_KEY: tokens}


def config_from_hf(hf: dict) -> CartridgeConfig:
    if hf.get("num_transformer_submodules") not in (None, 1):
        raise AdapterFormatError(f"this CARTRIDGE adapter is for an encoder-decoder model (num_transformer_submodules="
                                 f"{hf['num_transformer_submodules']}); peftlab's cartridges support decoder-only and "
                                 "encoder-only models")
    try:
        config = CartridgeConfig(length=hf.get("num_virtual_tokens"), frozen=hf.get("num_frozen_tokens", 1))
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
    config.modules_to_save = hf_prompt.present_modules(model, config.modules_to_save)
    core.attach(model, config, name=name)
    native.import_state(hf_prompt.model_level_module(model, name), {SAVED_KEY: tensors[SAVED_KEY]}, config.method, source)
