"""Hugging Face PEFT's WaveFT format (``peft_type: WAVEFT``), read and written exactly.

``adapter_config.json`` is a ``WaveFTConfig`` as PEFT writes it (``n_frequency``,
``n_frequency_pattern``, ``scaling``, ``wavelet_family``, ``use_idwt``, ``random_loc_seed``,
``init_weights``, ``proportional_parameters: false``, ``bias: "none"``, ``fan_in_fan_out:
false``). ``adapter_model.safetensors`` holds each layer's coefficients as
``base_model.model.<module path>.waveft_spectrum`` (n); their positions are not saved: both
libraries derive them from ``random_loc_seed`` and the layer's shape. As for FourierFT
(``hf_fourierft.py``), a layer whose count differs from the most common one is written into
``n_frequency_pattern`` under its full module name. A PEFT file with ``proportional_parameters``
(counts PEFT computed from the layers' sizes) is read with each layer's count taken from its
tensor. Linear layers only; a file that trains biases is refused clearly.
"""
from __future__ import annotations

import re

from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError
from ..methods.waveft import WaveFTConfig
from .hf_common import (PREFIX, linear_modules, module_tensors,
                        present_modules_to_save, refuse_base_training, target_names)
from .hf_fourierft import peft_counts

PEFT_TYPES = ("WAVEFT",)
KEY = "waveft_spectrum"


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "waveft"


def to_hf(model: nn.Module, name: str, config: WaveFTConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes a WaveFT."""
    state = require_state(model)
    tensors, counts = {}, {}
    for module_name, layer in core.adapter_layers(model, name):
        adapter = layer.adapters[name]
        tensors[f"{PREFIX}{module_name}.{KEY}"] = adapter.waveft_spectrum.detach()
        counts[module_name] = adapter.n_frequency
    n, pattern = peft_counts(counts, config.n_frequency)
    hf = {
        "peft_type": "WAVEFT",
        "base_model_name_or_path": state.base_name,
        "n_frequency": n,
        "n_frequency_pattern": pattern,
        "scaling": config.scaling,
        "wavelet_family": config.wavelet_family,
        "use_idwt": config.use_idwt,
        "random_loc_seed": config.random_loc_seed,
        "init_weights": config.init == "zeros",
        "proportional_parameters": False,
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

def config_from_hf(hf: dict, modules: list, counts: dict | None = None) -> WaveFTConfig:
    """The config of a PEFT file; ``counts`` ({module: n}) replaces its counts (proportional files)."""
    refuse_base_training(hf, "WaveFT")
    try:
        config = WaveFTConfig(targets=sorted(modules), n_frequency=hf.get("n_frequency", 2592),
                              scaling=hf.get("scaling", 25.0), wavelet_family=hf.get("wavelet_family", "db1"),
                              use_idwt=hf.get("use_idwt", True), random_loc_seed=hf.get("random_loc_seed", 777),
                              init="zeros" if hf.get("init_weights", True) else "gaussian",
                              n_frequency_pattern=dict(hf.get("n_frequency_pattern") or {}),
                              modules_to_save=list(hf.get("modules_to_save") or []))
        if counts:
            config.n_frequency_pattern = {re.escape(m): n for m, n in counts.items()}
        config.validate()
    except (TypeError, ValueError, ConfigError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    return config


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the WaveFT in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    per_module = {m: found[KEY] for m, found in module_tensors(tensors, (KEY,), source, "WaveFT").items()}
    counts = {m: int(v.numel()) for m, v in per_module.items()} if hf.get("proportional_parameters") else None
    config = config_from_hf(hf, list(per_module), counts)
    modules = linear_modules(model, per_module, source, "WaveFT")
    config.modules_to_save = present_modules_to_save(config.modules_to_save, modules)
    core.attach(model, config, name=name)
    for module_name, layer in core.adapter_layers(model, name):
        value, adapter = per_module[module_name], layer.adapters[name]
        if tuple(value.shape) != tuple(adapter.waveft_spectrum.shape):
            raise AdapterFormatError(f"{source}: '{module_name}' has {tuple(value.shape)} coefficients, but the config "
                                     f"(n_frequency, n_frequency_pattern) implies {tuple(adapter.waveft_spectrum.shape)}; "
                                     "the config and weights do not belong together")
        adapter.load_state_dict({KEY: value})
