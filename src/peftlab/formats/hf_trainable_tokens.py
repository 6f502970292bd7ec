"""Hugging Face PEFT's trainable-tokens format (``peft_type: TRAINABLE_TOKENS``), read and written exactly.

``adapter_config.json`` is a ``TrainableTokensConfig`` as PEFT writes it: ``token_indices`` (the
ids, in the order of the rows), ``target_modules`` (the embedding's full module name, a string,
as PEFT fills it in from ``get_input_embeddings``), ``init_weights``. ``adapter_model.safetensors``
holds each wrapped table's rows (k x dim, their values, not differences) as
``base_model.model.<module path>.trainable_tokens_delta``; a head tied to the embeddings is written
too, with the same rows, as PEFT does, and on reading it follows the embedding's rows (the two
copies are one parameter here).
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError, IncompatibleBaseError
from ..methods.trainable_tokens import TrainableTokensConfig
from .hf_common import PREFIX, present_modules_to_save

PEFT_TYPES = ("TRAINABLE_TOKENS",)
KEY = "trainable_tokens_delta"


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "trainable_tokens"


def duplicate_parameters(hf: dict, shapes: dict) -> int:
    """How many of a file's numbers are a tied head's copy of the embedding's rows (``peftlab info``):
    ``target_modules`` names the tables that own rows; a tied head's entry is the other one."""
    owners = hf.get("target_modules") or []
    owners = {owners} if isinstance(owners, str) else set(owners)
    paths = {key.removeprefix(PREFIX).removesuffix("." + KEY): shape for key, shape in shapes.items()
             if key.endswith("." + KEY)}
    return sum(math.prod(shape) for path, shape in paths.items()
               if not any(path == t or path.endswith("." + t) for t in owners))


def to_hf(model: nn.Module, name: str, config: TrainableTokensConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes trainable tokens."""
    state = require_state(model)
    tensors, owners = {}, []
    for module_name, layer in core.adapter_layers(model, name):
        adapter = layer.adapters[name]
        values = adapter.values.detach()
        tensors[f"{PREFIX}{module_name}.{KEY}"] = values.clone() if adapter.tied else values  # two entries on disk
        if not adapter.tied:  # a tied head is PEFT's to add, as it does whenever the weights are tied
            owners.append(module_name)
    hf = {
        "peft_type": "TRAINABLE_TOKENS",
        "base_model_name_or_path": state.base_name,
        "token_indices": list(config.token_indices),
        "target_modules": owners[0] if len(owners) == 1 else owners,
        "init_weights": config.init == "copy",
        "auto_mapping": None,
    }
    if config.modules_to_save:  # not a field of PEFT's config (it warns and drops it); PEFT loads the head's
        hf["modules_to_save"] = list(config.modules_to_save)  # tensors into the base head by their paths
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def config_from_hf(hf: dict, modules: list) -> TrainableTokensConfig:
    try:
        config = TrainableTokensConfig(targets=["re:" + re.escape(m) for m in modules],
                                       token_indices=list(hf.get("token_indices") or []),
                                       init="copy" if hf.get("init_weights", True) else "random",
                                       modules_to_save=list(hf.get("modules_to_save") or []))
        config.validate()
    except (TypeError, ValueError, ConfigError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    return config


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the trainable tokens in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    per_module = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterFormatError(f"{source}: unexpected tensor name {key!r}: keys should start with {PREFIX!r}")
        module_name, _, local = key[len(PREFIX):].rpartition(".")
        if local == KEY:
            per_module[module_name] = value
    if not per_module:
        raise AdapterFormatError(f"{source}: the weights file holds no trainable-token rows (keys ending in {KEY})")
    modules = dict(named_base_modules(model))
    missing = [m for m in per_module if m not in modules]
    if missing:
        raise IncompatibleBaseError(f"{source} adapts modules this model does not have ({', '.join(missing[:3])}); "
                                    "it was saved for another base model")
    config = config_from_hf(hf, list(per_module))
    config.modules_to_save = present_modules_to_save(config.modules_to_save, modules)
    core.attach(model, config, name=name)
    load_rows(model, name, config, per_module, source)


def load_rows(model: nn.Module, name: str, config: TrainableTokensConfig, per_module: dict, source) -> None:
    """Copy each table's saved rows into adapter ``name`` (a tied head follows its embedding's)."""
    with torch.no_grad():
        for module_name, adapter in core.method_adapters(model, name, config.method):
            value = per_module.get(module_name)
            if adapter.tied or value is None:
                continue
            if tuple(value.shape) != tuple(adapter.values.shape):
                raise AdapterFormatError(f"{source}: '{module_name}' has rows of shape {tuple(value.shape)}, but "
                                         f"token_indices ({len(config.token_indices)} ids) and the table imply "
                                         f"{tuple(adapter.values.shape)}; the config and weights do not belong together")
            adapter.values.copy_(value)


# ---- LoRA files that train tokens too (LoraConfig(trainable_token_indices=...)) ----------------

LORA_KEY = "token_adapter." + KEY


def lora_token_config(hf: dict, tensors: dict, source) -> tuple[TrainableTokensConfig | None, dict]:
    """(the trainable tokens of a LoRA file, ``{module name: rows}``), or (None, {}) when it has none.
    PEFT's ``trainable_token_indices`` is a list of ids (for the input embeddings) or
    ``{module name: ids}``; one list of ids is read (PEFT's files with different ids per table are refused)."""
    indices = hf.get("trainable_token_indices")
    if not indices:
        return None, {}
    rows = {key[len(PREFIX):-len(LORA_KEY) - 1]: value for key, value in tensors.items()
            if key.startswith(PREFIX) and key.endswith("." + LORA_KEY)}
    if not rows:
        raise AdapterFormatError(f"{source}: trainable_token_indices is set but the weights file holds no token rows "
                                 f"(keys ending in {LORA_KEY})")
    if isinstance(indices, dict):
        lists = {tuple(v) for v in indices.values() if isinstance(v, (list, tuple))}
        if len(lists) != 1:
            raise AdapterFormatError(f"{source}: trainable_token_indices gives different ids per table ({indices}); "
                                     "peftlab reads one list of ids for all tables")
        indices = list(lists.pop())
    config = config_from_hf({"token_indices": indices, "init_weights": True}, list(rows))
    return config, rows
