"""Hugging Face PEFT's orthogonal formats, OFT (``peft_type: OFT``) and BOFT (``BOFT``), read and written exactly.

OFT: ``adapter_config.json`` is an ``OFTConfig`` as PEFT writes it (``r`` / ``oft_block_size``,
one of them 0; ``module_dropout``, ``coft``, ``eps``, ``block_share``, ``use_cayley_neumann``,
``num_cayley_neumann_terms``); ``adapter_model.safetensors`` holds one tensor per layer,
``base_model.model.<module path>.oft_R.weight`` (blocks x b(b-1)/2, one row with block_share),
which is the peftlab module's own state dict. A layer's block size is read from its tensor and
must be what the config gives that layer (``methods/oft.py``: PEFT's default 32 falls back to the
nearest divisor of the width, as in PEFT). PEFT's ``r=0, oft_block_size=32`` is peftlab's unset
default, so such files load with the same per-layer fallback.

BOFT: a ``BOFTConfig`` (``boft_block_size`` / ``boft_block_num``, ``boft_n_butterfly_factor``,
``boft_dropout``); per layer ``.boft_R`` (factors x blocks x b x b) and ``.boft_s`` (out x 1).
The number of butterfly factors is read from ``boft_R``'s first dimension, not the config: PEFT
without its CUDA extension (any CPU) quietly builds one factor whatever
``boft_n_butterfly_factor`` says and writes that value unchanged, so its files say 2 and hold 1.
peftlab's files hold the factors their config names; PEFT reads those with more than one factor
only where its CUDA extension loads (it raises a shape mismatch on CPU).

Linear layers only; files that train biases or target GPT-2's Conv1D are refused clearly.
"""
from __future__ import annotations

from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError, IncompatibleBaseError
from ..methods.boft import BoftConfig
from ..methods.oft import DEFAULT_BLOCK_SIZE, OftConfig
from .hf_common import PREFIX, linear_modules, present_modules_to_save, refuse_base_training, target_names

PEFT_TYPES = ("OFT", "BOFT")
METHOD_OF = {"OFT": "oft", "BOFT": "boft"}
KEYS = {"OFT": ("oft_R.weight",), "BOFT": ("boft_R", "boft_s")}


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method in METHOD_OF.values()


def to_hf(model: nn.Module, name: str, config) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes an OFT or BOFT."""
    state = require_state(model)
    tensors, modules = {}, []
    for module_name, layer in core.adapter_layers(model, name):
        for key, value in layer.adapters[name].state_dict().items():
            tensors[f"{PREFIX}{module_name}.{key}"] = value.detach()
        modules.append(module_name)
    hf = {
        "base_model_name_or_path": state.base_name,
        "target_modules": target_names(modules, dict(named_base_modules(model))),
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "bias": "none",
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": list(config.modules_to_save) or None,
        "auto_mapping": None,
    }
    if config.method == "oft":
        unset = not config.r and not config.block_size
        hf.update(peft_type="OFT", r=config.r, oft_block_size=DEFAULT_BLOCK_SIZE if unset else config.block_size,
                  module_dropout=config.module_dropout, coft=config.coft, eps=config.eps, block_share=config.block_share,
                  use_cayley_neumann=config.use_cayley_neumann, num_cayley_neumann_terms=config.num_cayley_neumann_terms)
    else:
        unset = not config.block_size and not config.block_num
        hf.update(peft_type="BOFT", boft_block_size=4 if unset else config.block_size, boft_block_num=config.block_num,
                  boft_n_butterfly_factor=config.n_butterfly_factor, boft_dropout=config.dropout)
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def config_from_hf(hf: dict, modules: list, factors: int = 1):
    refuse_base_training(hf, hf.get("peft_type"))
    common = dict(targets=sorted(modules), modules_to_save=list(hf.get("modules_to_save") or []))
    try:
        if hf.get("peft_type") == "OFT":
            if "oft_block_size" not in hf:
                raise ConfigError("the file has no oft_block_size: it was written by PEFT before 0.14, whose OFT "
                                  "parameterisation PEFT itself no longer reads")
            r, block_size = hf.get("r", 0), hf.get("oft_block_size", 0)
            if block_size == DEFAULT_BLOCK_SIZE and not r:
                block_size = 0  # PEFT's default: the per-layer nearest-divisor fallback, as PEFT applies it
            config = OftConfig(**common, r=r, block_size=block_size, module_dropout=hf.get("module_dropout", 0.0),
                               coft=hf.get("coft", False), eps=hf.get("eps", 6e-5), block_share=hf.get("block_share", False),
                               use_cayley_neumann=hf.get("use_cayley_neumann", True),
                               num_cayley_neumann_terms=hf.get("num_cayley_neumann_terms", 5))
        else:
            config = BoftConfig(**common, block_size=hf.get("boft_block_size", 4), block_num=hf.get("boft_block_num", 0),
                                n_butterfly_factor=factors, dropout=hf.get("boft_dropout", 0.0))
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
        rest = key[len(PREFIX):]
        for local in KEYS[peft_type]:
            if rest.endswith("." + local):
                per_module.setdefault(rest[: -len(local) - 1], {})[local] = value
    return per_module


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the OFT or BOFT in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    peft_type = hf.get("peft_type")
    per_module = split_keys(tensors, peft_type, source)
    if not per_module:
        raise AdapterFormatError(f"{source}: the weights file holds no {METHOD_OF[peft_type]} tensors "
                                 f"(keys ending in {', '.join(KEYS[peft_type])})")
    config = config_from_hf(hf, list(per_module), _factors(per_module, peft_type, hf, source))
    modules = linear_modules(model, per_module, source, peft_type)
    _check_widths(modules, per_module, peft_type, source)
    base_names = [n for n, _ in named_base_modules(model)]
    # PEFT lists every head name the task might use (["classifier", "score"]); keep those this model has
    config.modules_to_save = present_modules_to_save(config.modules_to_save, base_names)
    try:
        core.attach(model, config, name=name)
    except ConfigError as error:
        raise AdapterFormatError(f"{source}: {error}") from None
    for module_name, layer in core.adapter_layers(model, name):
        local, adapter = per_module[module_name], layer.adapters[name]
        expected = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in local.items()}
        if expected != found:
            raise AdapterFormatError(f"{source}: tensors for '{module_name}' are {found}, but the config's block settings "
                                     f"and the layer imply {expected}; the config and weights do not belong together")
        adapter.load_state_dict(local)


def _check_widths(modules: dict, per_module: dict, peft_type: str, source) -> None:
    for module_name, local in per_module.items():
        module = modules[module_name]
        if peft_type == "OFT":
            continue  # OFT's tensors do not name the widths; the attach-time shape check covers them
        s = local.get("boft_s")
        if s is not None and s.shape[0] != module.out_features:
            raise IncompatibleBaseError(f"{source} was saved for a base whose '{module_name}' has {s.shape[0]} outputs, "
                                        f"but this model's has {module.out_features}: wrong base model")


def _factors(per_module: dict, peft_type: str, hf: dict, source) -> int:
    """BOFT's number of butterfly factors, from the tensors (PEFT on CPU writes the config's count but
    builds, and saves, one factor)."""
    if peft_type != "BOFT":
        return 1
    counts = {tuple(local["boft_R"].shape)[:1] for local in per_module.values() if "boft_R" in local}
    if len(counts) > 1 or any(local["boft_R"].dim() != 4 for local in per_module.values() if "boft_R" in local):
        raise AdapterFormatError(f"{source}: the layers' boft_R tensors disagree on the number of butterfly factors "
                                 f"({sorted(counts)}) or are not factors x blocks x b x b")
    return counts.pop()[0] if counts else hf.get("boft_n_butterfly_factor", 1)
