"""Hugging Face PEFT's SHiRA format (``peft_type: SHIRA``), read and written exactly.

``adapter_config.json`` is a ``ShiraConfig`` as PEFT writes it (``r``, ``mask_type: "random"``,
``random_seed``, ``init_weights``, ``fan_in_fan_out: false``). ``adapter_model.safetensors`` holds,
per layer, the trained values ``base_model.model.<module path>.shira_weight`` (k = r * (in + out))
and their positions ``base_model.model.<module path>.shira_indices`` (2 x k int32: rows, then
columns). The positions are read from the file whatever ``mask_type`` or ``random_seed`` say, so
a file made with a custom PEFT mask loads too. Linear layers only.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError, IncompatibleBaseError
from ..methods.shira import ShiraConfig
from .hf_common import (PREFIX, linear_modules, module_tensors,
                        present_modules_to_save, refuse_base_training, target_names)

PEFT_TYPES = ("SHIRA",)
VALUES, INDICES = "shira_weight", "shira_indices"


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "shira"


def to_hf(model: nn.Module, name: str, config: ShiraConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes a SHiRA."""
    state = require_state(model)
    tensors, modules = {}, []
    for module_name, layer in core.adapter_layers(model, name):
        adapter = layer.adapters[name]
        tensors[f"{PREFIX}{module_name}.{VALUES}"] = adapter.shira_weight.detach()
        tensors[f"{PREFIX}{module_name}.{INDICES}"] = adapter.shira_indices.to(torch.int32)
        modules.append(module_name)
    hf = {
        "peft_type": "SHIRA",
        "base_model_name_or_path": state.base_name,
        "r": config.r,
        "mask_type": "random",
        "random_seed": config.random_seed,
        "init_weights": config.init == "zeros",
        "target_modules": target_names(modules, dict(named_base_modules(model))),
        "fan_in_fan_out": False,
        "modules_to_save": list(config.modules_to_save) or None,
        "auto_mapping": None,
    }
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def config_from_hf(hf: dict, modules: list) -> ShiraConfig:
    refuse_base_training(hf, "SHiRA")
    try:
        config = ShiraConfig(targets=sorted(modules), r=hf.get("r", 32), random_seed=hf.get("random_seed"),
                             init="zeros" if hf.get("init_weights", True) else "gaussian",
                             modules_to_save=list(hf.get("modules_to_save") or []))
        config.validate()
    except (TypeError, ValueError, ConfigError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    return config


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the SHiRA in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    per_module = module_tensors(tensors, (VALUES, INDICES), source, "SHiRA")
    for module_name, pair in per_module.items():
        if set(pair) != {VALUES, INDICES}:
            raise AdapterFormatError(f"{source}: '{module_name}' has {sorted(pair)} but a SHiRA layer needs both "
                                     f"{VALUES} and {INDICES}")
    config = config_from_hf(hf, list(per_module))
    modules = linear_modules(model, per_module, source, "SHiRA")
    config.modules_to_save = present_modules_to_save(config.modules_to_save, modules)
    try:
        core.attach(model, config, name=name)
    except ConfigError as error:  # r * (in + out) larger than a layer: not the base the file was made for
        raise IncompatibleBaseError(f"{source}: {error}") from None
    for module_name, layer in core.adapter_layers(model, name):
        pair, adapter = per_module[module_name], layer.adapters[name]
        values, indices = pair[VALUES], pair[INDICES]
        k = adapter.shira_weight.numel()
        if tuple(values.shape) != (k,) or tuple(indices.shape) != (2, k):
            raise AdapterFormatError(f"{source}: '{module_name}' has {tuple(values.shape)} values and {tuple(indices.shape)} "
                                     f"positions, but r={config.r} implies ({k},) and (2, {k}) for this layer; "
                                     "the config and weights do not belong together")
        if indices.dtype.is_floating_point:  # PEFT on Windows saves them as float32
            if not bool((indices == indices.round()).all()):
                raise AdapterFormatError(f"{source}: '{module_name}.{INDICES}' holds non-integer positions")
            indices = indices.round()
        indices = indices.long()
        rows, cols = indices[0], indices[1]
        if indices.numel() and (int(indices.min()) < 0 or int(rows.max()) >= adapter.out_features
                                or int(cols.max()) >= adapter.in_features):
            raise IncompatibleBaseError(f"{source}: '{module_name}.{INDICES}' points outside a {adapter.out_features} x "
                                        f"{adapter.in_features} weight; wrong base model or corrupt file")
        flat = rows * adapter.in_features + cols
        if flat.unique().numel() != flat.numel():
            raise AdapterFormatError(f"{source}: '{module_name}.{INDICES}' names some positions twice (a corrupt file?)")
        if not values.dtype.is_floating_point:
            raise AdapterFormatError(f"{source}: '{module_name}.{VALUES}' is {values.dtype}, expected floating-point values")
        adapter.load_indices(indices)
        adapter.shira_weight.data.copy_(values.to(adapter.shira_weight))
