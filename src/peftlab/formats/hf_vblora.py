"""Hugging Face PEFT's VB-LoRA format (``peft_type: VBLORA``), read and written exactly.

``adapter_config.json`` is a ``VBLoRAConfig`` as PEFT writes it (``r``, ``num_vectors``,
``vector_length``, ``topk``, ``vblora_dropout``, ``init_vector_bank_bound``, ``init_logits_std``,
``save_only_topk_weights``, ``bias: "none"``, ``fan_in_fan_out: false``). ``adapter_model.safetensors``
holds the one shared bank as ``base_model.vblora_vector_bank`` (num_vectors x vector_length) and,
per layer, ``base_model.model.<module path>.vblora_logits_A`` (r, in / length, num_vectors) and
``.vblora_logits_B`` (out / length, r, num_vectors); with ``save_only_topk_weights`` each logits
tensor is replaced by ``<name>_topk_indices`` (the top-k bank indices, in the smallest integer type
that holds ``num_vectors``) and ``<name>_topk_weights`` (the first k - 1 softmax weights), read back
as logits that are -inf outside the top-k (as PEFT does). Linear layers only; a file that trains
biases is refused clearly.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError, IncompatibleBaseError
from ..methods.vblora import VBLoRAConfig, logits_from_topk, topk_from_logits
from .hf_common import PREFIX, linear_modules, present_modules_to_save, refuse_base_training, target_names

PEFT_TYPES = ("VBLORA",)
KEYS = ("vblora_logits_A", "vblora_logits_B")
TOPK = ("_topk_indices", "_topk_weights")
BANK = "base_model.vblora_vector_bank"


def index_dtype(num_vectors: int) -> torch.dtype:
    """PEFT's choice: the smallest integer type for indices below ``num_vectors``."""
    return torch.uint8 if num_vectors < 2**8 else torch.int16 if num_vectors < 2**15 else torch.int32


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "vblora"


def to_hf(model: nn.Module, name: str, config: VBLoRAConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes a VB-LoRA."""
    state = require_state(model)
    tensors, modules, adapter = {}, [], None
    for module_name, layer in core.adapter_layers(model, name):
        adapter = layer.adapters[name]
        for key in KEYS:
            logits = getattr(adapter, key).detach()
            if config.save_only_topk_weights:
                index, weights = topk_from_logits(logits, config.topk)
                tensors[f"{PREFIX}{module_name}.{key}_topk_indices"] = index.to(index_dtype(config.num_vectors))
                tensors[f"{PREFIX}{module_name}.{key}_topk_weights"] = weights
            else:
                tensors[f"{PREFIX}{module_name}.{key}"] = logits
        modules.append(module_name)
    if adapter is not None:
        tensors[BANK] = adapter.bank().detach()
    hf = {
        "peft_type": "VBLORA",
        "base_model_name_or_path": state.base_name,
        "r": config.r,
        "num_vectors": config.num_vectors,
        "vector_length": adapter.vector_length if adapter is not None else config.vector_length,
        "topk": config.topk,
        "target_modules": target_names(modules, dict(named_base_modules(model))),
        "exclude_modules": None,
        "save_only_topk_weights": config.save_only_topk_weights,
        "vblora_dropout": config.dropout,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": list(config.modules_to_save) or None,
        "init_vector_bank_bound": config.init_vector_bank_bound,
        "init_logits_std": config.init_logits_std,
        "layers_to_transform": None,
        "layers_pattern": None,
        "auto_mapping": None,
    }
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def config_from_hf(hf: dict, modules: list) -> VBLoRAConfig:
    refuse_base_training(hf, "VB-LoRA")
    try:
        config = VBLoRAConfig(targets=sorted(modules), r=hf.get("r", 4), num_vectors=hf.get("num_vectors", 256),
                              vector_length=hf.get("vector_length", 256), topk=hf.get("topk", 2),
                              dropout=hf.get("vblora_dropout", 0.0),
                              init_vector_bank_bound=hf.get("init_vector_bank_bound", 0.02),
                              init_logits_std=hf.get("init_logits_std", 0.1),
                              save_only_topk_weights=hf.get("save_only_topk_weights", False),
                              modules_to_save=list(hf.get("modules_to_save") or []))
        config.validate()
    except (TypeError, ValueError, ConfigError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    return config


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the VB-LoRA in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    per_module = {}
    for key, value in tensors.items():
        if key == BANK:
            continue
        if not key.startswith(PREFIX):
            raise AdapterFormatError(f"{source}: unexpected tensor name {key!r}: keys should start with {PREFIX!r}")
        module_name, _, local = key[len(PREFIX):].rpartition(".")
        if local in KEYS or local.endswith(TOPK) and local.removesuffix("_topk_indices").removesuffix("_topk_weights") in KEYS:
            per_module.setdefault(module_name, {})[local] = value
    if not per_module:
        raise AdapterFormatError(f"{source}: the weights file holds no VB-LoRA tensors (keys ending in {', '.join(KEYS)})")
    if BANK not in tensors:
        raise AdapterFormatError(f"{source}: the weights file lacks the shared vector bank {BANK}; the file is incomplete")
    config = config_from_hf(hf, list(per_module))
    for module_name, local in per_module.items():
        per_module[module_name] = _logits(local, config, module_name, source)
    linear_modules(model, per_module, source, "VB-LoRA")
    base_names = [n for n, _ in named_base_modules(model)]
    config.modules_to_save = present_modules_to_save(config.modules_to_save, base_names)
    try:
        core.attach(model, config, name=name)
    except ConfigError as error:  # a vector_length that does not divide this model's widths
        raise IncompatibleBaseError(f"{source} does not fit this model: {error}") from None
    bank = None
    for module_name, layer in core.adapter_layers(model, name):
        local, adapter = per_module[module_name], layer.adapters[name]
        expected = {k: tuple(getattr(adapter, k).shape) for k in KEYS}
        found = {k: tuple(v.shape) for k, v in local.items()}
        if expected != found:
            raise AdapterFormatError(f"{source}: tensors for '{module_name}' are {found}, but the config (r, num_vectors, "
                                     f"vector_length) and the layer imply {expected}; the config and weights do not "
                                     "belong together")
        adapter.load_state_dict(local, strict=False)
        bank = adapter.bank()
    if tuple(bank.shape) != tuple(tensors[BANK].shape):
        raise AdapterFormatError(f"{source}: {BANK} is {tuple(tensors[BANK].shape)}, but num_vectors and vector_length "
                                 f"imply {tuple(bank.shape)}; the config and weights do not belong together")
    with torch.no_grad():
        bank.copy_(tensors[BANK])


def _logits(local: dict, config: VBLoRAConfig, module_name: str, source) -> dict:
    """The two logits tensors of one layer, rebuilt from the top-k form where the file has it."""
    out = {}
    for key in KEYS:
        if key in local:
            out[key] = local[key]
            continue
        index, weights = local.get(key + "_topk_indices"), local.get(key + "_topk_weights")
        if index is None or weights is None:
            raise AdapterFormatError(f"{source}: '{module_name}' lacks {key} (or its _topk_indices and _topk_weights); "
                                     "the file is incomplete")
        if index.shape[-1] != config.topk or weights.shape[-1] != config.topk - 1 or index.shape[:-1] != weights.shape[:-1]:
            raise AdapterFormatError(f"{source}: {key}_topk_indices {tuple(index.shape)} and _topk_weights "
                                     f"{tuple(weights.shape)} of '{module_name}' do not fit topk={config.topk}")
        if int(index.long().max()) >= config.num_vectors or int(index.long().min()) < 0:
            raise AdapterFormatError(f"{source}: '{module_name}' selects bank vectors outside 0..{config.num_vectors - 1}")
        out[key] = logits_from_topk(index, weights.float(), config.num_vectors)
    return out
