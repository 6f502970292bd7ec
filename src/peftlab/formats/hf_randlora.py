"""Hugging Face PEFT's RandLoRA format (``peft_type: RANDLORA``), read and written.

``adapter_config.json`` is a ``RandLoraConfig`` as PEFT writes it (``r``, ``randlora_alpha``,
``randlora_dropout``, ``projection_prng_key``, ``save_projection``, ``sparse``, ``very_sparse``,
``init_weights``, ``bias: "none"``, ``fan_in_fan_out: false``). ``adapter_model.safetensors`` holds
each layer's scalings as ``base_model.model.<module path>.randlora_lambda`` (r x n) and
``.randlora_gamma`` (n x short side), and, with ``save_projection``, the shared bases as
``base_model.randlora_A`` (r, 1, short) and ``base_model.randlora_B`` (long, n, r). PEFT also
writes a copy of both bases under every adapted layer (``<module path>.randlora_A``); those copies
are read past (the shared copy is the one PEFT and peftlab use) and not written. Without
``save_projection`` the bases come from ``projection_prng_key`` (``methods/randlora.py`` draws
PEFT's). Linear layers only; a file that trains biases is refused clearly.
"""
from __future__ import annotations

from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError, IncompatibleBaseError
from ..methods.randlora import RandLoraConfig
from .hf_common import (layer_tensors, linear_modules, load_layers, load_shared, missing_shared, module_tensors,
                        present_modules_to_save, refuse_base_training, target_names)

PEFT_TYPES = ("RANDLORA",)
KEYS = ("randlora_lambda", "randlora_gamma")
BASES = {"randlora_A": "base_model.randlora_A", "randlora_B": "base_model.randlora_B"}


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "randlora"


def to_hf(model: nn.Module, name: str, config: RandLoraConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes a RandLoRA (bases once)."""
    state = require_state(model)
    tensors, modules, adapter = layer_tensors(model, name, KEYS)
    if config.save_projection and adapter is not None:
        tensors.update({key: t.detach() for key, t in zip(BASES.values(), adapter.bases())})
    hf = {
        "peft_type": "RANDLORA",
        "base_model_name_or_path": state.base_name,
        "r": config.r,
        "target_modules": target_names(modules, dict(named_base_modules(model))),
        "projection_prng_key": config.projection_prng_key,
        "save_projection": config.save_projection,
        "sparse": config.sparse,
        "very_sparse": config.very_sparse,
        "randlora_dropout": config.dropout,
        "randlora_alpha": config.alpha,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": list(config.modules_to_save) or None,
        "init_weights": config.init == "default",
        "layers_to_transform": None,
        "layers_pattern": None,
        "auto_mapping": None,
    }
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def config_from_hf(hf: dict, modules: list) -> RandLoraConfig:
    refuse_base_training(hf, "RandLoRA")
    try:
        config = RandLoraConfig(targets=sorted(modules), r=hf.get("r", 32), alpha=hf.get("randlora_alpha", 640),
                                dropout=hf.get("randlora_dropout", 0.0), projection_prng_key=hf.get("projection_prng_key", 0),
                                save_projection=hf.get("save_projection", True), sparse=hf.get("sparse", False),
                                very_sparse=hf.get("very_sparse", False),
                                init="default" if hf.get("init_weights", True) else "random",
                                modules_to_save=list(hf.get("modules_to_save") or []))
        config.validate()
    except (TypeError, ValueError, ConfigError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    return config


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the RandLoRA in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    per_module = module_tensors(tensors, KEYS, source, "RandLoRA", skip=BASES.values())
    config = config_from_hf(hf, list(per_module))
    saved = [tensors.get(key) for key in BASES.values()]
    missing_shared(config, saved, BASES.values(), source)
    modules = linear_modules(model, per_module, source, "RandLoRA")
    for module_name, local in per_module.items():
        gamma = local.get("randlora_gamma")
        short = min(modules[module_name].in_features, modules[module_name].out_features)
        if gamma is not None and gamma.dim() == 2 and gamma.shape[1] != short:
            raise IncompatibleBaseError(f"{source} was saved for a base whose '{module_name}' has a short side of "
                                        f"{gamma.shape[1]}, but this model's is {short}: wrong base model")
    base_names = [n for n, _ in named_base_modules(model)]
    config.modules_to_save = present_modules_to_save(config.modules_to_save, base_names)
    core.attach(model, config, name=name)
    load_layers(model, name, per_module, KEYS, source)
    if config.save_projection:  # as saved (PEFT, too, ignores saved bases when save_projection is false)
        _, layer = next(core.adapter_layers(model, name))
        load_shared(layer.adapters[name].bases(), saved, BASES.values(), source)
