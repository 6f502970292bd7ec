"""Hugging Face PEFT's FourierFT format (``peft_type: FOURIERFT``), read and written exactly.

``adapter_config.json`` is a ``FourierFTConfig`` as PEFT writes it (``n_frequency``,
``n_frequency_pattern``, ``scaling``, ``random_loc_seed``, ``init_weights``, ``bias: "none"``,
``fan_in_fan_out: false``). ``adapter_model.safetensors`` holds each layer's coefficients as
``base_model.model.<module path>.fourierft_spectrum`` (n); their positions are not saved: both
libraries derive them from ``random_loc_seed`` and the layer's shape. A layer whose count differs
from the most common one is written into ``n_frequency_pattern`` under its full module name, the
key PEFT looks up exactly (its regex form needs a dot before the key). Linear layers only; a file
that trains biases (``bias`` other than "none") is refused clearly.
"""
from __future__ import annotations

from collections import Counter

from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError
from ..methods.fourierft import FourierFTConfig
from .hf_common import (PREFIX, linear_modules, module_tensors,
                        present_modules_to_save, refuse_base_training, target_names)

PEFT_TYPES = ("FOURIERFT",)
KEY = "fourierft_spectrum"


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "fourierft"


def peft_counts(counts: dict, default: int) -> tuple[int, dict]:
    """``(n_frequency, n_frequency_pattern)`` for PEFT from ``{module name: count}``."""
    n = Counter(counts.values()).most_common(1)[0][0] if counts else default
    return n, {m: v for m, v in counts.items() if v != n}


def to_hf(model: nn.Module, name: str, config: FourierFTConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes a FourierFT."""
    state = require_state(model)
    tensors, counts = {}, {}
    for module_name, layer in core.adapter_layers(model, name):
        adapter = layer.adapters[name]
        tensors[f"{PREFIX}{module_name}.{KEY}"] = adapter.fourierft_spectrum.detach()
        counts[module_name] = adapter.n_frequency
    n, pattern = peft_counts(counts, config.n_frequency)
    hf = {
        "peft_type": "FOURIERFT",
        "base_model_name_or_path": state.base_name,
        "n_frequency": n,
        "n_frequency_pattern": pattern,
        "scaling": config.scaling,
        "random_loc_seed": config.random_loc_seed,
        "init_weights": config.init == "zeros",
        "target_modules": target_names(list(counts), dict(named_base_modules(model))),
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": list(config.modules_to_save) or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "auto_mapping": None,
    }
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def config_from_hf(hf: dict, modules: list) -> FourierFTConfig:
    refuse_base_training(hf, "FourierFT")
    try:
        config = FourierFTConfig(targets=sorted(modules), n_frequency=hf.get("n_frequency", 1000),
                                 scaling=hf.get("scaling", 150.0), random_loc_seed=hf.get("random_loc_seed", 777),
                                 init="zeros" if hf.get("init_weights", False) else "gaussian",
                                 n_frequency_pattern=dict(hf.get("n_frequency_pattern") or {}),
                                 modules_to_save=list(hf.get("modules_to_save") or []))
        config.validate()
    except (TypeError, ValueError, ConfigError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    return config


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the FourierFT in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    per_module = {m: found[KEY] for m, found in module_tensors(tensors, (KEY,), source, "FourierFT").items()}
    config = config_from_hf(hf, list(per_module))
    modules = linear_modules(model, per_module, source, "FourierFT")
    config.modules_to_save = present_modules_to_save(config.modules_to_save, modules)
    core.attach(model, config, name=name)
    for module_name, layer in core.adapter_layers(model, name):
        value, adapter = per_module[module_name], layer.adapters[name]
        if tuple(value.shape) != tuple(adapter.fourierft_spectrum.shape):
            raise AdapterFormatError(f"{source}: '{module_name}' has {tuple(value.shape)} coefficients, but the config "
                                     f"(n_frequency, n_frequency_pattern) implies {tuple(adapter.fourierft_spectrum.shape)}; "
                                     "the config and weights do not belong together")
        adapter.load_state_dict({KEY: value})
