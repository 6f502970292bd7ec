"""Hugging Face PEFT's GraLoRA format (``peft_type: GRALORA``), read and written exactly.

``adapter_config.json`` is a ``GraloraConfig`` as PEFT writes it (``r``, ``alpha``,
``gralora_k``, ``hybrid_r``, ``gralora_dropout``, ``init_weights``, ``bias: "none"``,
``fan_in_fan_out: false``). ``adapter_model.safetensors`` holds each layer's block pairs as
``base_model.model.<module path>.gralora_A`` (k, in / k, r) and ``.gralora_B`` (k, r, out / k)
and, when ``hybrid_r > 0``, the plain pair as ``.gralora_A_general.weight`` (hybrid_r x in) and
``.gralora_B_general.weight`` (out x hybrid_r): the names and layouts of peftlab's parameters, so
the tensors move unchanged. Linear layers only; a file that trains biases (``bias`` other than
"none") is refused clearly.
"""
from __future__ import annotations

from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError
from ..methods.gralora import GraloraConfig
from .hf_common import PREFIX, linear_modules, present_modules_to_save, refuse_base_training, target_names

PEFT_TYPES = ("GRALORA",)
BLOCK_KEYS = ("gralora_A", "gralora_B")
HYBRID_KEYS = ("gralora_A_general.weight", "gralora_B_general.weight")


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "gralora"


def to_hf(model: nn.Module, name: str, config: GraloraConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes a GraLoRA."""
    state = require_state(model)
    tensors, modules = {}, []
    for module_name, layer in core.adapter_layers(model, name):
        for key, value in layer.adapters[name].state_dict().items():
            tensors[f"{PREFIX}{module_name}.{key}"] = value.detach()
        modules.append(module_name)
    hf = {
        "peft_type": "GRALORA",
        "base_model_name_or_path": state.base_name,
        "r": config.r,
        "alpha": config.alpha,
        "gralora_k": config.gralora_k,
        "hybrid_r": config.hybrid_r,
        "gralora_dropout": config.dropout,
        "init_weights": True,
        "target_modules": target_names(modules, dict(named_base_modules(model))),
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": list(config.modules_to_save) or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "auto_mapping": None,
    }
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def config_from_hf(hf: dict, modules: list) -> GraloraConfig:
    refuse_base_training(hf, "GraLoRA")
    try:
        config = GraloraConfig(targets=sorted(modules), r=hf.get("r", 32), alpha=hf.get("alpha", 64),
                               gralora_k=hf.get("gralora_k", 2), hybrid_r=hf.get("hybrid_r", 0),
                               dropout=hf.get("gralora_dropout", 0.0),
                               modules_to_save=list(hf.get("modules_to_save") or []))
        config.validate()
    except (TypeError, ValueError, ConfigError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    return config


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the GraLoRA in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    per_module = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterFormatError(f"{source}: unexpected tensor name {key!r}: keys should start with {PREFIX!r}")
        for local in BLOCK_KEYS + HYBRID_KEYS:
            if key.endswith("." + local):
                per_module.setdefault(key[len(PREFIX):-len(local) - 1], {})[local] = value
                break
    if not per_module:
        raise AdapterFormatError(f"{source}: the weights file holds no GraLoRA tensors (keys ending in gralora_A / gralora_B)")
    config = config_from_hf(hf, list(per_module))
    modules = linear_modules(model, per_module, source, "GraLoRA")
    config.modules_to_save = present_modules_to_save(config.modules_to_save, modules)
    core.attach(model, config, name=name)
    for module_name, layer in core.adapter_layers(model, name):
        values, adapter = per_module[module_name], layer.adapters[name]
        expected = adapter.state_dict()
        if set(values) != set(expected):
            raise AdapterFormatError(f"{source}: '{module_name}' has tensors {sorted(values)}, but the config (hybrid_r="
                                     f"{config.hybrid_r}) implies {sorted(expected)}; the config and weights do not belong together")
        for key, value in values.items():
            if tuple(value.shape) != tuple(expected[key].shape):
                raise AdapterFormatError(f"{source}: '{module_name}.{key}' is {tuple(value.shape)}, but the config (r, "
                                         f"gralora_k, hybrid_r) implies {tuple(expected[key].shape)}; the config and "
                                         "weights do not belong together")
        adapter.load_state_dict(values)
