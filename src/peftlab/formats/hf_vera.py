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
from ..errors import AdapterFormatError, ConfigError
from ..methods.vera import VeraConfig
from .hf_common import (check_outputs, layer_tensors, load_layers, load_shared, missing_shared, module_tensors,
                        present_modules_to_save, refuse_base_training, target_names)

PEFT_TYPES = ("VERA",)
KEYS = ("vera_lambda_b", "vera_lambda_d")
PROJECTION_KEYS = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "vera"


def to_hf(model: nn.Module, name: str, config: VeraConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes a VeRA."""
    state = require_state(model)
    tensors, modules, adapter = layer_tensors(model, name, KEYS)
    if config.save_projection and adapter is not None:
        tensors.update({key: t.detach() for key, t in zip(PROJECTION_KEYS.values(), adapter.projections())})
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
    per_module = module_tensors(tensors, KEYS, source, "VeRA", skip=PROJECTION_KEYS.values())
    config = config_from_hf(hf, list(per_module))
    saved = [tensors.get(key) for key in PROJECTION_KEYS.values()]
    missing_shared(config, saved, PROJECTION_KEYS.values(), source)
    check_outputs(model, per_module, "vera_lambda_b", source, "VeRA")
    config.modules_to_save = present_modules_to_save(config.modules_to_save, [n for n, _ in named_base_modules(model)])
    core.attach(model, config, name=name)
    load_layers(model, name, per_module, KEYS, source)
    if config.save_projection:  # as saved (PEFT, too, ignores a saved pair when save_projection is false)
        _, layer = next(core.adapter_layers(model, name))
        load_shared(layer.adapters[name].projections(), saved, PROJECTION_KEYS.values(), source)
