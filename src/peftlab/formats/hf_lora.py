"""Hugging Face PEFT's LoRA format (``peft_type: LORA``, with or without DoRA), read and written exactly.

``adapter_config.json`` is a ``LoraConfig`` as PEFT writes it; ``adapter_model.safetensors`` has
keys ``base_model.model.<module path>.lora_A.weight``, ``lora_B.weight``, ``lora_B.bias``
(``lora_bias: true``), ``lora_magnitude_vector`` (DoRA) and ``lora_embedding_A/B`` (embeddings);
on a convolution ``lora_A.weight`` is (r, in, k...) and ``lora_B.weight`` (out, r / groups, 1...). With
``target_parameters`` the tensors of a parameter sit under its owning module, one ``base_layer.`` per
PEFT wrapper nested around it (the first registered parameter innermost: ``methods/lora_params.py``).
EVA adapters (``init=eva``) are plain LoRAs on the unchanged base whose ranks EVA chose (``rank_pattern``), written
with ``init_lora_weights: "eva"`` and an ``eva_config`` as PEFT does. PiSSA, OLoRA, CorDA and LoRA-GA adapters are
written as the plain LoRA of rank 2r on the original base that PEFT
writes with ``path_initial_model_for_weight_conversion`` (``init_lora_weights: true``). Such folders load in ``peft``
(``PeftModel.from_pretrained``) and vLLM, and theirs load here. ``io.py`` does the files, the
base-model fingerprint and ``modules_to_save``.
"""
from __future__ import annotations

import re
from collections import Counter

from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, IncompatibleBaseError, TargetError
from ..methods.dora import DoraConfig
from ..methods.lora import LoraConfig, base_weight, is_conv, replicate_layers
from . import hf_trainable_tokens
from .hf_common import PREFIX, present_modules_to_save, target_names

PEFT_TYPES = ("LORA",)
ADAPTER_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B")


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method in ("lora", "dora", "lora_fa")  # LoRA-FA is a LoRA at inference


def to_hf(model: nn.Module, name: str, config: LoraConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes a LoRA."""
    state = require_state(model)
    tensors, ranks, alphas, modules, params = {}, {}, {}, {}, []
    for module_name, layer in core.adapter_layers(model, name):
        if hasattr(layer.adapters[name], "hf_params"):  # target_parameters: PEFT's nested wrappers' names
            for pname, local, r, alpha in layer.adapters[name].hf_params():
                tensors.update({f"{PREFIX}{module_name}.{key}": value for key, value in local.items()})
                full = f"{module_name}.{pname}"
                ranks[full], alphas[full] = r, alpha
                params.append(full)
            continue
        local, r, alpha = layer.adapters[name].hf_state()
        for key, value in local.items():
            tensors[f"{PREFIX}{module_name}.{key}"] = value
        ranks[module_name], alphas[module_name] = r, alpha
        modules[module_name] = layer.base_layer
    base_modules = dict(named_base_modules(model))
    r, alpha = Counter(ranks.values()).most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]
    if config.init == "eva":  # as PEFT: the configured r, EVA's ranks in rank_pattern
        r, alpha = config.r, config.alpha
    hf = {
        "peft_type": "LORA",
        "base_model_name_or_path": state.base_name,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "use_dora": isinstance(config, DoraConfig),
        "init_lora_weights": config.init if config.init in ("gaussian", "eva") else True,
        "target_modules": target_names(list(modules), base_modules),
        "rank_pattern": {re.escape(m): v for m, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(m): v for m, v in alphas.items() if v != alpha},
        "fan_in_fan_out": any(type(m).__name__ == "Conv1D" for m in modules.values()),
        "modules_to_save": list(config.modules_to_save) or None,
        "bias": "none",
        "lora_bias": bool(getattr(config, "lora_bias", False)),
        "layers_to_transform": None,
        "layer_replication": getattr(config, "layer_replication", None),
        "layers_pattern": None,
        "exclude_modules": None,
        "target_parameters": params or None,
    }
    if config.init == "eva":  # PEFT's EvaConfig as it writes it (peftlab's EVA: its defaults but rho)
        hf["eva_config"] = {"rho": float(config.eva_rho), "tau": 0.99, "use_label_mask": True, "label_mask_value": -100,
                            "whiten": False, "adjust_scaling_factors": False}
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def config_from_hf(hf: dict, modules: list) -> LoraConfig:
    peft_type = hf.get("peft_type")
    if peft_type != "LORA":
        raise AdapterFormatError(f"peft_type {peft_type!r} is not supported yet (supported: LORA, with or without DoRA)")
    init = hf.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(("pissa", "olora", "corda", "loftq", "lora_ga")):
        raise AdapterFormatError(f"this adapter was saved with init_lora_weights={init!r}, so it only fits that init's modified "
                                 "base; re-save it from peft with path_initial_model_for_weight_conversion to get a plain LoRA")
    cls = DoraConfig if hf.get("use_dora") else LoraConfig
    try:
        config = cls(
            targets=sorted(modules),
            r=int(hf.get("r", 8)),
            alpha=hf.get("lora_alpha", 8),
            dropout=float(hf.get("lora_dropout", 0.0)),
            rslora=bool(hf.get("use_rslora", False)),
            init=init if init in ("gaussian", "eva") else "default",  # an EVA file is a plain LoRA on the base
            eva_rho=(hf.get("eva_config") or {}).get("rho", 2.0) if init == "eva" else 2.0,
            rank_pattern=dict(hf.get("rank_pattern") or {}),
            alpha_pattern=dict(hf.get("alpha_pattern") or {}),
            modules_to_save=list(hf.get("modules_to_save") or []),
            lora_bias=hf.get("lora_bias") or False,
            layer_replication=hf.get("layer_replication") or None,
            target_parameters=hf.get("target_parameters") or None,
        )
        config.validate()
    except (TypeError, ValueError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    return config


def split_keys(tensors: dict) -> tuple[dict, dict]:
    """``{module path: {local key: tensor}}`` for adapter tensors, and the other (saved module) tensors."""
    per_module, others = {}, {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterFormatError(f"unexpected tensor name {key!r}: keys should start with {PREFIX!r}")
        path = key[len(PREFIX):]
        suffix = next((s for s in ADAPTER_SUFFIXES if path.endswith("." + s)), None)
        if suffix is None:
            others[path] = value
        else:
            per_module.setdefault(path[: -len(suffix) - 1], {})[suffix] = value
    return per_module, others


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the LoRA in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    per_module, _ = split_keys(tensors)
    if not per_module:
        raise AdapterFormatError(f"{source}: the weights file holds no LoRA tensors")
    owners = {}
    if hf.get("target_parameters"):  # PEFT nests a wrapper per parameter: <module>(.base_layer)*.lora_A.weight
        owners = _parameter_owners(model, hf, source)
        for path in sorted(per_module, key=len, reverse=True):
            owner = re.sub(r"(\.base_layer)+$", "", path)
            if owner in owners:
                prefix = path[len(owner) + 1:] + "." if path != owner else ""
                owners[owner].update({prefix + k: v for k, v in per_module.pop(path).items()})
    config = config_from_hf(hf, list(per_module))
    if config.layer_replication is not None:  # the saved module paths are those of the replicated layers
        replicate_layers(model, config.layer_replication)
    _check_shapes(model, per_module, source)
    # PEFT writes every head name it might use for the task (["classifier", "score"] for SEQ_CLS,
    # whatever the model has); keep those this model has.
    base_names = [n for n, _ in named_base_modules(model)]
    config.modules_to_save = present_modules_to_save(config.modules_to_save, base_names)
    tokens, rows = hf_trainable_tokens.lora_token_config(hf, tensors, source)  # trainable_token_indices
    core.attach(model, [config, tokens] if tokens else config, name=name)
    if tokens:
        hf_trainable_tokens.load_rows(model, name, tokens, rows, source)
    for module_name, layer in core.adapter_layers(model, name):
        adapter = layer.adapters[name]
        if module_name in owners:
            adapter.load_hf(owners[module_name], source, module_name)
            continue
        if module_name not in per_module:
            continue  # a table whose token rows are loaded above
        local = per_module[module_name]
        expected = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in local.items()}
        if expected != found:
            raise AdapterFormatError(f"{source}: tensors for '{module_name}' are {found}, but the config "
                                     f"(r, use_dora) implies {expected}; the config and weights do not belong together")
        adapter.load_state_dict(local)


def _parameter_owners(model, hf: dict, source) -> dict:
    """``{module name: {}}`` for the modules whose parameters the file's ``target_parameters`` name."""
    from ..methods.lora_params import matched_parameters

    wanted = hf["target_parameters"]
    if not (isinstance(wanted, list) and all(isinstance(t, str) and t for t in wanted)):
        raise AdapterFormatError(f"{source}: target_parameters must be a list of parameter names, got {wanted!r}")
    probe = LoraConfig(targets=[], target_parameters=list(wanted))
    try:
        found = matched_parameters(model, probe)
    except TargetError as error:
        raise IncompatibleBaseError(f"{source} was saved for another base model: {error}") from None
    return {module_name: {} for module_name in found}


def _check_shapes(model, per_module: dict, adapter_dir) -> None:
    modules = dict(named_base_modules(model))
    missing = [m for m in per_module if m not in modules]
    if missing:
        raise IncompatibleBaseError(
            f"{adapter_dir} adapts modules this model does not have ({', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''}); it was saved for another base model"
        )
    for module_name, local in per_module.items():
        module = modules[module_name]
        dims = 2
        if isinstance(module, nn.Embedding):
            want = (module.embedding_dim, module.num_embeddings)
            pair = ("lora_embedding_B", "lora_embedding_A")
        elif is_conv(module):  # (out, r, 1...) and (r, in, k...): compare channels; the kernel by the state dict
            want, dims = (module.out_channels, module.in_channels), module.weight.dim()
            pair = ("lora_B.weight", "lora_A.weight")
        else:
            want = tuple(base_weight(module).shape)
            pair = ("lora_B.weight", "lora_A.weight")
        got = None
        if all(k in local and local[k].dim() == dims for k in pair):
            got = (local[pair[0]].shape[0], local[pair[1]].shape[1])
        if got is None:
            raise AdapterFormatError(f"{adapter_dir}: '{module_name}' has an incomplete set of tensors {sorted(local)}")
        if tuple(got) != tuple(want):
            raise IncompatibleBaseError(
                f"{adapter_dir} was saved for a base whose '{module_name}' is {got[0]}x{got[1]}, but this model's is "
                f"{want[0]}x{want[1]}: wrong base model"
            )
