"""What every HF PEFT converter (``hf_*.py``) shares: key prefix, target names, the common fields."""
from __future__ import annotations

import torch
from torch import nn

from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, IncompatibleBaseError

PREFIX = "base_model.model."  # PEFT's prefix of every tensor key (``base_model.model.<module path>...``)
PEFT_VERSION = "0.21.2"  # the peft release these files are written for and tested against
COMMON_FIELDS = {"inference_mode": True, "peft_version": PEFT_VERSION, "revision": None}


def target_names(wrapped: list, base_modules: dict) -> list:
    """Short suffixes (``q_proj``) when they select exactly the wrapped modules, as vLLM and
    PEFT users expect; full module names otherwise."""
    leaves = sorted({m.split(".")[-1] for m in wrapped})
    selected = {n for n in base_modules if n.split(".")[-1] in leaves}
    return leaves if selected == set(wrapped) else sorted(wrapped)


def linear_modules(model: nn.Module, adapted, source, method: str) -> dict:
    """The model's base modules by name, after checking that every module a file adapts exists
    (else the file is for another base) and is an ``nn.Linear`` (what ``method`` adapts)."""
    modules = dict(named_base_modules(model))
    missing = [m for m in adapted if m not in modules]
    if missing:
        raise IncompatibleBaseError(f"{source} adapts modules this model does not have ({', '.join(missing[:3])}"
                                    f"{' ...' if len(missing) > 3 else ''}); it was saved for another base model")
    for module_name in adapted:
        if not isinstance(modules[module_name], nn.Linear):
            raise AdapterFormatError(f"{source}: '{module_name}' is a {type(modules[module_name]).__name__}; peftlab's "
                                     f"{method} adapts nn.Linear layers only")
    return modules


def refuse_base_training(hf: dict, method: str) -> None:
    """Files that train the base's biases or target GPT-2's transposed Conv1D layers, which
    ``method`` here does not, are refused rather than read half."""
    if hf.get("bias", "none") != "none":
        raise AdapterFormatError(f"adapter_config.json has bias={hf.get('bias')!r}: the adapter trains the base biases, "
                                 f"which peftlab's {method} does not (only bias='none' files are read)")
    if hf.get("fan_in_fan_out"):
        raise AdapterFormatError(f"adapter_config.json has fan_in_fan_out=true (GPT-2 Conv1D layers); peftlab's {method} "
                                 "adapts nn.Linear layers only")


def module_tensors(tensors: dict, keys, source, method: str, skip=(), local=None) -> dict:
    """``{module path: {local name: tensor}}`` of the tensors whose last name part is one of
    ``keys`` (``base_model.model.<module path>.<local name>``), or, for local names with dots in
    them (``peanut_encoders.0.weight``), whose end matches the regex ``local`` (group 1 the local
    name; ``keys`` then only describe them in the error). Keys in ``skip`` (an adapter's shared
    tensors) are passed over, any other key outside PEFT's prefix is an error, and a file with
    none of them is refused, naming ``method``."""
    per_module: dict = {}
    for key, value in tensors.items():
        if key in skip:
            continue
        if not key.startswith(PREFIX):
            raise AdapterFormatError(f"{source}: unexpected tensor name {key!r}: keys should start with {PREFIX!r}")
        if local is not None:
            found = local.search(key)
            if found:
                per_module.setdefault(key[len(PREFIX):found.start()], {})[found.group(1)] = value
            continue
        module_name, _, name = key[len(PREFIX):].rpartition(".")
        if name in keys:
            per_module.setdefault(module_name, {})[name] = value
    if not per_module:
        raise AdapterFormatError(f"{source}: the weights file holds no {method} tensors (keys ending in "
                                 f"{' or '.join(keys)})")
    return per_module


def present_modules_to_save(names, base_modules) -> list:
    """The ``modules_to_save`` entries this model has (PEFT writes every head name a task might
    use, e.g. ["classifier", "score"] for SEQ_CLS), each once."""
    return [m for m in dict.fromkeys(names) if any(n == m or n.endswith("." + m) for n in base_modules)]


def layer_tensors(model: nn.Module, name: str, keys) -> tuple[dict, list, nn.Module | None]:
    """Adapter ``name``'s tensors ``keys`` at each layer under PEFT's keys, the adapted module names
    in model order, and the last layer's adapter (which reads the tensors a method shares across
    layers: VeRA's projections, RandLoRA's bases), or None where nothing is adapted."""
    from ..core import adapters as core

    tensors, modules, adapter = {}, [], None
    for module_name, layer in core.adapter_layers(model, name):
        adapter = layer.adapters[name]
        for key in keys:
            tensors[f"{PREFIX}{module_name}.{key}"] = getattr(adapter, key).detach()
        modules.append(module_name)
    return tensors, modules, adapter


def check_layer_shapes(adapter: nn.Module, local: dict, keys, module_name: str, source, implied_by="the config (r)") -> None:
    """A file's tensors for one layer must have the shapes the config builds there."""
    expected = {k: tuple(getattr(adapter, k).shape) for k in keys}
    found = {k: tuple(v.shape) for k, v in local.items()}
    if expected != found:
        raise AdapterFormatError(f"{source}: tensors for '{module_name}' are {found}, but {implied_by} and the layer "
                                 f"imply {expected}; the config and weights do not belong together")


def load_layers(model: nn.Module, name: str, per_module: dict, keys, source) -> None:
    """Copy each layer's tensors from the file into the attached adapter ``name``, shapes checked."""
    from ..core import adapters as core

    for module_name, layer in core.adapter_layers(model, name):
        adapter = layer.adapters[name]
        check_layer_shapes(adapter, per_module[module_name], keys, module_name, source)
        adapter.load_state_dict(per_module[module_name], strict=False)


def load_shared(current, saved, keys, source) -> None:
    """Copy the tensors a file stores once for every layer (``saved``, named ``keys`` there) into
    the adapter's own (``current``), shapes checked."""
    with torch.no_grad():
        for tensor, value, key in zip(current, saved, keys):
            if tuple(tensor.shape) != tuple(value.shape):
                raise AdapterFormatError(f"{source}: {key} is {tuple(value.shape)}, but r and the widest adapted layers "
                                         f"imply {tuple(tensor.shape)}; the config and weights do not belong together")
            tensor.copy_(value)


def missing_shared(config, saved, keys, source) -> None:
    """A file whose config says ``save_projection=true`` must hold the shared tensors."""
    if config.save_projection and any(t is None for t in saved):
        raise AdapterFormatError(f"{source}: adapter_config.json says save_projection=true, but the weights file lacks "
                                 f"{' and '.join(keys)}; the file is incomplete")


def check_outputs(model: nn.Module, per_module: dict, key: str, source, method: str) -> None:
    """Every adapted module exists and is linear, and its per-output vector ``key`` (VeRA's
    ``lambda_b``) is as long as the module's outputs; else the file is for another base."""
    modules = linear_modules(model, per_module, source, method)
    for module_name, local in per_module.items():
        vector, out = local.get(key), modules[module_name].out_features
        if vector is not None and vector.shape[0] != out:
            raise IncompatibleBaseError(f"{source} was saved for a base whose '{module_name}' has {vector.shape[0]} "
                                        f"outputs, but this model's has {out}: wrong base model")
