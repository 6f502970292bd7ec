"""Hugging Face PEFT's LayerNorm-tuning format (``peft_type: LN_TUNING``), read and written exactly.

PEFT trains a copy of each targeted module and saves the copy's parameters themselves:
``base_model.model.<module path>.ln_tuning_layers.<parameter>`` (``weight``, and ``bias`` where
the norm has one). ``adapter_config.json`` holds ``target_modules``, ``exclude_modules`` and
``modules_to_save``. peftlab keeps a delta per parameter instead (``methods/select.py``), so
saving writes ``base + delta`` and loading takes ``saved - base``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, IncompatibleBaseError
from ..methods.ln_tuning import LnTuningConfig
from .hf_common import PREFIX, target_names

PEFT_TYPES = ("LN_TUNING",)
KEY = "ln_tuning_layers"


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "ln_tuning"


def to_hf(model: nn.Module, name: str, config: LnTuningConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes LN tuning."""
    state = require_state(model)
    tensors, wrapped = {}, []
    for module_name, layer in core.adapter_layers(model, name):
        for pname, value in layer.adapters[name].adapted(layer.base_layer).items():
            tensors[f"{PREFIX}{module_name}.{KEY}.{pname}"] = value.detach()
        wrapped.append(module_name)
    hf = {
        "peft_type": "LN_TUNING",
        "base_model_name_or_path": state.base_name,
        "target_modules": target_names(wrapped, dict(named_base_modules(model))),
        "exclude_modules": None,
        "modules_to_save": list(config.modules_to_save) or None,
        "auto_mapping": None,
    }
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def split_keys(tensors: dict, source) -> dict:
    """``{module path: {parameter name: tensor}}`` for the LN-tuning tensors."""
    per_module = {}
    marker = f".{KEY}."
    for key, value in tensors.items():
        if not key.startswith(PREFIX) or marker not in key:
            continue
        module_name, pname = key[len(PREFIX):].split(marker, 1)
        if "." in pname:
            raise AdapterFormatError(f"{source}: '{key}' belongs to a submodule of '{module_name}'; peftlab tunes modules "
                                     "with parameters of their own (norms, linear layers), not whole containers")
        per_module.setdefault(module_name, {})[pname] = value
    return per_module


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the LN tuning in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    per_module = split_keys(tensors, source)
    if not per_module:
        raise AdapterFormatError(f"{source}: the weights file holds no LN-tuning tensors (keys with '.{KEY}.')")
    _check_shapes(model, per_module, source)
    base_names = [n for n, _ in named_base_modules(model)]
    # PEFT lists every head name the task might use (["classifier", "score"]); keep those this model has
    modules_to_save = [m for m in dict.fromkeys(hf.get("modules_to_save") or [])
                       if any(n == m or n.endswith("." + m) for n in base_names)]
    config = LnTuningConfig(targets=sorted(per_module), modules_to_save=modules_to_save)
    config.validate()
    core.attach(model, config, name=name)
    with torch.no_grad():
        for module_name, layer in core.adapter_layers(model, name):
            for pname, value in per_module[module_name].items():
                layer.adapters[name].deltas[pname].copy_(value - getattr(layer.base_layer, pname))


def _check_shapes(model: nn.Module, per_module: dict, source) -> None:
    modules = dict(named_base_modules(model))
    missing = [m for m in per_module if m not in modules]
    if missing:
        raise IncompatibleBaseError(f"{source} adapts modules this model does not have ({', '.join(missing[:3])}"
                                    f"{' ...' if len(missing) > 3 else ''}); it was saved for another base model")
    for module_name, saved in per_module.items():
        own = dict(modules[module_name].named_parameters(recurse=False))
        unknown = sorted(set(saved) - set(own))
        if unknown:
            raise AdapterFormatError(f"{source}: '{module_name}' has no parameter {unknown[0]!r} "
                                     f"(it has {sorted(own)}); the file belongs to another model")
        for pname, value in saved.items():
            if tuple(value.shape) != tuple(own[pname].shape):
                raise IncompatibleBaseError(f"{source}: saved '{module_name}.{pname}' is {tuple(value.shape)}, but this "
                                            f"model's is {tuple(own[pname].shape)}: wrong base model")
