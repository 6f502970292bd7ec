"""Hugging Face PEFT's BEFT format (``peft_type: BEFT``), read and written exactly.

``adapter_config.json`` is a ``BeftConfig`` as PEFT writes it: ``target_modules``,
``modules_to_save`` and ``init_weights`` (there is nothing else to set). ``adapter_model.safetensors``
holds one trained bias per layer, ``base_model.model.<module path>.beft_bias``, shaped (1, out);
peftlab keeps it flat (out) and reshapes on the way in and out. Linear layers only.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError, IncompatibleBaseError
from ..methods.beft import BEFTConfig
from ..methods.lora import base_weight
from .hf_common import PREFIX, linear_modules, module_tensors, present_modules_to_save, target_names

PEFT_TYPES = ("BEFT",)
KEY = "beft_bias"


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "beft"


def to_hf(model: nn.Module, name: str, config: BEFTConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes a BEFT adapter."""
    state = require_state(model)
    tensors, wrapped = {}, []
    for module_name, layer in core.adapter_layers(model, name):
        tensors[f"{PREFIX}{module_name}.{KEY}"] = layer.adapters[name].beft_bias.detach()[None, :]
        wrapped.append(module_name)
    hf = {
        "peft_type": "BEFT",
        "base_model_name_or_path": state.base_name,
        "target_modules": target_names(wrapped, dict(named_base_modules(model))),
        "init_weights": config.init == "zeros",
        "modules_to_save": list(config.modules_to_save) or None,
        "auto_mapping": None,
    }
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the BEFT adapter in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    per_module = {m: found[KEY] for m, found in module_tensors(tensors, (KEY,), source, "BEFT").items()}
    modules = linear_modules(model, per_module, source, "BEFT")
    for module_name, value in per_module.items():
        out_features = base_weight(modules[module_name]).shape[0]
        if tuple(value.shape) not in ((1, out_features), (out_features,)):
            raise IncompatibleBaseError(f"{source}: '{module_name}.{KEY}' is {tuple(value.shape)}, but the layer has "
                                        f"{out_features} outputs (PEFT saves (1, {out_features})): wrong base model")
    try:
        config = BEFTConfig(targets=sorted(per_module), init="zeros" if hf.get("init_weights", True) else "gaussian",
                            modules_to_save=present_modules_to_save(hf.get("modules_to_save") or [], modules))
        config.validate()
    except (TypeError, ValueError, ConfigError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    core.attach(model, config, name=name)
    with torch.no_grad():
        for module_name, layer in core.adapter_layers(model, name):
            layer.adapters[name].beft_bias.copy_(per_module[module_name].flatten())
