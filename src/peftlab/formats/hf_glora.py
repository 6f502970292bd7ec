"""Hugging Face PEFT's GLoRA format (``peft_type: GLORA``), read and written exactly.

``adapter_config.json`` is a ``GloraConfig`` as PEFT writes it (``r``, ``config_A_B``,
``config_C``, ``config_D_E``, ``init_weights``, ``bias: "none"``). ``adapter_model.safetensors``
holds, for each layer and each support tensor ``glora_A`` .. ``glora_E``, the tensors of its type
under ``base_model.model.<module path>.glora_<X>.<part>``: ``Xd`` (rows x r) and ``Xu`` (r x cols)
for ``lora``, ``X`` for ``vector`` ((out, 1) for A and B, (in, 1) for C, (out,) for D and E) and
``constant`` ((1,)), and for ``none`` PEFT's zero buffer ``zeros`` (A, B: out x in; C: in x 1;
D, E: out), which peftlab writes too and reads only to check that it is zero. A layer without a
bias has ``none`` for C, D and E whatever the config says, in both libraries. Linear layers only;
a file that trains biases (``bias`` other than "none") is refused clearly.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError
from ..methods.glora import GloraConfig
from .hf_common import (PREFIX, linear_modules, module_tensors,
                        present_modules_to_save, refuse_base_training, target_names)

PEFT_TYPES = ("GLORA",)
SUPPORTS = ("glora_A", "glora_B", "glora_C", "glora_D", "glora_E")
PARTS = ("Xd", "Xu", "X", "zeros")


def zeros_shape(support: str, out_features: int, in_features: int) -> tuple:
    """The shape of PEFT's zero buffer for a ``none`` support tensor."""
    return {"glora_C": (in_features, 1), "glora_D": (out_features,), "glora_E": (out_features,)}.get(
        support, (out_features, in_features))


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "glora"


def to_hf(model: nn.Module, name: str, config: GloraConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes a GLoRA."""
    state = require_state(model)
    tensors, modules = {}, []
    for module_name, layer in core.adapter_layers(model, name):
        adapter = layer.adapters[name]
        out_features, in_features = layer.base_layer.out_features, layer.base_layer.in_features
        for support in SUPPORTS:
            path = getattr(adapter, support)
            if path.kind == "none":
                tensors[f"{PREFIX}{module_name}.{support}.zeros"] = torch.zeros(
                    zeros_shape(support, out_features, in_features), dtype=adapter.dtype)
            for part, value in path.state_dict().items():
                tensors[f"{PREFIX}{module_name}.{support}.{part}"] = value.detach()
        modules.append(module_name)
    hf = {
        "peft_type": "GLORA",
        "base_model_name_or_path": state.base_name,
        "r": config.r,
        "config_A_B": config.ab,
        "config_C": config.c,
        "config_D_E": config.de,
        "init_weights": config.init == "zeros",
        "target_modules": target_names(modules, dict(named_base_modules(model))),
        "bias": "none",
        "modules_to_save": list(config.modules_to_save) or None,
        "auto_mapping": None,
    }
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def config_from_hf(hf: dict, modules: list) -> GloraConfig:
    refuse_base_training(hf, "GLoRA")
    try:
        config = GloraConfig(targets=sorted(modules), r=hf.get("r", 8), ab=hf.get("config_A_B", "lora"),
                             c=hf.get("config_C", "lora"), de=hf.get("config_D_E", "constant"),
                             init="zeros" if hf.get("init_weights", True) else "random",
                             modules_to_save=list(hf.get("modules_to_save") or []))
        config.validate()
    except (TypeError, ValueError, ConfigError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    return config


def grouped(tensors: dict, source) -> dict:
    """``{module path: {"glora_A": {part: tensor}, ...}}`` of a GLoRA file's tensors."""
    per_module: dict = {}
    for key, parts in module_tensors(tensors, PARTS, source, "GLoRA").items():
        module_name, _, support = key.rpartition(".")
        if support not in SUPPORTS or not module_name:
            raise AdapterFormatError(f"{source}: unexpected tensor {key!r}.{'/'.join(parts)}: GLoRA tensors are "
                                     "<module>.glora_A .. glora_E.<Xd, Xu, X or zeros>")
        per_module.setdefault(module_name, {})[support] = parts
    return per_module


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the GLoRA in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    per_module = grouped(tensors, source)
    config = config_from_hf(hf, list(per_module))
    modules = linear_modules(model, per_module, source, "GLoRA")
    config.modules_to_save = present_modules_to_save(config.modules_to_save, modules)
    core.attach(model, config, name=name)
    for module_name, layer in core.adapter_layers(model, name):
        adapter, found = layer.adapters[name], per_module[module_name]
        for support in SUPPORTS:
            path, parts = getattr(adapter, support), dict(found.get(support, {}))
            zeros = parts.pop("zeros", None)
            if zeros is not None and torch.count_nonzero(zeros):
                raise AdapterFormatError(f"{source}: '{module_name}.{support}.zeros' is not zero; PEFT's buffer for an "
                                         "unused support tensor must be")
            expected = {part: tuple(value.shape) for part, value in path.state_dict().items()}
            got = {part: tuple(value.shape) for part, value in parts.items()}
            if got != expected:
                raise AdapterFormatError(f"{source}: '{module_name}.{support}' holds {got or 'nothing'}, but the config "
                                         f"(r={config.r}, {path.kind}) and the layer imply {expected or 'nothing'}; the "
                                         "config and weights do not belong together")
            path.load_state_dict(parts)
