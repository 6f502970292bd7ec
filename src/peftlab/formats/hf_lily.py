"""Hugging Face PEFT's LiLy format (``peft_type: LILY``), read and written exactly.

``adapter_config.json`` is a ``LilyConfig`` as PEFT writes it (``r``, ``stride_A``, ``num_B``,
``scaling``, ``init_weights``, ``target_modules``, ``exclude_modules``). ``adapter_model.safetensors``
holds, for every adapted layer, ``base_model.model.<module path>.lily_A.weight`` (r x in),
``.lily_B.weight`` (num_B * r x out: the experts stacked) and ``.lily_router.weight`` (num_B x r).
A tensor shared by several layers is written under each of them (PEFT does the same), so the file
does not record the sharing: PEFT derives it when loading, from ``target_modules``. A list
groups layers by the entry each one's path ends with (and weight shape), a regex string by shape
alone. So the writer picks the form that gives peftlab's groups (``share_by``): leaf names, with
``exclude_modules`` naming what they would catch beyond the adapted layers ("name"); one regex
for exactly the adapted paths ("shape"); the full paths ("layer"). The reader finds which rule
reproduces PEFT's groups, refuses a file none does, and refuses copies of one shared tensor
that differ.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError
from ..methods.lily import SHARE_RULES, LilyConfig, sharing
from .hf_common import PREFIX, linear_modules, present_modules_to_save

PEFT_TYPES = ("LILY",)
KEYS = ("lily_A", "lily_B", "lily_router")
KEY = re.compile(r"^(.*)\.(lily_A|lily_B|lily_router)\.weight$")


def peft_targets(wrapped: list, base_modules: dict, share_by: str):
    """(target_modules, exclude_modules) from which PEFT derives ``share_by``'s groups for ``wrapped``."""
    if share_by == "shape":
        return "(?:" + "|".join(re.escape(m) for m in sorted(wrapped)) + ")", None
    if share_by == "layer":
        return sorted(wrapped), None
    leaves = sorted({m.rsplit(".", 1)[-1] for m in wrapped})
    extra = sorted(n for n in base_modules if n.rsplit(".", 1)[-1] in leaves and n not in set(wrapped))
    return leaves, extra or None


def peft_groups(modules: list, shapes: dict, target_modules) -> list:
    """PEFT's sharing groups (lists of paths, model order): by shape for a regex, else by the
    (longest) ``target_modules`` entry a path ends with, and shape."""
    groups: dict = {}
    for m in modules:
        if isinstance(target_modules, str):
            key = shapes[m]
        else:
            matches = [t for t in target_modules if m.endswith(t)]
            key = (max(matches, key=len) if matches else m, shapes[m])
        groups.setdefault(key, []).append(m)
    return sorted(groups.values())


def duplicate_parameters(hf: dict, shapes: dict) -> int:
    """How many of a file's LiLy numbers are copies of a shared tensor, from its config and its tensors'
    shapes alone (``peftlab info``): PEFT's groups from ``target_modules``, one ``B`` per group and one
    ``A`` per ``stride_A`` layers of it; every other ``A`` and ``B`` entry is a copy."""
    local = {}
    for key, shape in shapes.items():
        match = KEY.match(key.removeprefix(PREFIX))
        if match:
            local.setdefault(match.group(1), {})[match.group(2)] = tuple(shape)
    layers = {m: t for m, t in local.items() if "lily_A" in t and "lily_B" in t}
    weight_shape = {m: (t["lily_B"][1], t["lily_A"][1]) for m, t in layers.items()}  # (out, in)
    stride = max(int(hf.get("stride_A") or 1), 1)
    copies = 0
    for group in peft_groups(sorted(layers), weight_shape, hf.get("target_modules") or []):
        size_A, size_B = (math.prod(layers[group[0]][k]) for k in ("lily_A", "lily_B"))
        copies += (len(group) - math.ceil(len(group) / stride)) * size_A + (len(group) - 1) * size_B
    return copies


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "lily"


def to_hf(model: nn.Module, name: str, config: LilyConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes a LiLy."""
    state = require_state(model)
    tensors, modules = {}, []
    for module_name, layer in core.adapter_layers(model, name):
        adapter = layer.adapters[name]
        for key in KEYS:
            value = adapter.lily_router if key == "lily_router" else adapter.shared(key)
            tensors[f"{PREFIX}{module_name}.{key}.weight"] = value.detach().clone()
        modules.append(module_name)
    targets, exclude = peft_targets(modules, dict(named_base_modules(model)), config.share_by)
    hf = {
        "peft_type": "LILY",
        "base_model_name_or_path": state.base_name,
        "r": config.r,
        "stride_A": config.stride_A,
        "num_B": config.num_B,
        "scaling": config.scaling,
        "target_modules": targets,
        "exclude_modules": exclude,
        "modules_to_save": list(config.modules_to_save) or None,
        "init_weights": config.init == "zeros",
        "layers_to_transform": None,
        "layers_pattern": None,
        "auto_mapping": None,
    }
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def config_from_hf(hf: dict, modules: list, share_by: str) -> LilyConfig:
    try:
        config = LilyConfig(targets=sorted(modules), r=hf.get("r", 32), stride_A=hf.get("stride_A", 1),
                            num_B=hf.get("num_B", 2), scaling=hf.get("scaling", 1.0), share_by=share_by,
                            init="zeros" if hf.get("init_weights", True) else "random",
                            modules_to_save=list(hf.get("modules_to_save") or []))
        config.validate()
    except (TypeError, ValueError, ConfigError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    return config


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the LiLy in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    per_module: dict = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterFormatError(f"{source}: unexpected tensor name {key!r}: keys should start with {PREFIX!r}")
        match = KEY.match(key[len(PREFIX):])
        if match:
            per_module.setdefault(match.group(1), {})[match.group(2)] = value
    if not per_module:
        raise AdapterFormatError(f"{source}: the weights file holds no LiLy tensors (keys ending in "
                                 f"{', '.join(k + '.weight' for k in KEYS)})")
    for module_name, local in per_module.items():
        missing = [k for k in KEYS if k not in local]
        if missing:
            raise AdapterFormatError(f"{source}: '{module_name}' lacks {', '.join(missing)}; the file is incomplete")
    base = linear_modules(model, per_module, source, "LiLy")
    order = [n for n, _ in named_base_modules(model) if n in per_module]
    shapes = {m: tuple(base[m].weight.shape) for m in order}
    share_by = _share_rule(hf, order, shapes, int(hf.get("stride_A", 1) or 1), source)
    config = config_from_hf(hf, order, share_by)
    config.modules_to_save = present_modules_to_save(config.modules_to_save, [n for n, _ in named_base_modules(model)])
    core.attach(model, config, name=name)
    written = set()
    for module_name, layer in core.adapter_layers(model, name):
        local, adapter = per_module[module_name], layer.adapters[name]
        with torch.no_grad():
            for key in KEYS:
                target = adapter.lily_router if key == "lily_router" else adapter.shared(key)
                value = local[key]
                if tuple(value.shape) != tuple(target.shape):
                    raise AdapterFormatError(f"{source}: {key} of '{module_name}' is {tuple(value.shape)}, but the "
                                             f"config (r, num_B) and the layer imply {tuple(target.shape)}; the config "
                                             "and weights do not belong together")
                if id(target) in written:
                    if not torch.equal(target, value.to(target.dtype)):
                        raise AdapterFormatError(f"{source}: '{module_name}' shares {key} with an earlier layer "
                                                 f"(stride_A={config.stride_A}, groups by {share_by}), but the file "
                                                 "holds a different value there; the file is inconsistent")
                    continue
                target.copy_(value)
                written.add(id(target))


def _share_rule(hf: dict, order: list, shapes: dict, stride_A: int, source) -> str:
    """The ``share_by`` whose groups are the ones PEFT derives from this file's ``target_modules``."""
    targets = hf.get("target_modules")
    if not isinstance(targets, (str, list)) or not targets:
        raise AdapterFormatError(f"{source}: adapter_config.json has target_modules={targets!r}; LiLy's sharing "
                                 "across layers follows from it, so it must be a list of names or a regex")
    expected = peft_groups(order, shapes, targets)
    for rule in SHARE_RULES:
        owners = sharing([(m, shapes[m]) for m in order], rule, stride_A)
        groups: dict = {}
        for m in order:
            groups.setdefault(owners[m][1], []).append(m)
        if sorted(groups.values()) == expected:
            return rule
    raise AdapterFormatError(f"{source}: PEFT groups this file's layers for sharing as {expected}, which none of "
                             f"peftlab's rules (share_by: {', '.join(SHARE_RULES)}) reproduces")
