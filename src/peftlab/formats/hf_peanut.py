"""Hugging Face PEFT's PEANuT format (``peft_type: PEANUT``), read and written exactly.

``adapter_config.json`` is a ``PeanutConfig`` as PEFT writes it (``r``, ``depth``, ``act_fn``,
``scaling``, ``init_weights``; PEANuT has no ``bias`` or ``fan_in_fan_out`` field).
``adapter_model.safetensors`` holds per layer ``base_model.model.<module path>.peanut_A.weight``
(r x out), ``.peanut_B.weight`` (out x r) and, for ``depth > 0``, ``.peanut_encoders.<i>.weight``
and ``.peanut_decoders.<i>.weight`` (r x r each): the peftlab module's own state dict. A layer's
tensors must be exactly those its config implies (no more encoders than ``depth``, the right
shapes), else the file is refused as a config and weights that do not belong together. The
frozen weight the tweaker reads is the base model's, so it is never saved. Linear layers only.
"""
from __future__ import annotations

import re

from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError
from ..methods.peanut import PeanutConfig
from .hf_common import PREFIX, linear_modules, module_tensors, present_modules_to_save, target_names

PEFT_TYPES = ("PEANUT",)
LOCAL = re.compile(r"\.(peanut_(?:A|B|encoders\.\d+|decoders\.\d+)\.weight)$")


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "peanut"


def to_hf(model: nn.Module, name: str, config: PeanutConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes a PEANuT."""
    state = require_state(model)
    tensors, modules = {}, []
    for module_name, layer in core.adapter_layers(model, name):
        for key, value in layer.adapters[name].state_dict().items():
            tensors[f"{PREFIX}{module_name}.{key}"] = value.detach()
        modules.append(module_name)
    hf = {
        "peft_type": "PEANUT",
        "base_model_name_or_path": state.base_name,
        "r": config.r,
        "depth": config.depth,
        "act_fn": config.act_fn,
        "scaling": config.scaling,
        "init_weights": config.init == "zeros",
        "target_modules": target_names(modules, dict(named_base_modules(model))),
        "exclude_modules": None,
        "modules_to_save": list(config.modules_to_save) or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "auto_mapping": None,
    }
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def config_from_hf(hf: dict, modules: list) -> PeanutConfig:
    try:
        config = PeanutConfig(targets=sorted(modules), r=hf.get("r", 32), depth=hf.get("depth", 0),
                              act_fn=hf.get("act_fn", "relu"), scaling=hf.get("scaling", 1.0),
                              init="zeros" if hf.get("init_weights", True) else "kaiming",
                              modules_to_save=list(hf.get("modules_to_save") or []))
        config.validate()
    except (TypeError, ValueError, ConfigError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    return config



def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the PEANuT in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    per_module = module_tensors(tensors, ("peanut_A.weight", "peanut_B.weight", "peanut_encoders.<i>.weight",
                                          "peanut_decoders.<i>.weight"), source, "PEANuT", local=LOCAL)
    config = config_from_hf(hf, list(per_module))
    modules = linear_modules(model, per_module, source, "PEANuT")
    config.modules_to_save = present_modules_to_save(config.modules_to_save, modules)
    core.attach(model, config, name=name)
    for module_name, layer in core.adapter_layers(model, name):
        values, adapter = per_module[module_name], layer.adapters[name]
        expected = adapter.state_dict()
        if set(values) != set(expected):
            raise AdapterFormatError(f"{source}: '{module_name}' has tensors {sorted(values)}, but the config (depth="
                                     f"{config.depth}) implies {sorted(expected)}; the config and weights do not belong together")
        for key, value in values.items():
            if tuple(value.shape) != tuple(expected[key].shape):
                raise AdapterFormatError(f"{source}: '{module_name}.{key}' is {tuple(value.shape)}, but r={config.r} and the "
                                         f"layer's shape imply {tuple(expected[key].shape)}; the config and weights do not "
                                         "belong together (or the base is another model)")
        adapter.load_state_dict(values)
