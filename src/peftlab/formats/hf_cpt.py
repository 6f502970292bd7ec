"""Hugging Face PEFT's ``CPT`` format (Context-aware Prompt Tuning), read and written exactly.

``adapter_config.json`` is PEFT's ``CPTConfig``: the context (``cpt_token_ids``, ``cpt_mask``,
``cpt_tokens_type_mask``), the ball radii (``opt_projection_epsilon``,
``opt_projection_format_epsilon``) and the loss weighting (``opt_weighted_loss_type``,
``opt_loss_decay_factor``); ``adapter_model.safetensors`` holds ``prompt_embeddings``, the final
prompt (context embeddings plus their projected updates). PEFT's CPT is causal-LM only.
"""
from __future__ import annotations

from torch import nn

from ..core import adapters as core
from ..core import model_adapters
from ..core.state import require_state
from ..errors import AdapterFormatError
from ..methods.cpt import CptConfig
from ..methods.prompting import SAVED_KEY
from . import hf_prompt, native

PEFT_TYPES = ("CPT",)
MODULES_PREFIX = hf_prompt.MODULES_PREFIX
FIELDS = {  # peftlab setting -> PEFT field
    "token_ids": "cpt_token_ids", "mask": "cpt_mask", "types": "cpt_tokens_type_mask",
    "epsilon": "opt_projection_epsilon", "format_epsilon": "opt_projection_format_epsilon",
    "weighted_loss": "opt_weighted_loss_type", "loss_decay": "opt_loss_decay_factor", "tokenizer": "tokenizer_name_or_path",
}


def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == CptConfig.method


def to_hf(model: nn.Module, name: str, config: CptConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes it."""
    module = hf_prompt.model_level_module(model, name)
    tokens = native.export_state(module)[SAVED_KEY].detach()
    config_of_model = getattr(model_adapters.backbone(model), "config", None)
    hf = {
        "peft_type": PEFT_TYPES[0],
        "base_model_name_or_path": require_state(model).base_name,
        "num_virtual_tokens": config.length,
        "token_dim": tokens.shape[1],
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(config_of_model, "num_attention_heads", None),
        "num_layers": getattr(config_of_model, "num_hidden_layers", None),
        "modules_to_save": list(config.modules_to_save) or None,
        "auto_mapping": None,
        **{field: getattr(config, key) for key, field in FIELDS.items()},
    }
    return hf, {SAVED_KEY: tokens}


def config_from_hf(hf: dict) -> CptConfig:
    try:
        config = CptConfig(**{key: hf[field] for key, field in FIELDS.items() if hf.get(field) is not None})
        config.modules_to_save = list(hf.get("modules_to_save") or [])
        config.validate()
    except (TypeError, ValueError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    if hf.get("num_virtual_tokens") not in (None, config.length):
        raise AdapterFormatError(f"this CPT adapter has num_virtual_tokens={hf['num_virtual_tokens']} but "
                                 f"{config.length} context tokens (cpt_token_ids); the file is inconsistent")
    return config


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the adapter in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    if SAVED_KEY not in tensors:
        raise AdapterFormatError(f"{source}: the weights file has no '{SAVED_KEY}' tensor")
    config = config_from_hf(hf)
    config.modules_to_save = hf_prompt.present_modules(model, config.modules_to_save)
    core.attach(model, config, name=name)
    native.import_state(hf_prompt.model_level_module(model, name), {SAVED_KEY: tensors[SAVED_KEY]}, config.method, source)
