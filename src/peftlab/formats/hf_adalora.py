"""Hugging Face PEFT's AdaLoRA format (``peft_type: ADALORA``), read and written exactly.

``adapter_config.json`` is an ``AdaLoraConfig`` as PEFT writes it: ``init_r``, ``target_r``,
``lora_alpha``, the schedule (``tinit``, ``tfinal``, ``deltaT``, ``beta1``, ``beta2``,
``total_step``), ``orth_reg_weight`` and ``rank_pattern``: ``{"<module path>.lora_E": [kept?
per initial triplet]}``, or null while nothing is pruned. ``adapter_model.safetensors`` holds
per module only the kept triplets: ``base_model.model.<module path>.lora_A`` (kept x in),
``lora_E`` (kept x 1) and ``lora_B`` (out x kept). PEFT recreates every module at ``init_r``
and scales by ``lora_alpha / init_r`` whatever was pruned, as peftlab does; its ``ranknum``
is not saved (it is ``init_r``) but is read when a file has it.

``total_step`` is a training setting (peftlab takes the run's length from the trainer), but PEFT
refuses a config without one, so the smallest value its checks accept is written. PEFT's
``orth_reg_weight`` weighs the mean Frobenius norm and peftlab's the mean squared norm (the
paper's); the number is carried over as is. ``io.py`` does the files and the base fingerprint.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, IncompatibleBaseError
from ..methods.adalora import AdaLoraConfig
from ..methods.lora import base_weight
from .hf_common import PREFIX, present_modules_to_save, target_names

PEFT_TYPES = ("ADALORA",)
SUFFIXES = ("lora_A", "lora_E", "lora_B", "ranknum")


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "adalora"


def to_hf(model: nn.Module, name: str, config: AdaLoraConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes an AdaLoRA."""
    state = require_state(model)
    tensors, pattern, modules = {}, {}, {}
    for module_name, layer in core.adapter_layers(model, name):
        adapter = layer.adapters[name]
        for key, value in adapter.kept_triplets().items():
            tensors[f"{PREFIX}{module_name}.{key}"] = value
        pattern[f"{module_name}.lora_E"] = adapter.rank_mask.tolist()
        modules[module_name] = layer.base_layer
    pruned = not all(all(kept) for kept in pattern.values())
    hf = {
        "peft_type": "ADALORA",
        "base_model_name_or_path": state.base_name,
        "init_r": config.r,
        "target_r": config.target_r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "tinit": config.init_warmup,
        "tfinal": config.final_warmup,
        "deltaT": config.delta_t,
        "beta1": config.beta1,
        "beta2": config.beta2,
        "orth_reg_weight": config.orth_reg_weight,
        "total_step": config.init_warmup + config.final_warmup + 1,
        "rank_pattern": pattern if pruned else None,
        "target_modules": target_names(list(modules), dict(named_base_modules(model))),
        "fan_in_fan_out": any(type(m).__name__ == "Conv1D" for m in modules.values()),
        "modules_to_save": list(config.modules_to_save) or None,
        "bias": "none",
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
    }
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def config_from_hf(hf: dict, modules: list) -> AdaLoraConfig:
    try:
        init_r = int(hf.get("init_r", 12))
        config = AdaLoraConfig(
            targets=sorted(modules),
            r=init_r,
            target_r=min(int(hf.get("target_r", 8)), init_r),
            alpha=hf.get("lora_alpha", 8),
            dropout=float(hf.get("lora_dropout", 0.0)),
            init_warmup=int(hf.get("tinit", 0)),
            final_warmup=int(hf.get("tfinal", 0)),
            delta_t=int(hf.get("deltaT", 1)),
            beta1=float(hf.get("beta1", 0.85)),
            beta2=float(hf.get("beta2", 0.85)),
            orth_reg_weight=float(hf.get("orth_reg_weight", 0.5)),
            modules_to_save=list(hf.get("modules_to_save") or []),
        )
        config.validate()
    except (TypeError, ValueError) as error:  # ConfigError is a ValueError
        raise AdapterFormatError(f"adapter_config.json has invalid AdaLoRA values: {error}") from None
    return config


def split_keys(tensors: dict) -> dict:
    """``{module path: {"lora_A": ..., "lora_E": ..., "lora_B": ..., maybe "ranknum"}}``; other
    tensors (``modules_to_save``) are left to ``io.py``."""
    per_module = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterFormatError(f"unexpected tensor name {key!r}: keys should start with {PREFIX!r}")
        path = key[len(PREFIX):]
        suffix = next((s for s in SUFFIXES if path.endswith("." + s)), None)
        if suffix is not None:
            per_module.setdefault(path[: -len(suffix) - 1], {})[suffix] = value
    return per_module


def masks_from_hf(rank_pattern, modules: list, init_r: int, source) -> dict:
    """``{module path: bool mask of the kept triplets}`` from PEFT's ``rank_pattern`` (all kept when absent)."""
    masks = {m: torch.ones(init_r, dtype=torch.bool) for m in modules}
    for key, kept in (rank_pattern or {}).items():
        module = key.split(".lora_E")[0]
        if module not in masks:
            continue  # a module PEFT listed without tensors: nothing to load
        if not (isinstance(kept, list) and len(kept) == init_r and all(isinstance(k, bool) for k in kept)):
            raise AdapterFormatError(f"{source}: rank_pattern for '{module}' should be {init_r} true/false values "
                                     f"(one per initial triplet), got {kept!r}")
        masks[module] = torch.tensor(kept, dtype=torch.bool)
    return masks


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the AdaLoRA in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    per_module = split_keys(tensors)
    if not per_module:
        raise AdapterFormatError(f"{source}: the weights file holds no AdaLoRA tensors (lora_A, lora_E, lora_B)")
    config = config_from_hf(hf, list(per_module))
    masks = masks_from_hf(hf.get("rank_pattern"), list(per_module), config.r, source)
    _check_shapes(model, per_module, masks, source)
    base_names = [n for n, _ in named_base_modules(model)]
    config.modules_to_save = present_modules_to_save(config.modules_to_save, base_names)
    core.attach(model, config, name=name)
    for module_name, layer in core.adapter_layers(model, name):
        layer.adapters[name].load_triplets(masks[module_name], per_module[module_name])


def _check_shapes(model, per_module: dict, masks: dict, source) -> None:
    modules = dict(named_base_modules(model))
    missing = [m for m in per_module if m not in modules]
    if missing:
        raise IncompatibleBaseError(f"{source} adapts modules this model does not have ({', '.join(missing[:3])}"
                                    f"{' ...' if len(missing) > 3 else ''}); it was saved for another base model")
    for module_name, local in per_module.items():
        if not all(k in local for k in ("lora_A", "lora_E", "lora_B")):
            raise AdapterFormatError(f"{source}: '{module_name}' has an incomplete set of tensors {sorted(local)}")
        A, E, B = local["lora_A"], local["lora_E"], local["lora_B"]
        kept = int(masks[module_name].sum())
        if A.dim() != 2 or B.dim() != 2 or tuple(E.shape) != (kept, 1) or A.shape[0] != kept or B.shape[1] != kept:
            raise AdapterFormatError(f"{source}: '{module_name}' has lora_A {tuple(A.shape)}, lora_E {tuple(E.shape)}, "
                                     f"lora_B {tuple(B.shape)}, but its rank_pattern keeps {kept} triplets; "
                                     "the config and weights do not belong together")
        module = modules[module_name]
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2:
            raise IncompatibleBaseError(f"{source}: '{module_name}' is a {type(module).__name__}, not a linear layer")
        want = tuple(base_weight(module).shape)
        if (B.shape[0], A.shape[1]) != want:
            raise IncompatibleBaseError(f"{source} was saved for a base whose '{module_name}' is {B.shape[0]}x{A.shape[1]}, "
                                        f"but this model's is {want[0]}x{want[1]}: wrong base model")
