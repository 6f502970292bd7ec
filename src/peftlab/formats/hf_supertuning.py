"""Hugging Face PEFT's Super-Tuning format (``peft_type: SUPERTUNING``), read and written exactly.

``adapter_config.json`` is a ``SupertuningConfig`` as PEFT writes it (``sparsity``, ``select_top``,
``r``, ``lora_alpha``, ``lora_dropout``, ``init_weights``, ``save_precomputed_indices``).
``adapter_model.safetensors`` holds, per layer, the trained entries
``base_model.model.<module path>.supertuning_values`` (k = int(out * in * (1 - sparsity))), with
``save_precomputed_indices`` their flat positions ``.supertuning_indices`` (k, int32; without it
both libraries choose them again from the base weight's magnitudes), and with ``r`` the LoRA pair
``.supertuning_lora_A.weight`` (r x in) and ``.supertuning_lora_B.weight`` (out x r). The
positions are read from the file whatever ``sparsity`` or ``select_top`` say. Linear layers only.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError, IncompatibleBaseError
from ..methods.sparse_delta import read_sparse
from ..methods.supertuning import SupertuningConfig
from .hf_common import PREFIX, linear_modules, module_tensors, present_modules_to_save, target_names

PEFT_TYPES = ("SUPERTUNING",)
VALUES, INDICES = "supertuning_values", "supertuning_indices"
LORA = {"supertuning_lora_A": "supertuning_lora_A.weight", "supertuning_lora_B": "supertuning_lora_B.weight"}


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "supertuning"


def to_hf(model: nn.Module, name: str, config: SupertuningConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes a Super-Tuning adapter."""
    state = require_state(model)
    tensors, modules = {}, []
    for module_name, layer in core.adapter_layers(model, name):
        adapter = layer.adapters[name]
        tensors[f"{PREFIX}{module_name}.{VALUES}"] = adapter.supertuning_values.detach()
        if config.save_indices:
            tensors[f"{PREFIX}{module_name}.{INDICES}"] = adapter.supertuning_indices.to(torch.int32)
        if config.r:
            for attribute, key in LORA.items():
                tensors[f"{PREFIX}{module_name}.{key}"] = getattr(adapter, attribute).detach()
        modules.append(module_name)
    hf = {
        "peft_type": "SUPERTUNING",
        "base_model_name_or_path": state.base_name,
        "target_modules": target_names(modules, dict(named_base_modules(model))),
        "modules_to_save": list(config.modules_to_save) or None,
        "sparsity": config.sparsity,
        "select_top": config.select_top,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.dropout,
        "init_weights": config.init == "zeros",
        "save_precomputed_indices": config.save_indices,
        "auto_mapping": None,
    }
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def config_from_hf(hf: dict, modules: list) -> SupertuningConfig:
    try:
        config = SupertuningConfig(targets=sorted(modules), sparsity=hf.get("sparsity", 0.99),
                                   select_top=hf.get("select_top", True), r=hf.get("r"),
                                   alpha=hf.get("lora_alpha") if hf.get("r") is not None else None,
                                   dropout=hf.get("lora_dropout", 0.0),
                                   init="zeros" if hf.get("init_weights", True) else "random",
                                   save_indices=hf.get("save_precomputed_indices", True),
                                   modules_to_save=list(hf.get("modules_to_save") or []))
        config.validate()
    except (TypeError, ValueError, ConfigError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    return config


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the Super-Tuning adapter in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    grouped = module_tensors(tensors, (VALUES, INDICES, "weight"), source, "Super-Tuning")
    per_module = {}
    for path, local in grouped.items():  # a LoRA factor's module path ends in .supertuning_lora_A/B
        owner, _, tail = path.rpartition(".")
        if "weight" in local and tail in LORA:
            per_module.setdefault(owner, {})[tail] = local["weight"]
        elif "weight" not in local:
            per_module.setdefault(path, {}).update(local)
    if not any(VALUES in local for local in per_module.values()):
        raise AdapterFormatError(f"{source}: the weights file holds no Super-Tuning tensors (keys ending in {VALUES})")
    config = config_from_hf(hf, list(per_module))
    needed = {VALUES} | ({INDICES} if config.save_indices else set()) | (set(LORA) if config.r else set())
    for module_name, local in per_module.items():
        if not needed <= set(local):
            raise AdapterFormatError(f"{source}: '{module_name}' lacks {', '.join(sorted(needed - set(local)))}, which "
                                     f"its config (r={config.r}, save_precomputed_indices={config.save_indices}) needs; "
                                     "the file is incomplete")
    modules = linear_modules(model, per_module, source, "Super-Tuning")
    config.modules_to_save = present_modules_to_save(config.modules_to_save, modules)
    try:
        core.attach(model, config, name=name)
    except ConfigError as error:  # a sparsity that leaves nothing of a layer: not the base the file was made for
        raise IncompatibleBaseError(f"{source}: {error}") from None
    for module_name, layer in core.adapter_layers(model, name):
        local, adapter = per_module[module_name], layer.adapters[name]
        k = adapter.supertuning_values.numel()
        values = local[VALUES]
        if tuple(values.shape) != (k,) or (INDICES in local and tuple(local[INDICES].shape) != (k,)):
            raise AdapterFormatError(f"{source}: '{module_name}' has {tuple(values.shape)} values"
                                     f"{f' and {tuple(local[INDICES].shape)} positions' if INDICES in local else ''}, "
                                     f"but sparsity={config.sparsity} implies ({k},) for this layer; "
                                     "the config and weights do not belong together")
        if not values.dtype.is_floating_point:
            raise AdapterFormatError(f"{source}: '{module_name}.{VALUES}' is {values.dtype}, expected floating-point values")
        with torch.no_grad():
            if INDICES in local:
                indices, _ = read_sparse({"indices": local[INDICES], "values": values}, adapter.weight_shape)
                adapter.supertuning_indices.copy_(indices)
            adapter.supertuning_values.copy_(values)
            for attribute in LORA if config.r else ():
                target = getattr(adapter, attribute)
                if tuple(local[attribute].shape) != tuple(target.shape):
                    raise AdapterFormatError(f"{source}: '{module_name}.{LORA[attribute]}' is "
                                             f"{tuple(local[attribute].shape)}, but r={config.r} implies "
                                             f"{tuple(target.shape)}; the config and weights do not belong together")
                target.copy_(local[attribute])
