"""Hugging Face PEFT's adapter format, read and written exactly.

A folder holds ``adapter_config.json`` (a ``LoraConfig`` as PEFT writes it) and
``adapter_model.safetensors`` with keys ``base_model.model.<module path>.lora_A.weight``,
``lora_B.weight``, ``lora_magnitude_vector`` (DoRA) and ``lora_embedding_A/B`` (embeddings);
``modules_to_save`` are stored under their own path. Such folders load in ``peft``
(``PeftModel.from_pretrained``) and vLLM, and theirs load here.

peftlab adds one thing, inside the safetensors metadata where PEFT ignores it: the base
model's name and a fingerprint of its parameter names and shapes, so loading an adapter onto
the wrong base is a clear error instead of silent garbage.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..core import adapters as core
from ..core.state import STATE_ATTR, get_state, require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError, IncompatibleBaseError
from ..methods.dora import DoraConfig
from ..methods.lora import LoraConfig
from .files import json_bytes, read_json, read_tensors, refuse_pickles, tensor_bytes, write_files

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
ADAPTER_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B")


def fingerprint(model: nn.Module) -> str:
    """A hash of the base model's parameter names and shapes (adapters ignored)."""
    digest = hashlib.sha256()
    for name, module in named_base_modules(model):
        for pname, p in module.named_parameters(recurse=False):
            digest.update(f"{name}.{pname}:{tuple(p.shape)};".encode())
    return digest.hexdigest()[:16]


def task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
                         ("ForConditionalGeneration", "SEQ_2_SEQ_LM")):
        if cls.endswith(suffix):
            return task
    return None


# ---- save ------------------------------------------------------------------------------------

def save(model: nn.Module, out_dir, name: str = "default") -> Path:
    """Write adapter ``name`` in HF PEFT format to ``out_dir``; returns the folder."""
    state = require_state(model)
    state.check_known([name])
    configs = state.configs[name]
    if len(configs) != 1 or not isinstance(configs[0], LoraConfig):
        raise ConfigError(f"adapter {name!r} ({'|'.join(c.method for c in configs)}): only single LoRA or DoRA adapters "
                          "have a file format so far")
    if name in state.merged:
        raise ConfigError(f"adapter {name!r} is merged into the base; peftlab.unmerge it before saving")
    config = configs[0]
    tensors, ranks, alphas, modules = {}, {}, {}, {}
    for module_name, layer in core.adapter_layers(model, name):
        local, r, alpha = layer.adapters[name].export_state()
        for key, value in local.items():
            tensors[f"{PREFIX}{module_name}.{key}"] = value
        ranks[module_name], alphas[module_name] = r, alpha
        modules[module_name] = layer.base_layer
    base_modules = dict(named_base_modules(model))
    for suffix in config.modules_to_save:
        for module_name, module in base_modules.items():
            if module_name == suffix or module_name.endswith("." + suffix):
                for pname, p in module.named_parameters():
                    tensors[f"{PREFIX}{module_name}.{pname}"] = p
    r, alpha = Counter(ranks.values()).most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]
    hf = {
        "peft_type": "LORA",
        "task_type": task_type(model),
        "base_model_name_or_path": state.base_name,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "use_dora": isinstance(config, DoraConfig),
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "target_modules": _target_names(list(modules), base_modules),
        "rank_pattern": {re.escape(m): v for m, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(m): v for m, v in alphas.items() if v != alpha},
        "fan_in_fan_out": any(type(m).__name__ == "Conv1D" for m in modules.values()),
        "modules_to_save": list(config.modules_to_save) or None,
        "bias": "none",
        "inference_mode": True,
        "peft_version": "0.21.2",
        "revision": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
    }
    metadata = {
        "format": "pt",
        "peftlab": json.dumps({"version": __version__, "base_fingerprint": fingerprint(model),
                               "base_model": state.base_name, "config": config.to_dict()}),
    }
    out = Path(out_dir)
    # both files or neither: a failed save never pairs new weights with an old config
    write_files({out / WEIGHTS_NAME: tensor_bytes(tensors, metadata), out / CONFIG_NAME: json_bytes(hf)})
    return out


def _target_names(wrapped: list, base_modules: dict) -> list:
    """Short suffixes (``q_proj``) when they select exactly the wrapped modules, as vLLM and
    PEFT users expect; full module names otherwise."""
    leaves = sorted({m.split(".")[-1] for m in wrapped})
    selected = {n for n in base_modules if n.split(".")[-1] in leaves}
    return leaves if selected == set(wrapped) else sorted(wrapped)


# ---- load ------------------------------------------------------------------------------------

def read_adapter(adapter_dir) -> tuple[dict, dict, dict]:
    """(HF config, tensors, peftlab metadata) of a saved adapter, with every check on the files."""
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise AdapterFormatError(f"adapter folder {folder} does not exist")
    if not (folder / WEIGHTS_NAME).exists():
        refuse_pickles(folder)
        raise AdapterFormatError(f"{folder} has no {WEIGHTS_NAME}; is this an adapter folder written by peftlab.save or peft?")
    if not (folder / CONFIG_NAME).exists():
        raise AdapterFormatError(f"{folder} has no {CONFIG_NAME}; the adapter folder is incomplete")
    hf = read_json(folder / CONFIG_NAME)
    tensors, metadata = read_tensors(folder / WEIGHTS_NAME)
    info = {}
    if "peftlab" in metadata:
        try:
            info = json.loads(metadata["peftlab"])
        except json.JSONDecodeError:
            raise AdapterFormatError(f"{folder / WEIGHTS_NAME}: the peftlab metadata is corrupt") from None
    return hf, tensors, info


def config_from_hf(hf: dict, modules: list) -> LoraConfig:
    peft_type = hf.get("peft_type")
    if peft_type != "LORA":
        raise AdapterFormatError(f"peft_type {peft_type!r} is not supported yet (supported: LORA, with or without DoRA)")
    init = hf.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(("pissa", "olora", "corda", "eva", "loftq")):
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
            init="gaussian" if init == "gaussian" else "default",
            rank_pattern=dict(hf.get("rank_pattern") or {}),
            alpha_pattern=dict(hf.get("alpha_pattern") or {}),
            modules_to_save=list(hf.get("modules_to_save") or []),
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


def load(model: nn.Module, adapter_dir, name: str = "default", *, check_base: bool = True) -> nn.Module:
    """Attach the adapter saved in ``adapter_dir`` to ``model`` as ``name`` and make it active."""
    hf, tensors, info = read_adapter(adapter_dir)
    per_module, others = split_keys(tensors)
    if not per_module:
        raise AdapterFormatError(f"{adapter_dir}: the weights file holds no LoRA tensors")
    config = config_from_hf(hf, list(per_module))
    _check_base(model, per_module, info, adapter_dir, check_base)
    # PEFT writes every head name it might use for the task (["classifier", "score"] for SEQ_CLS,
    # whatever the model has); keep those this model has.
    base_names = [n for n, _ in named_base_modules(model)]
    config.modules_to_save = [m for m in dict.fromkeys(config.modules_to_save)
                              if any(n == m or n.endswith("." + m) for n in base_names)]
    had_state = get_state(model) is not None
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    core.attach(model, config, name=name)
    try:
        for module_name, layer in core.adapter_layers(model, name):
            local = per_module[module_name]
            adapter = layer.adapters[name]
            expected = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
            found = {k: tuple(v.shape) for k, v in local.items()}
            if expected != found:
                raise AdapterFormatError(f"{adapter_dir}: tensors for '{module_name}' are {found}, but the config "
                                         f"(r, use_dora) implies {expected}; the config and weights do not belong together")
            adapter.load_state_dict(local)
        base_modules = dict(named_base_modules(model))
        with torch.no_grad():
            for path, value in others.items():
                module_name, _, pname = path.rpartition(".")
                target = base_modules.get(module_name)
                if target is None or not hasattr(target, pname):
                    continue  # e.g. a base embedding PEFT saves alongside an embedding LoRA
                current = getattr(target, pname)
                if tuple(current.shape) != tuple(value.shape):
                    raise IncompatibleBaseError(
                        f"{adapter_dir}: saved '{path}' is {tuple(value.shape)}, but this model's is {tuple(current.shape)} "
                        "(e.g. a classification head for a different number of labels): wrong base model"
                    )
                current.copy_(value)
    except BaseException:  # leave the model as it was
        core.delete(model, name)
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        if not had_state:
            delattr(model, STATE_ATTR)
        raise
    return model


def _check_base(model, per_module: dict, info: dict, adapter_dir, check_base: bool) -> None:
    modules = dict(named_base_modules(model))
    missing = [m for m in per_module if m not in modules]
    if missing:
        raise IncompatibleBaseError(
            f"{adapter_dir} adapts modules this model does not have ({', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''}); it was saved for {info.get('base_model') or 'another base model'}"
        )
    for module_name, local in per_module.items():
        module = modules[module_name]
        if isinstance(module, nn.Embedding):
            want = (module.embedding_dim, module.num_embeddings)
            pair = ("lora_embedding_B", "lora_embedding_A")
        else:
            w = module.weight
            want = tuple(w.t().shape if type(module).__name__ == "Conv1D" else w.shape)
            pair = ("lora_B.weight", "lora_A.weight")
        got = None
        if all(k in local and local[k].dim() == 2 for k in pair):
            got = (local[pair[0]].shape[0], local[pair[1]].shape[1])
        if got is None:
            raise AdapterFormatError(f"{adapter_dir}: '{module_name}' has an incomplete set of tensors {sorted(local)}")
        if tuple(got) != tuple(want):
            raise IncompatibleBaseError(
                f"{adapter_dir} was saved for a base whose '{module_name}' is {got[0]}x{got[1]}, but this model's is "
                f"{want[0]}x{want[1]}: wrong base model (saved for {info.get('base_model') or 'an unknown base'})"
            )
    saved = info.get("base_fingerprint")
    if check_base and saved and saved != fingerprint(model):
        raise IncompatibleBaseError(
            f"{adapter_dir} was saved for base model {info.get('base_model') or '?'} (fingerprint {saved}), but this model's "
            f"parameter names and shapes differ (fingerprint {fingerprint(model)}); load it onto the base it was trained on, "
            "or pass check_base=False if you know the architectures are compatible"
        )
