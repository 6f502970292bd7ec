"""peftlab's own adapter format, for methods PEFT does not have and for unions of methods.

``adapter_config.json``::

    {"peft_type": "PEFTLAB", "peftlab_version": "0.1.0", "base_model_name_or_path": ...,
     "methods": [{"method": "houlsby", "reduction": 16, ..., "modules": ["model.layers.0.mlp.down_proj", ...]}]}

Each method config is saved with ``modules``, the exact module names it was attached to, so the
adapter loads onto the same modules however its targets were written. Tensors live in
``adapter_model.safetensors`` under ``base_model.model.<module path>.<key>`` for per-module
adapters and ``base_model.model.peftlab_model_adapters.<method>.<key>`` for model-level ones (soft
prompts, prefixes). A module's tensors are what its ``export_state()`` returns (default: its
``state_dict()``), so a method that stores a sparse diff as indices and values does so here, and
reads them back with ``import_state``.
"""
from __future__ import annotations

import re

from torch import nn

from .. import __version__
from ..core import adapters as core
from ..core import model_adapters
from ..errors import AdapterFormatError, IncompatibleBaseError
from .hf_common import PREFIX

PEFT_TYPE = "PEFTLAB"
MODEL_PREFIX = f"{PREFIX}{model_adapters.STORE}."


def export_state(module: nn.Module) -> dict:
    export = getattr(module, "export_state", None)
    return export() if callable(export) else module.state_dict()


def import_state(module: nn.Module, tensors: dict, where: str, source) -> None:
    importer = getattr(module, "import_state", None)
    if callable(importer):
        importer(tensors)
        return
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != found:
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        reshaped = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        detail = "; ".join(f"{label}: {names}" for label, names in
                           (("missing", missing), ("unexpected", extra), ("different shape", reshaped)) if names)
        error = IncompatibleBaseError if reshaped and not (missing or extra) else AdapterFormatError
        raise error(f"{source}: the saved tensors for '{where}' do not fit this model's adapter ({detail}); "
                    "the file belongs to another base model or another adapter config")
    module.load_state_dict(tensors)


def to_native(model: nn.Module, name: str, configs) -> tuple[dict, dict]:
    tensors, modules = {}, {c.method: [] for c in configs}
    for module_name, layer in core.adapter_layers(model, name):
        adapter = layer.adapters[name]
        method = _method_of(adapter, configs)
        modules[method].append(module_name)
        for key, value in export_state(adapter).items():
            tensors[f"{PREFIX}{module_name}.{key}"] = value
    for _, method, module in model_adapters.model_adapters(model, name):
        for key, value in export_state(module).items():
            tensors[f"{MODEL_PREFIX}{method}.{key}"] = value
    methods = []
    for config in configs:
        entry = config.to_dict()
        if modules[config.method]:
            entry["modules"] = modules[config.method]
        methods.append(entry)
    return {"peft_type": PEFT_TYPE, "peftlab_version": __version__, "methods": methods}, tensors


def _method_of(adapter, configs) -> str:
    declared = getattr(adapter, "method", None)
    module = type(adapter).__module__.rsplit(".", 1)[-1]
    for config in configs:
        if config.method in (declared, module):
            return config.method
    return configs[0].method


def from_native(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    from ..methods import get_method

    entries = hf.get("methods")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise AdapterFormatError(f"{source}: adapter_config.json has no 'methods' list; the file is corrupt")
    configs = []
    for entry in entries:
        entry = dict(entry)
        modules = entry.pop("modules", None)
        method = get_method(entry.get("method", ""))
        config = method.Config.from_dict(entry, strict=False)  # newer keys warn
        if modules:
            config.targets = ["re:" + re.escape(m) for m in modules]
            config.layers, config.exclude = None, []
        configs.append(config)
    core.attach(model, configs, name=name)
    owners = {f"{PREFIX}{module_name}.": layer.adapters[name] for module_name, layer in core.adapter_layers(model, name)}
    owners.update({f"{MODEL_PREFIX}{method}.": module for _, method, module in model_adapters.model_adapters(model, name)})
    grouped = {prefix: {} for prefix in owners}
    for key, value in tensors.items():
        prefix = max((p for p in owners if key.startswith(p)), key=len, default=None)  # nested modules: the innermost
        if prefix is not None:
            grouped[prefix][key[len(prefix):]] = value
    for prefix, module in owners.items():
        import_state(module, grouped[prefix], prefix[len(PREFIX):-1], source)
