"""Hugging Face PEFT's C3A format (``peft_type: C3A``), read and written exactly.

``adapter_config.json`` is a ``C3AConfig`` as PEFT writes it (``block_size``,
``block_size_pattern``, ``init_weights``, ``bias: "none"``). ``adapter_model.safetensors`` holds
each layer's kernels as ``base_model.model.<module path>.c3a_kernel`` (out / b, in / b, b), float32.
A layer whose block size differs from the most common one is written into ``block_size_pattern``
under its full module name, the key PEFT looks up exactly. On reading, each layer's block size is
taken from its kernel's shape (the last dimension), so it never has to be re-derived from the
patterns; a shape that the config contradicts is refused. Linear layers only; a file that trains
biases (``bias`` other than "none") is refused clearly.
"""
from __future__ import annotations

import re
from collections import Counter

from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError, IncompatibleBaseError
from ..methods.c3a import C3AConfig
from .hf_common import (PREFIX, linear_modules, module_tensors,
                        present_modules_to_save, refuse_base_training, target_names)

PEFT_TYPES = ("C3A",)
KEY = "c3a_kernel"
PEFT_INITS = {True: "zeros", False: "xavier_uniform", "xavier_uniform": "xavier_uniform",
              "kaiming_uniform": "kaiming_uniform", "gaussian": "gaussian"}


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "c3a"


def to_hf(model: nn.Module, name: str, config: C3AConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes a C3A."""
    state = require_state(model)
    tensors, sizes = {}, {}
    for module_name, layer in core.adapter_layers(model, name):
        adapter = layer.adapters[name]
        tensors[f"{PREFIX}{module_name}.{KEY}"] = adapter.c3a_kernel.detach()
        sizes[module_name] = adapter.block_size
    common = Counter(sizes.values()).most_common(1)[0][0] if sizes else config.block_size
    hf = {
        "peft_type": "C3A",
        "base_model_name_or_path": state.base_name,
        "block_size": common,
        "block_size_pattern": {m: b for m, b in sizes.items() if b != common},
        "init_weights": True if config.init == "zeros" else config.init,
        "target_modules": target_names(list(sizes), dict(named_base_modules(model))),
        "exclude_modules": None,
        "bias": "none",
        "modules_to_save": list(config.modules_to_save) or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "auto_mapping": None,
    }
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def config_from_hf(hf: dict, per_module: dict) -> C3AConfig:
    """peftlab's config for a PEFT file, each layer's block size read from its kernel's shape."""
    refuse_base_training(hf, "C3A")
    init = hf.get("init_weights", "xavier_uniform")
    if not isinstance(init, (bool, str)) or init not in PEFT_INITS:
        raise AdapterFormatError(f"adapter_config.json has init_weights={init!r}; PEFT's C3A takes true, false, "
                                 f"{', '.join(repr(k) for k in PEFT_INITS if isinstance(k, str))}")
    sizes = {m: int(v.shape[-1]) for m, v in per_module.items() if v.dim() == 3}
    common = Counter(sizes.values()).most_common(1)[0][0] if sizes else hf.get("block_size", 256)
    try:
        config = C3AConfig(targets=sorted(per_module), block_size=common, init=PEFT_INITS[init],
                           block_size_pattern={re.escape(m): b for m, b in sizes.items() if b != common},
                           modules_to_save=list(hf.get("modules_to_save") or []))
        config.validate()
    except (TypeError, ValueError, ConfigError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    return config


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the C3A in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    per_module = {m: found[KEY] for m, found in module_tensors(tensors, (KEY,), source, "C3A").items()}
    for module_name, value in per_module.items():
        if value.dim() != 3 or not value.dtype.is_floating_point:
            raise AdapterFormatError(f"{source}: '{module_name}.{KEY}' is {tuple(value.shape)} {value.dtype}; a C3A kernel "
                                     "is a floating-point (out / b, in / b, b) tensor")
    config = config_from_hf(hf, per_module)
    modules = linear_modules(model, per_module, source, "C3A")
    config.modules_to_save = present_modules_to_save(config.modules_to_save, modules)
    core.attach(model, config, name=name)
    for module_name, layer in core.adapter_layers(model, name):
        value, adapter = per_module[module_name], layer.adapters[name]
        if tuple(value.shape) != tuple(adapter.c3a_kernel.shape):
            raise IncompatibleBaseError(f"{source}: '{module_name}' has kernels of shape {tuple(value.shape)}, but this "
                                        f"{adapter.out_features} x {adapter.in_features} layer with block size "
                                        f"{value.shape[-1]} needs {tuple(adapter.c3a_kernel.shape)}; the file was saved "
                                        "for another base model (or its block size divides neither size)")
        adapter.load_state_dict({KEY: value.float()})
