"""Saving and loading adapters: one folder, two files, whichever method.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``, as Hugging Face
PEFT writes them. A method that PEFT also has is written in PEFT's exact format by its converter
(``hf_lora.py`` for LoRA and DoRA, ...), so the folder loads in ``peft`` and vLLM and theirs load
here. Every other method, and every union of methods (``"lora|prefix"``), is written in peftlab's
own format (``native.py``): ``"peft_type": "PEFTLAB"`` with the method configs in the JSON file.

peftlab adds one thing to both, inside the safetensors metadata where PEFT ignores it: the base
model's name and a fingerprint of its parameter names and shapes, so loading an adapter onto the
wrong base is a clear error instead of silent garbage. Only safetensors is ever read.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..core import adapters as core
from ..core.state import STATE_ATTR, get_state, require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError, IncompatibleBaseError
from ..quant import parameter_shape, quantization_record
from . import hf_adalora, hf_lora, native
from . import hf_adamss
from . import hf_adaption_prompt
from . import hf_beft
from . import hf_c3a
from . import hf_cartridge
from . import hf_cpt
from . import hf_deft
from . import hf_delora
from . import hf_fourierft
from . import hf_frod
from . import hf_glora
from . import hf_gralora
from . import hf_hira
from . import hf_hra
from . import hf_ia3
from . import hf_lily
from . import hf_ln_tuning
from . import hf_lycoris
from . import hf_miss
from . import hf_multitask_prompt
from . import hf_oft
from . import hf_osf
from . import hf_peanut
from . import hf_poly
from . import hf_prompt
from . import hf_psoft
from . import hf_pvera
from . import hf_randlora
from . import hf_road
from . import hf_shira
from . import hf_spot
from . import hf_supertuning
from . import hf_tinylora
from . import hf_trainable_tokens
from . import hf_unilora
from . import hf_vblora
from . import hf_vera
from . import hf_waveft
from .hf_common import COMMON_FIELDS, PREFIX
from .files import json_bytes, read_json, read_tensors, refuse_pickles, tensor_bytes, write_files

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# PEFT-format converters: each has PEFT_TYPES, writes(configs) -> bool, to_hf(model, name, config)
# -> (config dict, tensors) and from_hf(model, hf_config, tensors, name, source) -> None, and may set
# MODULES_PREFIX: where PEFT keeps that type's modules_to_save (prompt learning: "base_model.").
CONVERTERS = [
    hf_lora,
    hf_adalora,
    hf_ia3,
    hf_ln_tuning,
    hf_lycoris,
    hf_vera,
    hf_fourierft,
    hf_oft,
    hf_road,
    hf_delora,
    hf_gralora,
    hf_waveft,
    hf_shira,
    hf_c3a,
    hf_hra,
    hf_hira,
    hf_deft,
    hf_miss,
    hf_vblora,
    hf_randlora,
    hf_lily,
    hf_glora,
    hf_adamss,
    hf_peanut,
    hf_frod,
    hf_psoft,
    hf_poly,
    hf_trainable_tokens,
    hf_multitask_prompt,
    hf_cpt,
    hf_cartridge,
    hf_spot,
    hf_beft,
    hf_osf,
    hf_pvera,
    hf_unilora,
    hf_tinylora,
    hf_supertuning,
    hf_prompt,
    hf_adaption_prompt,
]


def fingerprint(model: nn.Module) -> str:
    """A hash of the base model's parameter names and shapes (adapters ignored; a quantized weight
    counts with its full-precision shape, so a model and its quantized copy match)."""
    digest = hashlib.sha256()
    for name, module in named_base_modules(model):
        for pname, p in module.named_parameters(recurse=False):
            digest.update(f"{name}.{pname}:{parameter_shape(module, pname, p)};".encode())
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
    """Write adapter ``name`` to ``out_dir`` (PEFT's format where PEFT has the method); returns the folder.

    Under torchrun only rank 0 writes. A model sharded by FSDP is gathered whole first, so there
    every rank must call ``save`` (as with any collective)."""
    from ..dist import fsdp, world

    with fsdp.gathered(model):
        return _save(model, Path(out_dir), name, write=world().main)


def _save(model: nn.Module, out: Path, name: str, write: bool) -> Path:
    state = require_state(model)
    state.check_known([name])
    if name in state.merged:
        raise ConfigError(f"adapter {name!r} is merged into the base; peftlab.unmerge it before saving")
    configs = state.configs[name]
    converter = next((c for c in CONVERTERS if c.writes(configs)), None)
    if converter is not None:
        hf, tensors = converter.to_hf(model, name, configs[0])
        hf.update(COMMON_FIELDS)
    else:
        hf, tensors = native.to_native(model, name, configs)
    hf.setdefault("task_type", task_type(model))
    hf.setdefault("base_model_name_or_path", state.base_name)
    tensors.update(saved_module_tensors(model, configs, getattr(converter, "MODULES_PREFIX", PREFIX)))
    metadata = {
        "format": "pt",
        "peftlab": json.dumps({"version": __version__, "base_fingerprint": fingerprint(model), "base_model": state.base_name,
                               "config": configs[0].to_dict(), "configs": [c.to_dict() for c in configs],
                               "base_quantization": quantization_record(model)}),
    }
    if write:  # both files or neither: a failed save never pairs new weights with an old config
        write_files({out / WEIGHTS_NAME: tensor_bytes(tensors, metadata), out / CONFIG_NAME: json_bytes(hf)})
    return out


def saved_module_tensors(model: nn.Module, configs, prefix: str = PREFIX) -> dict:
    """``modules_to_save`` (a classification head trained in full), under their own paths."""
    tensors = {}
    base_modules = dict(named_base_modules(model))
    for config in configs:
        for suffix in config.modules_to_save:
            for module_name, module in base_modules.items():
                if module_name == suffix or module_name.endswith("." + suffix):
                    for pname, p in module.named_parameters():
                        tensors[f"{prefix}{module_name}.{pname}"] = p
    return tensors


# ---- load ------------------------------------------------------------------------------------

def read_adapter(adapter_dir) -> tuple[dict, dict, dict]:
    """(adapter_config.json, tensors, peftlab metadata) of a saved adapter, with every check on the files."""
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


def load(model: nn.Module, adapter_dir, name: str = "default", *, check_base: bool = True) -> nn.Module:
    """Attach the adapter saved in ``adapter_dir`` to ``model`` as ``name`` and make it active."""
    hf, tensors, info = read_adapter(adapter_dir)
    peft_type = hf.get("peft_type")
    if peft_type == native.PEFT_TYPE:
        reader = native.from_native
    else:
        converter = next((c for c in CONVERTERS if peft_type in c.PEFT_TYPES), None)
        if converter is None:
            known = sorted({t for c in CONVERTERS for t in c.PEFT_TYPES} | {native.PEFT_TYPE})
            raise AdapterFormatError(f"{adapter_dir}: peft_type {peft_type!r} is not supported (supported: {', '.join(known)})")
        reader = converter.from_hf
    had_state = get_state(model) is not None
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    try:
        reader(model, hf, tensors, name, adapter_dir)  # checks the shapes it reads: the most specific errors
        load_saved_modules(model, tensors, adapter_dir)
        _check_fingerprint(model, info, adapter_dir, check_base)
    except BaseException:  # leave the model as it was
        state = get_state(model)
        if state is not None and name in state.configs:
            core.delete(model, name)
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        if not had_state and get_state(model) is not None:
            delattr(model, STATE_ATTR)
        raise
    return model


def _check_fingerprint(model, info: dict, adapter_dir, check_base: bool) -> None:
    saved = info.get("base_fingerprint")
    if check_base and saved and saved != fingerprint(model):
        raise IncompatibleBaseError(
            f"{adapter_dir} was saved for base model {info.get('base_model') or '?'} (fingerprint {saved}), but this model's "
            f"parameter names and shapes differ (fingerprint {fingerprint(model)}); load it onto the base it was trained on, "
            "or pass check_base=False if you know the architectures are compatible"
        )


def load_saved_modules(model: nn.Module, tensors: dict, adapter_dir) -> None:
    """Copy saved ``modules_to_save`` tensors (keys the reader did not claim) into the model."""
    base_modules = dict(named_base_modules(model))
    state = get_state(model)
    wanted = [m for configs in state.configs.values() for c in configs for m in c.modules_to_save] if state else []
    with torch.no_grad():
        for key, value in tensors.items():
            path = key[len(PREFIX):] if key.startswith(PREFIX) else key.removeprefix("base_model.")  # prompt learning
            module_name, _, pname = path.rpartition(".")
            if not any(module_name == m or module_name.endswith("." + m) for m in wanted):
                continue
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
