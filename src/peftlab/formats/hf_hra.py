"""Hugging Face PEFT's HRA format (``peft_type: HRA``), read and written exactly.

``adapter_config.json`` is an ``HRAConfig`` as PEFT writes it (``r``, ``apply_GS``,
``init_weights``, ``bias: "none"``); ``adapter_model.safetensors`` holds each layer's reflection
vectors as ``base_model.model.<module path>.hra_u`` (in x r), the peftlab module's own state dict.
``init_weights`` only chooses the vectors a new adapter starts from, so a file's value is kept
where peftlab can start that way (the symmetric init: even ``r``, no Gram-Schmidt) and read as
``init=random`` otherwise (PEFT's fallback for an odd ``r``). Linear layers only; files that
train biases or target Conv1D layers are refused clearly.
"""
from __future__ import annotations

from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError
from ..methods.hra import HraConfig
from .hf_common import (PREFIX, linear_modules, module_tensors,
                        present_modules_to_save, refuse_base_training, target_names)

PEFT_TYPES = ("HRA",)
KEY = "hra_u"


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "hra"


def to_hf(model: nn.Module, name: str, config: HraConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes an HRA."""
    state = require_state(model)
    tensors, modules = {}, []
    for module_name, layer in core.adapter_layers(model, name):
        tensors[f"{PREFIX}{module_name}.{KEY}"] = layer.adapters[name].hra_u.detach()
        modules.append(module_name)
    hf = {
        "peft_type": "HRA",
        "base_model_name_or_path": state.base_name,
        "r": config.r,
        "apply_GS": config.gram_schmidt,
        "init_weights": config.init == "symmetric",
        "target_modules": target_names(modules, dict(named_base_modules(model))),
        "exclude_modules": None,
        "bias": "none",
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": list(config.modules_to_save) or None,
        "auto_mapping": None,
    }
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def config_from_hf(hf: dict, modules: list) -> HraConfig:
    refuse_base_training(hf, "HRA")
    try:
        r, gram_schmidt = hf.get("r", 8), hf.get("apply_GS", False)
        symmetric = hf.get("init_weights", True) is True and isinstance(r, int) and r % 2 == 0 and gram_schmidt is False
        config = HraConfig(targets=sorted(modules), r=r, gram_schmidt=gram_schmidt,
                           init="symmetric" if symmetric else "random",
                           modules_to_save=list(hf.get("modules_to_save") or []))
        config.validate()
    except (TypeError, ValueError, ConfigError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    return config


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the HRA in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    per_module = {m: found[KEY] for m, found in module_tensors(tensors, (KEY,), source, "HRA").items()}
    config = config_from_hf(hf, list(per_module))
    modules = linear_modules(model, per_module, source, "HRA")
    config.modules_to_save = present_modules_to_save(config.modules_to_save, modules)
    try:
        core.attach(model, config, name=name)
    except ConfigError as error:
        raise AdapterFormatError(f"{source}: {error}") from None
    for module_name, layer in core.adapter_layers(model, name):
        value, adapter = per_module[module_name], layer.adapters[name]
        if tuple(value.shape) != tuple(adapter.hra_u.shape):
            raise AdapterFormatError(f"{source}: '{module_name}'.hra_u is {tuple(value.shape)}, but r={config.r} and the "
                                     f"layer's {adapter.in_features} inputs imply {tuple(adapter.hra_u.shape)}; the "
                                     "config and weights do not belong together (or the base is another model)")
        adapter.load_state_dict({KEY: value})
