"""Hugging Face PEFT's (IA)^3 format (``peft_type: IA3``), read and written exactly.

``adapter_config.json`` is an ``IA3Config`` as PEFT writes it: ``target_modules``,
``feedforward_modules`` (those of the targets whose input, not output, is scaled; a subset of
``target_modules``), ``fan_in_fan_out`` (GPT-2's ``Conv1D``), ``init_ia3_weights``.
``adapter_model.safetensors`` holds one vector per module, ``base_model.model.<module path>.ia3_l``,
shaped (out, 1) for an output scale and (1, in) for an input scale. PEFT decides which modules
are feedforward from ``feedforward_modules`` (a list: a module whose name ends with an entry; a
string: a regex matching the whole name), and so does this reader; the shapes must agree.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import is_linear, named_base_modules
from ..errors import AdapterFormatError, IncompatibleBaseError
from ..methods.ia3 import IA3Config
from ..methods.lora import base_weight
from .hf_common import PREFIX, target_names

PEFT_TYPES = ("IA3",)
KEY = "ia3_l"


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "ia3"


def to_hf(model: nn.Module, name: str, config: IA3Config) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes an (IA)^3 adapter."""
    state = require_state(model)
    tensors, wrapped, feedforward, conv1d = {}, [], [], False
    for module_name, layer in core.adapter_layers(model, name):
        adapter = layer.adapters[name]
        for key, value in adapter.hf_state().items():
            tensors[f"{PREFIX}{module_name}.{key}"] = value
        wrapped.append(module_name)
        if adapter.feedforward:
            feedforward.append(module_name)
        conv1d = conv1d or type(layer.base_layer).__name__ == "Conv1D"
    target_modules, feedforward_modules = hf_names(model, wrapped, feedforward)
    hf = {
        "peft_type": "IA3",
        "base_model_name_or_path": state.base_name,
        "target_modules": target_modules,
        "feedforward_modules": feedforward_modules,
        "exclude_modules": None,
        "fan_in_fan_out": conv1d,
        "init_ia3_weights": True,
        "modules_to_save": list(config.modules_to_save) or None,
        "auto_mapping": None,
    }
    return hf, tensors


def hf_names(model: nn.Module, wrapped: list, feedforward: list) -> tuple[list, list]:
    """``target_modules`` and ``feedforward_modules``: short suffixes (``down_proj``) where PEFT's
    matching of them selects exactly these modules, full module names otherwise."""
    targets = target_names(wrapped, dict(named_base_modules(model)))
    leaves = sorted({m.split(".")[-1] for m in feedforward})
    if targets != sorted(wrapped) and {w for w in wrapped if peft_feedforward(leaves, w)} == set(feedforward):
        return targets, leaves
    return sorted(wrapped), sorted(feedforward)


def peft_feedforward(feedforward_modules, module_name: str) -> bool:
    """Whether PEFT treats ``module_name`` as a feedforward module (its input is scaled)."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, module_name) is not None
    return any(module_name.endswith(key) for key in feedforward_modules or [])


# ---- load ------------------------------------------------------------------------------------

def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the (IA)^3 adapter in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    vectors = {key[len(PREFIX):-len(KEY) - 1]: value for key, value in tensors.items()
               if key.startswith(PREFIX) and key.endswith("." + KEY)}
    if not vectors:
        raise AdapterFormatError(f"{source}: the weights file holds no (IA)^3 tensors (keys ending in '.{KEY}')")
    feedforward = sorted(m for m in vectors if peft_feedforward(hf.get("feedforward_modules"), m))
    _check_shapes(model, vectors, feedforward, source)
    base_names = [n for n, _ in named_base_modules(model)]
    # PEFT lists every head name the task might use (["classifier", "score"]); keep those this model has
    modules_to_save = [m for m in dict.fromkeys(hf.get("modules_to_save") or [])
                       if any(n == m or n.endswith("." + m) for n in base_names)]
    config = IA3Config(targets=sorted(vectors), feedforward=feedforward, modules_to_save=modules_to_save)
    config.validate()
    core.attach(model, config, name=name)
    with torch.no_grad():
        for module_name, layer in core.adapter_layers(model, name):
            layer.adapters[name].ia3_l.copy_(vectors[module_name].flatten())


def _check_shapes(model: nn.Module, vectors: dict, feedforward: list, source) -> None:
    modules = dict(named_base_modules(model))
    missing = [m for m in vectors if m not in modules]
    if missing:
        raise IncompatibleBaseError(f"{source} adapts modules this model does not have ({', '.join(missing[:3])}"
                                    f"{' ...' if len(missing) > 3 else ''}); it was saved for another base model")
    for module_name, vector in vectors.items():
        if not is_linear(modules[module_name]):
            raise AdapterFormatError(f"{source}: '{module_name}' is a {type(modules[module_name]).__name__}; peftlab's (IA)^3 "
                                     "scales linear layers only")
        out_features, in_features = base_weight(modules[module_name]).shape
        scales_input, scales_output = (1, in_features), (out_features, 1)
        want = scales_input if module_name in feedforward else scales_output
        if tuple(vector.shape) == want:
            continue
        if tuple(vector.shape) in (scales_input, scales_output):
            raise AdapterFormatError(f"{source}: '{module_name}.{KEY}' is {tuple(vector.shape)}, but feedforward_modules "
                                     f"implies {want}; the config and the weights do not belong together")
        raise IncompatibleBaseError(f"{source} was saved for a base whose '{module_name}' is not {out_features}x{in_features} "
                                    f"({KEY} is {tuple(vector.shape)}): wrong base model")
