"""Hugging Face PEFT's LyCORIS formats, LoHa (``peft_type: LOHA``) and LoKr (``LOKR``), read and written exactly.

``adapter_config.json`` is a ``LoHaConfig`` / ``LoKrConfig`` as PEFT writes it (``r``, ``alpha``,
``rank_pattern``, ``alpha_pattern``, ``rank_dropout``, ``module_dropout``; LoKr adds
``decompose_both``, ``decompose_factor``, ``rank_dropout_scale`` and ``init_weights`` True or
"lycoris"). ``adapter_model.safetensors`` holds the parameters under PEFT's names,
``base_model.model.<module path>.hada_w1_a`` (LoHa: ``hada_w1_a/b``, ``hada_w2_a/b``) or
``.lokr_w1`` (LoKr: ``lokr_w1`` or ``lokr_w1_a/b``, ``lokr_w2`` or ``lokr_w2_a/b``), which are
the peftlab modules' own parameter names, so a module's state dict is its part of the file. Which
LoKr factors are full and which are rank-r pairs follows from the config (``methods/lokr.py``);
a file whose tensors disagree with its config is a format error. Linear layers, and Conv1d/Conv2d
in PEFT's default flattened form; PEFT's CP-decomposed convolution tensors (``use_effective_conv2d``:
``hada_t1``, ``lokr_t2``) are refused clearly.
"""
from __future__ import annotations

import re
from collections import Counter

from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError, IncompatibleBaseError
from ..methods.loha import CONVS, LohaConfig
from ..methods.lokr import LokrConfig
from .hf_common import PREFIX, linear_modules, present_modules_to_save, target_names

PEFT_TYPES = ("LOHA", "LOKR")
METHOD_OF = {"LOHA": "loha", "LOKR": "lokr"}
KEYS = {
    "LOHA": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "LOKR": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
}
CONV_KEYS = ("hada_t1", "hada_t2", "lokr_t2")  # PEFT's Conv2d/Conv1d CP decomposition


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method in ("loha", "lokr")


def to_hf(model: nn.Module, name: str, config) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes a LoHa or LoKr."""
    state = require_state(model)
    tensors, ranks, alphas = {}, {}, {}
    for module_name, layer in core.adapter_layers(model, name):
        adapter = layer.adapters[name]
        for key, value in adapter.state_dict().items():
            tensors[f"{PREFIX}{module_name}.{key}"] = value.detach()
        ranks[module_name], alphas[module_name] = adapter.r, adapter.alpha
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else config.r
    alpha = Counter(alphas.values()).most_common(1)[0][0] if alphas else config.alpha
    hf = {
        "peft_type": "LOHA" if config.method == "loha" else "LOKR",
        "base_model_name_or_path": state.base_name,
        "r": r,
        "alpha": alpha,
        "rank_pattern": {re.escape(m): v for m, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(m): v for m, v in alphas.items() if v != alpha},
        "rank_dropout": config.rank_dropout,
        "module_dropout": config.module_dropout,
        "use_effective_conv2d": False,
        "target_modules": target_names(list(ranks), dict(named_base_modules(model))),
        "exclude_modules": None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": list(config.modules_to_save) or None,
        "auto_mapping": None,
    }
    if config.method == "lokr":
        hf.update(decompose_both=config.decompose_both, decompose_factor=config.decompose_factor,
                  rank_dropout_scale=config.rank_dropout_scale,
                  init_weights="lycoris" if config.init == "lycoris" else True)
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def config_from_hf(hf: dict, modules: list):
    peft_type = hf.get("peft_type")
    common = dict(
        targets=sorted(modules),
        r=hf.get("r", 8),
        alpha=hf.get("alpha", 8),
        rank_pattern=dict(hf.get("rank_pattern") or {}),
        alpha_pattern=dict(hf.get("alpha_pattern") or {}),
        rank_dropout=hf.get("rank_dropout", 0.0),
        module_dropout=hf.get("module_dropout", 0.0),
        modules_to_save=list(hf.get("modules_to_save") or []),
    )
    try:
        if peft_type == "LOHA":
            config = LohaConfig(**common)
        else:
            config = LokrConfig(**common, decompose_both=hf.get("decompose_both", False),
                                decompose_factor=hf.get("decompose_factor", -1),
                                rank_dropout_scale=hf.get("rank_dropout_scale", False),
                                init="lycoris" if hf.get("init_weights") == "lycoris" else "default")
        config.validate()
    except (TypeError, ValueError, ConfigError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    return config


def split_keys(tensors: dict, peft_type: str, source) -> dict:
    """``{module path: {local key: tensor}}`` for the adapter tensors (saved modules are left to ``io``)."""
    per_module = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterFormatError(f"{source}: unexpected tensor name {key!r}: keys should start with {PREFIX!r}")
        module_name, _, local = key[len(PREFIX):].rpartition(".")
        if local in CONV_KEYS:
            raise AdapterFormatError(f"{source}: '{module_name}' holds PEFT's CP-decomposed convolution tensors ({local}, "
                                     "use_effective_conv2d=true); peftlab's LoHa and LoKr take convolutions in PEFT's "
                                     "default flattened form only: save the adapter with use_effective_conv2d=false")
        if local in KEYS[peft_type]:
            per_module.setdefault(module_name, {})[local] = value
    return per_module


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the LoHa or LoKr in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    peft_type = hf.get("peft_type")
    per_module = split_keys(tensors, peft_type, source)
    if not per_module:
        raise AdapterFormatError(f"{source}: the weights file holds no {METHOD_OF[peft_type]} tensors "
                                 f"(keys ending in {', '.join(KEYS[peft_type])})")
    config = config_from_hf(hf, list(per_module))
    _check_modules(model, per_module, source)
    base_names = [n for n, _ in named_base_modules(model)]
    # PEFT lists every head name the task might use (["classifier", "score"]); keep those this model has
    config.modules_to_save = present_modules_to_save(config.modules_to_save, base_names)
    core.attach(model, config, name=name)
    for module_name, layer in core.adapter_layers(model, name):
        local, adapter = per_module[module_name], layer.adapters[name]
        expected = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in local.items()}
        if expected != found:
            raise AdapterFormatError(f"{source}: tensors for '{module_name}' are {found}, but the config (r, "
                                     f"{'decompose_both, decompose_factor' if peft_type == 'LOKR' else 'rank_pattern'}) "
                                     f"implies {expected}; the config and weights do not belong together")
        adapter.load_state_dict(local)


def _check_modules(model: nn.Module, per_module: dict, source) -> None:
    convs = {n for n, m in named_base_modules(model) if n in per_module and isinstance(m, CONVS)}
    modules = linear_modules(model, {m: v for m, v in per_module.items() if m not in convs}, source, "LoHa/LoKr")
    modules.update({n: m for n, m in named_base_modules(model) if n in convs})
    for module_name in per_module:
        module = modules[module_name]
        local = per_module[module_name]
        if module_name in convs:  # the flattened kernel: (out x in/groups * k...)
            out_features, in_features = module.weight.shape[0], module.weight[0].numel()
        else:  # (a quantized linear's weight is packed)
            out_features, in_features = module.out_features, module.in_features
        got = _dense_shape(local)
        if got is not None and got != (out_features, in_features):
            raise IncompatibleBaseError(f"{source} was saved for a base whose '{module_name}' is {got[0]}x{got[1]}, but "
                                        f"this model's is {out_features}x{in_features}: wrong base model")


def _dense_shape(local: dict):
    """The (out x in) shape the tensors of one module stand for, or None when they are incomplete
    (the attach-time comparison of keys then names what is missing)."""
    if "hada_w1_a" in local and "hada_w1_b" in local:
        return local["hada_w1_a"].shape[0], local["hada_w1_b"].shape[-1]
    sides = []
    for which in ("w1", "w2"):
        full, a, b = (local.get(f"lokr_{which}{s}") for s in ("", "_a", "_b"))
        if full is not None and full.dim() >= 2:  # LoKr's full w2 of a conv keeps the kernel: (out_k, in_n, k...)
            sides.append((full.shape[0], full[0].numel()))
        elif a is not None and b is not None:
            sides.append((a.shape[0], b.shape[-1]))
        else:
            return None
    return sides[0][0] * sides[1][0], sides[0][1] * sides[1][1]
