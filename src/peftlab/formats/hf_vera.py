"""Hugging Face PEFT's VeRA format (``peft_type: VERA``), read and written exactly.

``adapter_config.json`` is a ``VeraConfig`` as PEFT writes it (``r``, ``d_initial``,
``vera_dropout``, ``projection_prng_key``, ``save_projection``, ``bias: "none"``,
``fan_in_fan_out: false``). ``adapter_model.safetensors`` holds each layer's vectors as
``base_model.model.<module path>.vera_lambda_b`` (out) and ``.vera_lambda_d`` (r), and, when
``save_projection`` is set, the one shared pair as ``base_model.vera_A`` (r x largest in) and
``base_model.vera_B`` (largest out x r). Without it, the pair comes from ``projection_prng_key``
(``methods/vera.py`` draws PEFT's matrices); with it, the file's pair is used as saved. Linear
layers only; a file that trains biases (``bias`` other than "none") is refused clearly.
"""
from __future__ import annotations

from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError, IncompatibleBaseError
from ..methods.vera import VeraConfig
from .hf_common import PREFIX, linear_modules, present_modules_to_save, refuse_base_training, target_names

PEFT_TYPES = ("VERA",)
KEYS = ("vera_lambda_b", "vera_lambda_d")
PROJECTION_KEYS = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "vera"


def to_hf(model: nn.Module, name: str, config: VeraConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes a VeRA."""
    state = require_state(model)
    tensors, modules, projections = {}, [], None
    for module_name, layer in core.adapter_layers(model, name):
        adapter = layer.adapters[name]
        for key in KEYS:
            tensors[f"{PREFIX}{module_name}.{key}"] = getattr(adapter, key).detach()
        modules.append(module_name)
        projections = adapter.projections()
    if config.save_projection and projections is not None:
        for tensor, key in zip(projections, PROJECTION_KEYS.values()):
            tensors[key] = tensor.detach()
    hf = {
        "peft_type": "VERA",
        "base_model_name_or_path": state.base_name,
        "r": config.r,
        "target_modules": target_names(modules, dict(named_base_modules(model))),
        "projection_prng_key": config.projection_prng_key,
        "save_projection": config.save_projection,
        "vera_dropout": config.dropout,
        "d_initial": config.d_initial,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": list(config.modules_to_save) or None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "auto_mapping": None,
    }
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def config_from_hf(hf: dict, modules: list) -> VeraConfig:
    refuse_base_training(hf, "VeRA")
    try:
        config = VeraConfig(targets=sorted(modules), r=hf.get("r", 256), d_initial=hf.get("d_initial", 0.1),
                            dropout=hf.get("vera_dropout", 0.0), projection_prng_key=hf.get("projection_prng_key", 0),
                            save_projection=hf.get("save_projection", True),
                            modules_to_save=list(hf.get("modules_to_save") or []))
        config.validate()
    except (TypeError, ValueError, ConfigError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    return config


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the VeRA in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    per_module = {}
    for key, value in tensors.items():
        if key in PROJECTION_KEYS.values():
            continue
        if not key.startswith(PREFIX):
            raise AdapterFormatError(f"{source}: unexpected tensor name {key!r}: keys should start with {PREFIX!r}")
        module_name, _, local = key[len(PREFIX):].rpartition(".")
        if local in KEYS:
            per_module.setdefault(module_name, {})[local] = value
    if not per_module:
        raise AdapterFormatError(f"{source}: the weights file holds no VeRA tensors (keys ending in {', '.join(KEYS)})")
    config = config_from_hf(hf, list(per_module))
    saved = [tensors.get(key) for key in PROJECTION_KEYS.values()]
    if config.save_projection and any(t is None for t in saved):
        raise AdapterFormatError(f"{source}: adapter_config.json says save_projection=true, but the weights file lacks "
                                 f"{' and '.join(PROJECTION_KEYS.values())}; the file is incomplete")
    _check_modules(model, per_module, source)
    base_names = [n for n, _ in named_base_modules(model)]
    config.modules_to_save = present_modules_to_save(config.modules_to_save, base_names)
    core.attach(model, config, name=name)
    for module_name, layer in core.adapter_layers(model, name):
        local, adapter = per_module[module_name], layer.adapters[name]
        expected = {k: tuple(getattr(adapter, k).shape) for k in KEYS}
        found = {k: tuple(v.shape) for k, v in local.items()}
        if expected != found:
            raise AdapterFormatError(f"{source}: tensors for '{module_name}' are {found}, but the config (r) and the layer "
                                     f"imply {expected}; the config and weights do not belong together")
        adapter.load_state_dict(local, strict=False)
    if config.save_projection:  # as saved (PEFT, too, ignores a saved pair when save_projection is false)
        _, layer = next(core.adapter_layers(model, name))
        for current, value, key in zip(layer.adapters[name].projections(), saved, PROJECTION_KEYS.values()):
            if tuple(current.shape) != tuple(value.shape):
                raise AdapterFormatError(f"{source}: {key} is {tuple(value.shape)}, but r and the widest adapted layers "
                                         f"imply {tuple(current.shape)}; the config and weights do not belong together")
            current.copy_(value)


def _check_modules(model: nn.Module, per_module: dict, source) -> None:
    modules = linear_modules(model, per_module, source, "VeRA")
    for module_name, local in per_module.items():
        module = modules[module_name]
        b = local.get("vera_lambda_b")
        if b is not None and b.shape[0] != module.out_features:
            raise IncompatibleBaseError(f"{source} was saved for a base whose '{module_name}' has {b.shape[0]} outputs, "
                                        f"but this model's has {module.out_features}: wrong base model")
