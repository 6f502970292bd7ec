"""Hugging Face PEFT's FRoD format (``peft_type: FROD``), read and written exactly.

``adapter_config.json`` is a ``FrodConfig`` as PEFT writes it (``sparse_rate``,
``regularization_alpha``, ``projection_prng_key``, ``save_projection``, ``frod_dropout``,
``init_weights``, ``bias: "none"``, ``fan_in_fan_out: false``). ``adapter_model.safetensors``
holds each layer's trained numbers as ``base_model.model.<module path>.frod_lambda_l`` (in) and
``.frod_lambda_s_values`` (nnz), and, with ``save_projection`` (the default), each category's
shared tensors once: ``base_model.frod_V.<category>`` (in x in), ``base_model.frod_s_indices.
<category>`` (2 x nnz, int64) and ``base_model.frod_s_size.<category>`` ([in, in]). Without them
both libraries rebuild the bases and places from the base weights and ``projection_prng_key``.
``U`` is never saved: it is derived from ``V`` and the base weight on load, here as in PEFT.
Linear layers only; files that train biases or target Conv1D layers are refused clearly.
"""
from __future__ import annotations

from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError
from ..methods.frod import FrodConfig, category
from .hf_common import (PREFIX, linear_modules, module_tensors,
                        present_modules_to_save, refuse_base_training, target_names)

PEFT_TYPES = ("FROD",)
KEYS = ("frod_lambda_l", "frod_lambda_s_values")
SHARED = {"frod_V": "base_model.frod_V.", "frod_s_indices": "base_model.frod_s_indices.",
          "frod_s_size": "base_model.frod_s_size."}


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "frod"


def to_hf(model: nn.Module, name: str, config: FrodConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes a FRoD."""
    state = require_state(model)
    tensors, modules = {}, []
    for module_name, layer in core.adapter_layers(model, name):
        adapter = layer.adapters[name]
        for key in KEYS:
            tensors[f"{PREFIX}{module_name}.{key}"] = getattr(adapter, key).detach()
        modules.append(module_name)
        if config.save_projection:
            for key, value in zip(SHARED.values(), adapter.projection()):
                tensors[key + category(module_name)] = value.detach()
    hf = {
        "peft_type": "FROD",
        "base_model_name_or_path": state.base_name,
        "target_modules": target_names(modules, dict(named_base_modules(model))),
        "projection_prng_key": config.projection_prng_key,
        "save_projection": config.save_projection,
        "frod_dropout": config.dropout,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": list(config.modules_to_save) or None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "sparse_rate": config.sparse_rate,
        "regularization_alpha": config.regularization_alpha,
        "progressbar": False,
        "runtime_offload_base_weight": False,
        "auto_mapping": None,
    }
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def config_from_hf(hf: dict, modules: list) -> FrodConfig:
    refuse_base_training(hf, "FRoD")
    try:
        config = FrodConfig(targets=sorted(modules), sparse_rate=hf.get("sparse_rate", 0.01),
                            regularization_alpha=hf.get("regularization_alpha", 1e-3),
                            projection_prng_key=hf.get("projection_prng_key", 0),
                            save_projection=hf.get("save_projection", True), dropout=hf.get("frod_dropout", 0.0),
                            modules_to_save=list(hf.get("modules_to_save") or []))
        config.validate()
    except (TypeError, ValueError, ConfigError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    return config


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the FRoD in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    shared = {k: v for k, v in tensors.items() if k.startswith(tuple(SHARED.values()))}
    per_module = module_tensors(tensors, KEYS, source, "FRoD", skip=shared)
    config = config_from_hf(hf, list(per_module))
    modules = linear_modules(model, per_module, source, "FRoD")
    config.modules_to_save = present_modules_to_save(config.modules_to_save, modules)
    try:
        core.attach(model, config, name=name)
    except ConfigError as error:
        raise AdapterFormatError(f"{source}: {error}") from None
    layers = list(core.adapter_layers(model, name))
    if config.save_projection:  # as saved (PEFT, too, rebuilds them when save_projection is false)
        owners = {}
        for module_name, layer in layers:
            owners.setdefault(category(module_name), layer.adapters[name])
        wanted = {prefix + cat for cat in owners for prefix in SHARED.values()}
        if set(shared) != wanted:
            raise AdapterFormatError(f"{source}: adapter_config.json says save_projection=true, so the file should hold "
                                     f"{sorted(wanted)}; it holds {sorted(shared)}; the file is incomplete or for other "
                                     "modules")
        for cat, owner in owners.items():
            for buffer, prefix in SHARED.items():
                value, current = shared[prefix + cat], owner._buffers[buffer]
                if tuple(value.shape) != tuple(current.shape):
                    raise AdapterFormatError(f"{source}: {prefix + cat} is {tuple(value.shape)}, but sparse_rate="
                                             f"{config.sparse_rate} and the layers' widths imply {tuple(current.shape)}; "
                                             "the config and weights do not belong together")
                n = owner.in_features
                if buffer == "frod_s_indices" and value.numel() and not (0 <= int(value.min()) and int(value.max()) < n):
                    raise AdapterFormatError(f"{source}: {prefix + cat} names places outside the layers' {n} x {n} "
                                             "matrix; the file is corrupt")
                current.copy_(value)
    for module_name, layer in layers:  # loading a layer's numbers recomputes its U from the (now loaded) basis
        values, adapter = per_module[module_name], layer.adapters[name]
        expected = {k: tuple(getattr(adapter, k).shape) for k in KEYS}
        found = {k: tuple(v.shape) for k, v in values.items()}
        if expected != found:
            raise AdapterFormatError(f"{source}: tensors for '{module_name}' are {found}, but sparse_rate="
                                     f"{config.sparse_rate} and the layer imply {expected}; the config and weights do "
                                     "not belong together (or the base is another model)")
        adapter.load_state_dict(values, strict=False)
