"""Hugging Face PEFT's TinyLoRA format (``peft_type: TINYLORA``), read and written exactly.

``adapter_config.json`` is a ``TinyLoraConfig`` as PEFT writes it (``r``, ``u``, ``weight_tying``,
``projection_seed``, ``save_projection``, ``init_v_bound``, ``init_weights``, ``tinylora_dropout``,
``bias: "none"``, ``fan_in_fan_out: false``). ``adapter_model.safetensors`` holds, per layer, the
frozen SVD factors ``base_model.model.<module path>.tinylora_A`` (r x in) and ``.tinylora_B``
(out x r), with ``save_projection`` also ``.tinylora_P`` (u x r x r; without it both libraries
draw P again from ``projection_seed`` plus the layer's place among the adapted layers), and each
weight-tying group's trained vector as ``base_model.tinylora_v.<group>`` (u). The file's factors
are used as saved, never recomputed from the base. Linear layers only; a file that trains biases
is refused clearly.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError
from ..methods.tinylora import TinyLoRAConfig, group_owners, groups_for
from .hf_common import (PREFIX, check_layer_shapes, linear_modules, module_tensors, present_modules_to_save,
                        refuse_base_training, target_names)

PEFT_TYPES = ("TINYLORA",)
KEYS = ("tinylora_A", "tinylora_B", "tinylora_P")
V_PREFIX = "base_model.tinylora_v."


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "tinylora"


def to_hf(model: nn.Module, name: str, config: TinyLoRAConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes a TinyLoRA."""
    state = require_state(model)
    tensors, modules, adapters = {}, [], []
    for module_name, layer in core.adapter_layers(model, name):
        adapter = layer.adapters[name]
        for key in KEYS if config.save_projection else KEYS[:2]:
            tensors[f"{PREFIX}{module_name}.{key}"] = getattr(adapter, key).detach()
        modules.append(module_name)
        adapters.append(adapter)
    for group, owner in enumerate(group_owners(adapters)):
        tensors[f"{V_PREFIX}{group}"] = owner.v().detach()
    hf = {
        "peft_type": "TINYLORA",
        "base_model_name_or_path": state.base_name,
        "r": config.r,
        "u": config.u,
        "weight_tying": config.weight_tying,
        "projection_seed": config.projection_seed,
        "save_projection": config.save_projection,
        "init_v_bound": config.init_v_bound,
        # suffixes only where they select exactly these modules: their order fixes seeds and groups
        "target_modules": target_names(modules, dict(named_base_modules(model))),
        "tinylora_dropout": config.dropout,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": list(config.modules_to_save) or None,
        "init_weights": True if config.init == "zeros" else "uniform",
        "layers_to_transform": None,
        "layers_pattern": None,
        "auto_mapping": None,
    }
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def config_from_hf(hf: dict, modules: list) -> TinyLoRAConfig:
    refuse_base_training(hf, "TinyLoRA")
    try:
        config = TinyLoRAConfig(targets=sorted(modules), r=hf.get("r", 2), u=hf.get("u", 64),
                                weight_tying=hf.get("weight_tying", 0.0), projection_seed=hf.get("projection_seed", 42),
                                save_projection=hf.get("save_projection", True),
                                init="zeros" if hf.get("init_weights", True) is True else "uniform",
                                init_v_bound=hf.get("init_v_bound", 0.02), dropout=hf.get("tinylora_dropout", 0.0),
                                modules_to_save=list(hf.get("modules_to_save") or []))
        config.validate()
    except (TypeError, ValueError, ConfigError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    return config


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the TinyLoRA in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    vectors = {key: value for key, value in tensors.items() if key.startswith(V_PREFIX)}
    per_module = module_tensors(tensors, KEYS, source, "TinyLoRA", skip=tuple(vectors))
    for module_name, local in per_module.items():
        missing = [k for k in KEYS[:2] if k not in local]
        if missing:
            raise AdapterFormatError(f"{source}: '{module_name}' lacks {', '.join(missing)}; the file is incomplete")
    config = config_from_hf(hf, list(per_module))
    with_p = [m for m, local in per_module.items() if "tinylora_P" in local]
    if with_p and len(with_p) != len(per_module):
        raise AdapterFormatError(f"{source}: only some layers carry tinylora_P (e.g. not "
                                 f"'{next(m for m in per_module if m not in with_p)}'); the file is incomplete")
    groups = groups_for(len(per_module), config.weight_tying)
    expected_v = [f"{V_PREFIX}{g}" for g in range(groups)]
    if sorted(vectors) != sorted(expected_v):
        raise AdapterFormatError(f"{source}: the file holds the vectors {sorted(vectors) or 'none'}, but "
                                 f"{len(per_module)} layers at weight_tying={config.weight_tying} share "
                                 f"{groups} ({', '.join(expected_v[:3])}{' ...' if groups > 3 else ''}); "
                                 "the config and weights do not belong together")
    modules = linear_modules(model, per_module, source, "TinyLoRA")
    config.modules_to_save = present_modules_to_save(config.modules_to_save, modules)
    core.attach(model, config, name=name)
    adapters = []
    for module_name, layer in core.adapter_layers(model, name):
        local, adapter = per_module[module_name], layer.adapters[name]
        check_layer_shapes(adapter, local, [k for k in KEYS if k in local], module_name, source, "the config (r, u)")
        with torch.no_grad():
            for key, value in local.items():
                getattr(adapter, key).copy_(value)
        adapters.append(adapter)
    for group, owner in enumerate(group_owners(adapters)):
        v = vectors[f"{V_PREFIX}{group}"]
        if tuple(v.shape) != (config.u,):
            raise AdapterFormatError(f"{source}: {V_PREFIX}{group} is {tuple(v.shape)}, but u={config.u}; the config "
                                     "and weights do not belong together")
        with torch.no_grad():
            owner.v().copy_(v)
