"""Hugging Face PEFT's Uni-LoRA format (``peft_type: UNILORA``), read and written exactly.

``adapter_config.json`` is a ``UniLoraConfig`` as PEFT writes it (``r``, ``theta_d_length``,
``proj_seed``, ``unilora_dropout``, ``init_theta_d_bound``, ``save_indices``, ``target_modules``,
``bias: "none"``, ``fan_in_fan_out: false``). ``adapter_model.safetensors`` holds the one trained
vector as ``base_model.unilora_theta_d`` (theta_d_length) and, only with ``save_indices``, each
layer's ``base_model.model.<module path>.unilora_indices_A`` (r x in, int64), ``unilora_indices_B``
(out x r) and their float ``unilora_scales_A`` / ``unilora_scales_B``. Without them (PEFT's
default) the file names no module: the adapted layers are found from ``target_modules`` (and
``layers_to_transform``) as PEFT finds them, and the indices are regenerated from ``proj_seed``
(``methods/unilora.py`` reproduces PEFT's assignment). Linear layers only; a file that trains
biases is refused clearly.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError, IncompatibleBaseError, TargetError
from ..methods.unilora import UniLoRAConfig
from .hf_common import (PREFIX, check_layer_shapes, linear_modules, module_tensors, present_modules_to_save,
                        refuse_base_training, target_names)

PEFT_TYPES = ("UNILORA",)
THETA = "base_model.unilora_theta_d"
KEYS = ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B")


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "unilora"


def to_hf(model: nn.Module, name: str, config: UniLoRAConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes a Uni-LoRA."""
    state = require_state(model)
    tensors, modules, theta = {}, [], None
    for module_name, layer in core.adapter_layers(model, name):
        adapter = layer.adapters[name]
        if config.save_indices:
            for key in KEYS:
                tensors[f"{PREFIX}{module_name}.{key}"] = getattr(adapter, key).detach()
        modules.append(module_name)
        theta = adapter.theta()
    if theta is not None:
        tensors[THETA] = theta.detach()
    hf = {
        "peft_type": "UNILORA",
        "base_model_name_or_path": state.base_name,
        "r": config.r,
        "proj_seed": config.proj_seed,
        "theta_d_length": config.theta_d_length,
        # suffixes only where they select exactly these modules: the set (and its order) fixes the assignment
        "target_modules": target_names(modules, dict(named_base_modules(model))),
        "unilora_dropout": config.dropout,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": list(config.modules_to_save) or None,
        "init_theta_d_bound": config.init_theta_d_bound,
        "init_weights": True,
        "save_indices": config.save_indices,
        "layers_to_transform": None,
        "layers_pattern": None,
        "auto_mapping": None,
    }
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def config_from_hf(hf: dict, targets) -> UniLoRAConfig:
    refuse_base_training(hf, "Uni-LoRA")
    layers = hf.get("layers_to_transform")
    if layers is not None and hf.get("layers_pattern"):
        raise AdapterFormatError("adapter_config.json sets layers_pattern; peftlab finds transformer blocks by their "
                                 "numbered names and reads Uni-LoRA files without a layers_pattern only")
    try:
        config = UniLoRAConfig(targets=targets, layers=layers, r=hf.get("r", 4),
                               theta_d_length=hf.get("theta_d_length", 256), proj_seed=hf.get("proj_seed", 42),
                               dropout=hf.get("unilora_dropout", 0.0),
                               init_theta_d_bound=hf.get("init_theta_d_bound", 0.02),
                               save_indices=hf.get("save_indices", False),
                               modules_to_save=list(hf.get("modules_to_save") or []))
        config.validate()
    except (TypeError, ValueError, ConfigError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    return config


def _targets(hf: dict, source):
    """PEFT's ``target_modules`` in peftlab's terms: a list of suffixes, 'all-linear', or a regex."""
    targets = hf.get("target_modules")
    if isinstance(targets, str):
        return targets if targets == "all-linear" else "re:" + targets
    if isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) for t in targets):
        return sorted(targets)
    raise AdapterFormatError(f"{source}: adapter_config.json has target_modules={targets!r}; a file without saved indices "
                             "needs them to know which layers the vector is spread over")


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the Uni-LoRA in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    if THETA not in tensors:
        raise AdapterFormatError(f"{source}: the weights file lacks the trained vector {THETA}; the file is incomplete")
    indexed = any(key.rpartition(".")[2] in KEYS for key in tensors)  # saved indices; else only theta_d (and heads)
    saved = module_tensors(tensors, KEYS, source, "Uni-LoRA", skip=(THETA,)) if indexed else {}
    if saved:
        linear_modules(model, saved, source, "Uni-LoRA")
    config = config_from_hf(hf, sorted(saved) if saved else _targets(hf, source))
    if config.save_indices and not saved:
        raise AdapterFormatError(f"{source}: adapter_config.json says save_indices=true, but the weights file holds no "
                                 f"{', '.join(KEYS)}; the file is incomplete")
    config.modules_to_save = present_modules_to_save(config.modules_to_save, [n for n, _ in named_base_modules(model)])
    try:
        core.attach(model, config, name=name)
    except TargetError as error:
        raise IncompatibleBaseError(f"{source} does not fit this model: {error}") from None
    theta = None
    for module_name, layer in core.adapter_layers(model, name):
        adapter = layer.adapters[name]
        theta = adapter.theta()
        if saved:
            _load_indices(adapter, saved.get(module_name, {}), module_name, config, source)
    if tuple(theta.shape) != tuple(tensors[THETA].shape):
        raise AdapterFormatError(f"{source}: {THETA} is {tuple(tensors[THETA].shape)}, but theta_d_length implies "
                                 f"{tuple(theta.shape)}; the config and weights do not belong together")
    with torch.no_grad():
        theta.copy_(tensors[THETA])


def _load_indices(adapter, local: dict, module_name: str, config: UniLoRAConfig, source) -> None:
    check_layer_shapes(adapter, local, KEYS, module_name, source)
    for key in ("unilora_indices_A", "unilora_indices_B"):
        index = local[key]
        if index.is_floating_point() or int(index.min()) < 0 or int(index.max()) >= config.theta_d_length:
            raise AdapterFormatError(f"{source}: {key} of '{module_name}' must hold integers in 0..{config.theta_d_length - 1}")
    with torch.no_grad():
        for key in KEYS:
            getattr(adapter, key).copy_(local[key])
