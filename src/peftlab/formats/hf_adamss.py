"""Hugging Face PEFT's AdaMSS format (``peft_type: ADAMSS``), read and written exactly.

``adapter_config.json`` is an ``AdamssConfig`` as PEFT writes it (``r``, ``num_subspaces``,
``subspace_rank``, ``random_seed``, ``use_dynamic_rank``, ``svd_threshold``, ``init_weights``
("orthogonal" or null) and the ASA settings). ``adapter_model.safetensors`` holds, per layer,
``base_model.model.<module path>.adamss_A.<k>`` (r_k x R) and ``adamss_B.<k>`` (|I_k| x r_k) for
each subspace ``k`` and the frozen basis ``adamss_newB`` (R x in, +1 column for a bias). The row
groups are not in the file: peftlab, like PEFT, recomputes them from the base weight (seeded SVD,
K-means), checks that the file's subspace count and shapes agree, and takes ``adamss_newB`` from
the file. Linear layers only.
"""
from __future__ import annotations

import re

from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError
from ..methods.adamss import AdamssConfig
from .hf_common import PREFIX, linear_modules, present_modules_to_save, refuse_base_training, target_names

PEFT_TYPES = ("ADAMSS",)
KEY = re.compile(r"(?P<module>.+)\.(?:(?P<part>adamss_A|adamss_B)\.(?P<k>\d+)|adamss_newB)")
ASA = ("use_asa", "asa_target_subspaces", "init_warmup", "final_warmup", "mask_interval", "asa_importance_beta",
       "asa_uncertainty_beta", "asa_schedule_exponent")
SETTINGS = ("r", "num_subspaces", "subspace_rank", "random_seed", "use_dynamic_rank", "svd_threshold", *ASA)


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "adamss"


def to_hf(model: nn.Module, name: str, config: AdamssConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes an AdaMSS."""
    state = require_state(model)
    tensors, modules = {}, []
    for module_name, layer in core.adapter_layers(model, name):
        for key, value in layer.adapters[name].state_dict().items():
            tensors[f"{PREFIX}{module_name}.{key}"] = value.detach()
        modules.append(module_name)
    hf = {
        "peft_type": "ADAMSS",
        "base_model_name_or_path": state.base_name,
        **{key: getattr(config, key) for key in SETTINGS},
        "init_weights": "orthogonal" if config.init == "orthogonal" else None,
        "target_modules": target_names(modules, dict(named_base_modules(model))),
        "modules_to_save": list(config.modules_to_save) or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "auto_mapping": None,
    }
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def config_from_hf(hf: dict, modules: list) -> AdamssConfig:
    refuse_base_training(hf, "AdaMSS")
    defaults = AdamssConfig()
    try:
        config = AdamssConfig(targets=sorted(modules), **{key: hf.get(key, getattr(defaults, key)) for key in SETTINGS},
                              init="orthogonal" if hf.get("init_weights", "orthogonal") == "orthogonal" else "random",
                              modules_to_save=list(hf.get("modules_to_save") or []))
        config.validate()
    except (TypeError, ValueError, ConfigError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    return config


def grouped(tensors: dict, source) -> dict:
    """``{module path: {local key: tensor}}`` of a file's AdaMSS tensors (others, a head's, pass)."""
    per_module: dict = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterFormatError(f"{source}: unexpected tensor name {key!r}: keys should start with {PREFIX!r}")
        match = KEY.fullmatch(key[len(PREFIX):])
        if match:
            local = key[len(PREFIX) + len(match["module"]) + 1:]
            per_module.setdefault(match["module"], {})[local] = value
        elif ".adamss_" in key:
            raise AdapterFormatError(f"{source}: unexpected tensor {key!r}: AdaMSS tensors are <module>.adamss_A.<k>, "
                                     "adamss_B.<k> and adamss_newB")
    if not per_module:
        raise AdapterFormatError(f"{source}: the weights file holds no AdaMSS tensors (keys ending in adamss_A.<k>, "
                                 "adamss_B.<k> or adamss_newB)")
    return per_module


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the AdaMSS in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    per_module = grouped(tensors, source)
    config = config_from_hf(hf, list(per_module))
    modules = linear_modules(model, per_module, source, "AdaMSS")
    config.modules_to_save = present_modules_to_save(config.modules_to_save, modules)
    core.attach(model, config, name=name)
    for module_name, layer in core.adapter_layers(model, name):
        adapter, found = layer.adapters[name], per_module[module_name]
        expected = {key: tuple(value.shape) for key, value in adapter.state_dict().items()}
        got = {key: tuple(value.shape) for key, value in found.items()}
        if got != expected:
            raise AdapterFormatError(
                f"{source}: '{module_name}' holds {len([k for k in got if k.startswith('adamss_A.')])} subspaces of "
                f"shapes {sorted(got.items())}, but the config and this base weight's clustering give "
                f"{sorted(expected.items())}; the config and weights do not belong together (or the base is another "
                "model: AdaMSS's row groups are recomputed from the base weight)")
        adapter.load_state_dict(found)
