"""Hugging Face PEFT's RoAd format (``peft_type: ROAD``), read and written exactly.

``adapter_config.json`` is a ``RoadConfig`` as PEFT writes it (``variant``, ``group_size``,
``init_weights``, ``target_modules``). ``adapter_model.safetensors`` holds each layer's
``base_model.model.<module path>.road_theta`` and ``.road_alpha``, both (out / 2) for road_1, (out)
for road_2 and (2 out) for road_4, in PEFT's layout (the same as peftlab's). PEFT's file has one
``group_size`` for every layer; an adapter whose layers use different automatic sizes cannot be
written in it and is saved in peftlab's own format instead, with a warning saying how to get a
PEFT file. Linear layers only.
"""
from __future__ import annotations

import warnings

from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError
from ..methods.road import VARIANTS, RoadConfig, parameter_size
from . import native
from .hf_common import PREFIX, linear_modules, module_tensors, present_modules_to_save, target_names

PEFT_TYPES = ("ROAD",)
KEYS = ("road_theta", "road_alpha")


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "road"


def to_hf(model: nn.Module, name: str, config: RoadConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes a RoAd."""
    state = require_state(model)
    tensors, sizes = {}, {}
    for module_name, layer in core.adapter_layers(model, name):
        adapter = layer.adapters[name]
        for key in KEYS:
            tensors[f"{PREFIX}{module_name}.{key}"] = getattr(adapter, key).detach()
        sizes[module_name] = adapter.group_size
    if len(set(sizes.values())) > 1:
        by_size = {}
        for module_name, size in sizes.items():
            by_size.setdefault(size, module_name)
        warnings.warn(f"road: the layers use different automatic group sizes ({', '.join(f'{s} in {m}' for s, m in by_size.items())}), "
                      "which HF PEFT's file (one group_size) cannot hold; saved in peftlab's own format. Attach with a "
                      "group_size dividing every width (e.g. road[group_size=" f"{min(by_size)}]) for a PEFT file", stacklevel=4)
        return native.to_native(model, name, [config])
    hf = {
        "peft_type": "ROAD",
        "base_model_name_or_path": state.base_name,
        "variant": config.variant,
        "group_size": next(iter(sizes.values()), config.group_size or 64),
        "init_weights": config.init == "identity",
        "target_modules": target_names(list(sizes), dict(named_base_modules(model))),
        "modules_to_save": list(config.modules_to_save) or None,
        "auto_mapping": None,
    }
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def config_from_hf(hf: dict, modules: list) -> RoadConfig:
    try:
        config = RoadConfig(targets=sorted(modules), variant=hf.get("variant", "road_1"),
                            group_size=hf.get("group_size", 64),
                            init="identity" if hf.get("init_weights", True) else "random",
                            modules_to_save=list(hf.get("modules_to_save") or []))
        config.validate()
        if not config.group_size:
            raise ConfigError("road: group_size must be a positive even integer")
    except (TypeError, ValueError, ConfigError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    return config


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the RoAd in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    per_module = module_tensors(tensors, KEYS, source, "RoAd")
    incomplete = [m for m, found in per_module.items() if set(found) != set(KEYS)]
    if incomplete:
        raise AdapterFormatError(f"{source}: '{incomplete[0]}' lacks {', '.join(sorted(set(KEYS) - set(per_module[incomplete[0]])))}; "
                                 "every RoAd layer has road_theta and road_alpha")
    config = config_from_hf(hf, list(per_module))
    modules = linear_modules(model, per_module, source, "RoAd")
    for module_name in per_module:
        out_features = modules[module_name].out_features
        if out_features % config.group_size:
            raise AdapterFormatError(f"{source}: group_size={config.group_size} does not divide the {out_features} outputs "
                                     f"of '{module_name}'; the file was written for another base model")
    config.modules_to_save = present_modules_to_save(config.modules_to_save, modules)
    core.attach(model, config, name=name)
    for module_name, layer in core.adapter_layers(model, name):
        found, adapter = per_module[module_name], layer.adapters[name]
        expected = (parameter_size(adapter.variant, adapter.out_features),)
        for key in KEYS:
            if tuple(found[key].shape) != expected:
                raise AdapterFormatError(f"{source}: '{module_name}.{key}' is {tuple(found[key].shape)}, but variant "
                                         f"{config.variant} on {adapter.out_features} outputs implies {expected}; "
                                         f"the config and weights do not belong together (variants: {', '.join(VARIANTS)})")
        adapter.load_state_dict(found)
