"""Hugging Face PEFT's HiRA format (``peft_type: HIRA``), read and written exactly.

``adapter_config.json`` is a ``HiraConfig`` as PEFT writes it (``r``, ``hira_dropout``,
``rank_pattern``, ``init_weights``, ``fan_in_fan_out: false``). ``adapter_model.safetensors`` holds,
per layer, ``base_model.model.<module path>.hira_A`` (r x in) and ``.hira_B`` (out x r); the frozen
weight the update multiplies is the base model's own, so it is never saved.

Per-layer ranks: PEFT 0.21.2's HiRA builds every new layer at ``r`` whatever ``rank_pattern`` says
(its dispatcher passes ``config.r``), so it cannot load a file whose layers differ in rank. peftlab
therefore writes this format only for adapters without a ``rank_pattern`` (one with a pattern is
saved in peftlab's native format), and reads each layer's rank from its tensors, so PEFT's files
(whose layers all have rank ``r``, patterns notwithstanding) load as PEFT runs them.
Linear layers only; files for GPT-2's Conv1D (``fan_in_fan_out``), embeddings or trained biases are
refused clearly.
"""
from __future__ import annotations

from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError
from ..methods.hira import HiraConfig
from .hf_common import (PREFIX, linear_modules, module_tensors,
                        present_modules_to_save, refuse_base_training, target_names)
from .hf_fourierft import peft_counts

PEFT_TYPES = ("HIRA",)
KEYS = ("hira_A", "hira_B")
INIT_TO_HF = {"default": True, "gaussian": "gaussian", "random": False}


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "hira" and not configs[0].rank_pattern


def to_hf(model: nn.Module, name: str, config: HiraConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes a HiRA."""
    state = require_state(model)
    tensors, modules = {}, []
    for module_name, layer in core.adapter_layers(model, name):
        adapter = layer.adapters[name]
        for key in KEYS:
            tensors[f"{PREFIX}{module_name}.{key}"] = getattr(adapter, key).detach()
        modules.append(module_name)
    hf = {
        "peft_type": "HIRA",
        "base_model_name_or_path": state.base_name,
        "r": config.r,
        "hira_dropout": config.dropout,
        "rank_pattern": {},
        "init_weights": INIT_TO_HF[config.init],
        "target_modules": target_names(modules, dict(named_base_modules(model))),
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "modules_to_save": list(config.modules_to_save) or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "auto_mapping": None,
    }
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def init_from_hf(init) -> str:
    """PEFT's ``init_weights`` as peftlab's ``init`` (None, like False, leaves both factors random)."""
    if init is True:
        return "default"
    if init is False or init is None:
        return "random"
    return init.lower() if isinstance(init, str) else repr(init)  # "gaussian", or a value validate() names


def config_from_hf(hf: dict, modules: list) -> HiraConfig:
    refuse_base_training(hf, "HiRA")
    init = hf.get("init_weights", True)
    try:
        config = HiraConfig(targets=sorted(modules), r=hf.get("r", 32), dropout=hf.get("hira_dropout", 0.0),
                            init=init_from_hf(init),
                            rank_pattern=dict(hf.get("rank_pattern") or {}),
                            modules_to_save=list(hf.get("modules_to_save") or []))
        config.validate()
    except (TypeError, ValueError, ConfigError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    return config


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the HiRA in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    if any(k.endswith((".hira_embedding_A", ".hira_embedding_B")) for k in tensors):
        raise AdapterFormatError(f"{source} adapts embedding layers (hira_embedding_A/B); peftlab's HiRA adapts "
                                 "nn.Linear layers only")
    per_module = module_tensors(tensors, KEYS, source, "HiRA")
    for module_name, found in per_module.items():
        missing = [k for k in KEYS if k not in found]
        if missing:
            raise AdapterFormatError(f"{source}: '{module_name}' lacks {', '.join(missing)}; every HiRA layer has "
                                     f"{', '.join(KEYS)}")
        A, B = found["hira_A"], found["hira_B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise AdapterFormatError(f"{source}: '{module_name}' has hira_A {tuple(found['hira_A'].shape)} and hira_B "
                                     f"{tuple(found['hira_B'].shape)}; they should be (r x in) and (out x r) with one r")
    config = config_from_hf(hf, list(per_module))
    # each layer's rank as the file has it (PEFT 0.21.2 ignores rank_pattern when it builds layers)
    config.r, config.rank_pattern = peft_counts({m: f["hira_A"].shape[0] for m, f in per_module.items()}, config.r)
    modules = linear_modules(model, per_module, source, "HiRA")
    config.modules_to_save = present_modules_to_save(config.modules_to_save, modules)
    core.attach(model, config, name=name)
    for module_name, layer in core.adapter_layers(model, name):
        found, adapter = per_module[module_name], layer.adapters[name]
        expected = {k: tuple(getattr(adapter, k).shape) for k in KEYS}
        shapes = {k: tuple(v.shape) for k, v in found.items()}
        if shapes != expected:
            wrong = next(k for k in KEYS if shapes[k] != expected[k])
            raise AdapterFormatError(f"{source}: '{module_name}.{wrong}' is {shapes[wrong]}, but the layer implies "
                                     f"{expected[wrong]}; the weights were saved for another base model")
        adapter.load_state_dict(found)
