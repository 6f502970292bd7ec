"""Hugging Face PEFT's OSF format (``peft_type: OSF``), read and written exactly.

``adapter_config.json`` is an ``OSFConfig`` as PEFT writes it: ``effective_rank`` (integer,
fraction in (0, 1], or null for half of a layer's smaller side), ``rank_pattern`` (regexes searched
in the module name), ``init_weights``, ``target_modules``, ``modules_to_save`` and
``target_svd_config`` (which PEFT ignores, and so does this reader). ``adapter_model.safetensors``
holds each layer's trained factors, ``base_model.model.<module path>.osf_svd_params.U_low``
(out x r), ``.S_low`` (r) and ``.V_low`` (r x in), r = min(out, in) - effective_rank. The frozen
factors are not saved: both libraries recompute them from the base weight's SVD, so a file only
fits the base it was trained on.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError
from ..methods.osf import OSFConfig
from .hf_common import PREFIX, linear_modules, module_tensors, present_modules_to_save, target_names

PEFT_TYPES = ("OSF",)
GROUP = "osf_svd_params"
KEYS = ("U_low", "S_low", "V_low")


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "osf"


def to_hf(model: nn.Module, name: str, config: OSFConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes an OSF adapter. The ranks go
    as configured: peftlab resolves ``effective_rank`` and ``rank_pattern`` per layer as PEFT does."""
    state = require_state(model)
    tensors, wrapped = {}, []
    for module_name, layer in core.adapter_layers(model, name):
        adapter = layer.adapters[name]
        for key in KEYS:
            tensors[f"{PREFIX}{module_name}.{GROUP}.{key}"] = getattr(adapter, key).detach()
        wrapped.append(module_name)
    hf = {
        "peft_type": "OSF",
        "base_model_name_or_path": state.base_name,
        "effective_rank": config.effective_rank,
        "rank_pattern": dict(config.rank_pattern) or None,
        "init_weights": config.init == "svd",
        "target_modules": target_names(wrapped, dict(named_base_modules(model))),
        "modules_to_save": list(config.modules_to_save) or None,
        "target_svd_config": None,
        "auto_mapping": None,
    }
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def split_modules(tensors: dict, source) -> dict:
    """``{module path: {U_low, S_low, V_low}}`` from PEFT's ``<module>.osf_svd_params.<factor>`` keys."""
    per_module = {}
    for group, found in module_tensors(tensors, KEYS, source, "OSF").items():
        module_name, _, last = group.rpartition(".")
        if last != GROUP:
            raise AdapterFormatError(f"{source}: OSF tensors of '{group}' should sit under '{GROUP}' "
                                     f"(e.g. '{PREFIX}{group}.{GROUP}.U_low')")
        missing = [k for k in KEYS if k not in found]
        if missing:
            raise AdapterFormatError(f"{source}: '{module_name}' lacks {', '.join(missing)}; an OSF layer needs "
                                     f"{', '.join(KEYS)}")
        per_module[module_name] = found
    return per_module


def config_from_hf(hf: dict, modules: list) -> OSFConfig:
    try:
        config = OSFConfig(targets=sorted(modules), effective_rank=hf.get("effective_rank"),
                           rank_pattern=dict(hf.get("rank_pattern") or {}),
                           init="svd" if hf.get("init_weights", True) is not False else "random",
                           modules_to_save=list(hf.get("modules_to_save") or []))
        config.validate()
    except (TypeError, ValueError, ConfigError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    return config


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the OSF adapter in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    per_module = split_modules(tensors, source)
    config = config_from_hf(hf, list(per_module))
    modules = linear_modules(model, per_module, source, "OSF")
    config.modules_to_save = present_modules_to_save(config.modules_to_save, modules)
    core.attach(model, config, name=name)
    with torch.no_grad():
        for module_name, layer in core.adapter_layers(model, name):
            adapter = layer.adapters[name]
            for key in KEYS:
                value, mine = per_module[module_name][key], getattr(adapter, key)
                if tuple(value.shape) != tuple(mine.shape):
                    raise AdapterFormatError(f"{source}: '{module_name}' has {key} {tuple(value.shape)}, but the config "
                                             f"(effective_rank, rank_pattern) implies {tuple(mine.shape)}; the config and "
                                             "weights do not belong together")
                mine.copy_(value)
