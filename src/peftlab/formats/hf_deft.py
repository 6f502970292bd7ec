"""Hugging Face PEFT's DeFT format (``peft_type: DEFT``), read and written exactly.

``adapter_config.json`` is a ``DeftConfig`` as PEFT writes it (``r``, ``decomposition_method``,
``alpha``, ``para``, ``deft_dropout``, ``init_weights``, ``init_scale``, ``bias: "none"``,
``fan_in_fan_out: false``). ``adapter_model.safetensors`` holds each layer's direction as
``base_model.model.<module path>.deft_P`` (out x r) and, unless ``para``, its injection as
``...deft_R`` (r x in); ``r`` is the layer's, capped at its output width in both libraries.
``init_weights`` and ``init_scale`` only choose where a new adapter starts; they are kept. Linear
layers only; files that train biases or target Conv1D layers are refused clearly.
"""
from __future__ import annotations

from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError
from ..methods.deft import DeftConfig
from .hf_common import (PREFIX, linear_modules, module_tensors,
                        present_modules_to_save, refuse_base_training, target_names)

PEFT_TYPES = ("DEFT",)
KEYS = ("deft_P", "deft_R")


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "deft"


def to_hf(model: nn.Module, name: str, config: DeftConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes a DeFT."""
    state = require_state(model)
    tensors, modules = {}, []
    for module_name, layer in core.adapter_layers(model, name):
        adapter = layer.adapters[name]
        tensors[f"{PREFIX}{module_name}.deft_P"] = adapter.deft_P.detach()
        if adapter.deft_R is not None:
            tensors[f"{PREFIX}{module_name}.deft_R"] = adapter.deft_R.detach()
        modules.append(module_name)
    hf = {
        "peft_type": "DEFT",
        "base_model_name_or_path": state.base_name,
        "r": config.r,
        "decomposition_method": config.decomposition,
        "alpha": config.alpha,
        "para": config.para,
        "deft_dropout": config.dropout,
        "init_weights": config.init == "identity",
        "init_scale": config.init_scale,
        "target_modules": target_names(modules, dict(named_base_modules(model))),
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": list(config.modules_to_save) or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "auto_mapping": None,
    }
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def config_from_hf(hf: dict, modules: list) -> DeftConfig:
    refuse_base_training(hf, "DeFT")
    try:
        config = DeftConfig(targets=sorted(modules), r=hf.get("r", 8),
                            decomposition=hf.get("decomposition_method", "relu"),
                            alpha=hf.get("alpha") or None,  # PEFT reads 0 as unset
                            para=hf.get("para", False), dropout=hf.get("deft_dropout", 0.0),
                            init="identity" if hf.get("init_weights", True) else "random",
                            init_scale=hf.get("init_scale", 1.0),
                            modules_to_save=list(hf.get("modules_to_save") or []))
        config.validate()
    except (TypeError, ValueError, ConfigError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    return config


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the DeFT in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    per_module = module_tensors(tensors, KEYS, source, "DeFT")
    config = config_from_hf(hf, list(per_module))
    modules = linear_modules(model, per_module, source, "DeFT")
    config.modules_to_save = present_modules_to_save(config.modules_to_save, modules)
    core.attach(model, config, name=name)
    for module_name, layer in core.adapter_layers(model, name):
        found, adapter = per_module[module_name], layer.adapters[name]
        expected = {"deft_P": adapter.deft_P, **({} if adapter.deft_R is None else {"deft_R": adapter.deft_R})}
        if set(found) != set(expected):
            raise AdapterFormatError(f"{source}: '{module_name}' has {sorted(found)}, but para={config.para} needs "
                                     f"{sorted(expected)}; the config and weights do not belong together")
        for key, param in expected.items():
            if tuple(found[key].shape) != tuple(param.shape):
                raise AdapterFormatError(f"{source}: '{module_name}'.{key} is {tuple(found[key].shape)}, but r={config.r} "
                                         f"and the layer's shape imply {tuple(param.shape)}; the config and weights do "
                                         "not belong together (or the base is another model)")
        adapter.load_state_dict(found)
