"""Hugging Face PEFT's DeLoRA format (``peft_type: DELORA``), read and written exactly.

``adapter_config.json`` is a ``DeloraConfig`` as PEFT writes it (``r``, ``delora_lambda``,
``module_dropout``, ``rank_pattern``, ``lambda_pattern``, ``init_weights``, ``bias: "none"``).
``adapter_model.safetensors`` holds, per layer, ``base_model.model.<module path>.delora_A`` (r x in),
``.delora_B`` (out x r), ``.delora_lambda`` (1) and ``.delora_w_norm`` (in), the pretrained weight's
column norms taken when the adapter was made. A layer whose rank differs from the most common one
is written into ``rank_pattern`` under its full module name. The trained lambda is in the tensors;
``delora_lambda`` / ``lambda_pattern`` only record where training started. Linear layers only; a
file that trains biases is refused clearly.
"""
from __future__ import annotations

from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError
from ..methods.delora import DeloraConfig
from .hf_common import (PREFIX, linear_modules, module_tensors,
                        present_modules_to_save, refuse_base_training, target_names)
from .hf_fourierft import peft_counts

PEFT_TYPES = ("DELORA",)
KEYS = ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "delora"


def to_hf(model: nn.Module, name: str, config: DeloraConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes a DeLoRA."""
    state = require_state(model)
    tensors, ranks = {}, {}
    for module_name, layer in core.adapter_layers(model, name):
        adapter = layer.adapters[name]
        for key in KEYS:
            tensors[f"{PREFIX}{module_name}.{key}"] = getattr(adapter, key).detach()
        ranks[module_name] = adapter.r
    r, rank_pattern = peft_counts(ranks, config.r)
    hf = {
        "peft_type": "DELORA",
        "base_model_name_or_path": state.base_name,
        "r": r,
        "delora_lambda": config.lambda_init,
        "module_dropout": config.dropout,
        "rank_pattern": rank_pattern,
        "lambda_pattern": dict(config.lambda_pattern),
        "init_weights": config.init == "default",
        "target_modules": target_names(list(ranks), dict(named_base_modules(model))),
        "exclude_modules": None,
        "bias": "none",
        "modules_to_save": list(config.modules_to_save) or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "auto_mapping": None,
    }
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def config_from_hf(hf: dict, modules: list) -> DeloraConfig:
    refuse_base_training(hf, "DeLoRA")
    try:
        config = DeloraConfig(targets=sorted(modules), r=hf.get("r", 8), lambda_init=hf.get("delora_lambda", 15),
                              dropout=hf.get("module_dropout", 0.0),
                              init="default" if hf.get("init_weights", True) else "random",
                              rank_pattern=dict(hf.get("rank_pattern") or {}),
                              lambda_pattern=dict(hf.get("lambda_pattern") or {}),
                              modules_to_save=list(hf.get("modules_to_save") or []))
        config.validate()
    except (TypeError, ValueError, ConfigError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    return config


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the DeLoRA in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    per_module = module_tensors(tensors, KEYS, source, "DeLoRA")
    for module_name, found in per_module.items():
        missing = [k for k in KEYS if k not in found]
        if missing:
            raise AdapterFormatError(f"{source}: '{module_name}' lacks {', '.join(missing)}; every DeLoRA layer has "
                                     f"{', '.join(KEYS)}")
    config = config_from_hf(hf, list(per_module))
    modules = linear_modules(model, per_module, source, "DeLoRA")
    config.modules_to_save = present_modules_to_save(config.modules_to_save, modules)
    core.attach(model, config, name=name)
    for module_name, layer in core.adapter_layers(model, name):
        found, adapter = per_module[module_name], layer.adapters[name]
        expected = {k: tuple(getattr(adapter, k).shape) for k in KEYS}
        shapes = {k: tuple(v.shape) for k, v in found.items()}
        if shapes != expected:
            wrong = next(k for k in KEYS if shapes[k] != expected[k])
            raise AdapterFormatError(f"{source}: '{module_name}.{wrong}' is {shapes[wrong]}, but the config (r, rank_pattern) "
                                     f"and the layer imply {expected[wrong]}; the config and weights do not belong together")
        adapter.load_state_dict(found)
