"""Hugging Face PEFT's Poly format (``peft_type: POLY``), read and written exactly.

``adapter_config.json`` is a ``PolyConfig`` as PEFT writes it (``r``, ``n_tasks``, ``n_skills``,
``n_splits``, ``poly_type: "poly"``, ``init_weights``). ``adapter_model.safetensors`` holds, per
layer, ``base_model.model.<module path>.poly_lora_A`` (n_splits, n_skills, in / n_splits, r),
``...poly_lora_B`` (n_splits, n_skills, r, out / n_splits) and the layer's routing matrix
``...poly_router.module_logits`` (n_tasks, n_splits * n_skills). PEFT's Poly model takes the rows'
task ids as ``model(..., task_ids=...)``; peftlab as ``with peftlab.task_ids(model, task_ids)``.
"""
from __future__ import annotations

from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError
from ..methods.poly import PolyConfig
from .hf_common import PREFIX, linear_modules, present_modules_to_save, target_names

PEFT_TYPES = ("POLY",)
KEYS = ("poly_lora_A", "poly_lora_B", "poly_router.module_logits")


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "poly"


def to_hf(model: nn.Module, name: str, config: PolyConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes a Poly."""
    state = require_state(model)
    tensors, modules = {}, []
    for module_name, layer in core.adapter_layers(model, name):
        modules.append(module_name)
        for key, value in layer.adapters[name].state_dict().items():
            tensors[f"{PREFIX}{module_name}.{key}"] = value.detach()
    hf = {
        "peft_type": "POLY",
        "base_model_name_or_path": state.base_name,
        "r": config.r,
        "n_tasks": config.n_tasks,
        "n_skills": config.n_skills,
        "n_splits": config.n_splits,
        "poly_type": config.poly_type,
        "init_weights": config.init == "zeros",
        "target_modules": target_names(modules, dict(named_base_modules(model))),
        "exclude_modules": None,
        "modules_to_save": list(config.modules_to_save) or None,
        "auto_mapping": None,
    }
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def config_from_hf(hf: dict, modules: list) -> PolyConfig:
    try:
        config = PolyConfig(targets=sorted(modules), r=hf.get("r", 8), n_tasks=hf.get("n_tasks", 1),
                            n_skills=hf.get("n_skills", 4), n_splits=hf.get("n_splits", 1),
                            poly_type=hf.get("poly_type", "poly"), init="zeros" if hf.get("init_weights", True) else "kaiming",
                            modules_to_save=list(hf.get("modules_to_save") or []))
        config.validate()
    except (TypeError, ValueError, ConfigError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    return config


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the Poly in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    per_module = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterFormatError(f"{source}: unexpected tensor name {key!r}: keys should start with {PREFIX!r}")
        path = key[len(PREFIX):]
        local = next((k for k in KEYS if path.endswith("." + k)), None)
        if local is not None:
            per_module.setdefault(path[: -len(local) - 1], {})[local] = value
    if not per_module:
        raise AdapterFormatError(f"{source}: the weights file holds no Poly tensors (keys ending in {', '.join(KEYS)})")
    config = config_from_hf(hf, list(per_module))
    modules = linear_modules(model, per_module, source, "Poly")
    config.modules_to_save = present_modules_to_save(config.modules_to_save, modules)
    core.attach(model, config, name=name)
    for module_name, layer in core.adapter_layers(model, name):
        adapter, local = layer.adapters[name], per_module[module_name]
        expected = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in local.items()}
        if expected != found:
            raise AdapterFormatError(f"{source}: tensors for '{module_name}' are {found}, but the config (r, n_tasks, "
                                     f"n_skills, n_splits) implies {expected}; the config and weights do not belong together")
        adapter.load_state_dict(local)
