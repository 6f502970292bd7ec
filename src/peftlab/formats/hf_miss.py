"""Hugging Face PEFT's MiSS format (``peft_type: MISS``), read and written exactly.

``adapter_config.json`` is a ``MissConfig`` as PEFT writes it (``r``, ``miss_dropout``,
``mini_r``, ``init_weights``: ``true`` balance, ``false`` balance from random values, ``"bat"``,
``"mini"``; ``bias: "none"``); ``adapter_model.safetensors`` holds each layer's trained block as
``base_model.model.<module path>.miss_block`` (r x out; bat: out/r x r x r; mini: r x mini_r), the
peftlab module's own state dict. PEFT's ``r`` is one number for every layer: an adapter whose
narrow layers were given their width instead (``methods/miss.py``) is written in peftlab's own
format, with a warning. Linear layers only; files that train biases are refused clearly.
"""
from __future__ import annotations

from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError
from ..methods.miss import MissConfig, narrowed_warning
from . import native
from .hf_common import (PREFIX, linear_modules, module_tensors,
                        present_modules_to_save, refuse_base_training, target_names)

PEFT_TYPES = ("MISS",)
KEY = "miss_block"
INIT_WEIGHTS = {"balance": True, "random": False, "bat": "bat", "mini": "mini"}  # peftlab's init -> PEFT's init_weights


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "miss"


def to_hf(model: nn.Module, name: str, config: MissConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes a MiSS (peftlab's format where
    the layers' r differ, which PEFT's file cannot say)."""
    state = require_state(model)
    tensors, ranks = {}, {}
    for module_name, layer in core.adapter_layers(model, name):
        adapter = layer.adapters[name]
        tensors[f"{PREFIX}{module_name}.{KEY}"] = adapter.miss_block.detach()
        ranks[module_name] = adapter.r
    if len(set(ranks.values())) > 1:
        narrowed_warning(ranks, config.r)
        return native.to_native(model, name, [config])
    hf = {
        "peft_type": "MISS",
        "base_model_name_or_path": state.base_name,
        "r": next(iter(ranks.values()), config.r),
        "miss_dropout": config.dropout,
        "mini_r": config.mini_r,
        "init_weights": INIT_WEIGHTS[config.init],
        "target_modules": target_names(list(ranks), dict(named_base_modules(model))),
        "exclude_modules": None,
        "bias": "none",
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": list(config.modules_to_save) or None,
        "auto_mapping": None,
    }
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def config_from_hf(hf: dict, modules: list) -> MissConfig:
    refuse_base_training(hf, "MiSS")
    init_weights = hf.get("init_weights", True)
    init = next((k for k, v in INIT_WEIGHTS.items() if v == init_weights and type(v) is type(init_weights)), None)
    if init is None:
        raise AdapterFormatError(f"adapter_config.json has init_weights={init_weights!r}; PEFT's MiSS knows true, false, "
                                 "'bat' and 'mini'")
    try:
        config = MissConfig(targets=sorted(modules), r=hf.get("r", 64), dropout=hf.get("miss_dropout", 0.0), init=init,
                            mini_r=hf.get("mini_r", 1), modules_to_save=list(hf.get("modules_to_save") or []))
        config.validate()
    except (TypeError, ValueError, ConfigError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    return config


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the MiSS in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    per_module = {m: found[KEY] for m, found in module_tensors(tensors, (KEY,), source, "MiSS").items()}
    config = config_from_hf(hf, list(per_module))
    modules = linear_modules(model, per_module, source, "MiSS")
    config.modules_to_save = present_modules_to_save(config.modules_to_save, modules)
    try:
        core.attach(model, config, name=name)
    except ConfigError as error:
        raise AdapterFormatError(f"{source}: {error}") from None
    for module_name, layer in core.adapter_layers(model, name):
        value, adapter = per_module[module_name], layer.adapters[name]
        if tuple(value.shape) != tuple(adapter.miss_block.shape):
            raise AdapterFormatError(f"{source}: '{module_name}'.miss_block is {tuple(value.shape)}, but the config "
                                     f"(r={config.r}, init={config.init}) and the layer imply "
                                     f"{tuple(adapter.miss_block.shape)}; the config and weights do not belong together")
        adapter.load_state_dict({KEY: value})
