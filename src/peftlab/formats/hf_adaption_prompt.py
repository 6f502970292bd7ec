"""Hugging Face PEFT's adaption-prompt format (``ADAPTION_PROMPT``, LLaMA-Adapter), read and written exactly.

``adapter_config.json`` is PEFT's ``AdaptionPromptConfig``: ``adapter_len`` prompt tokens in the
top ``adapter_layers`` attention blocks named ``target_modules`` (``self_attn``).
``adapter_model.safetensors`` has, per adapted block, ``base_model.model.<block path>.adaption_prompt``
(1 x adapter_len x hidden) and ``.adaption_gate`` (1,). An adapter on blocks that are not the top N
(``layers=[...]`` or unusual targets) cannot be said in this format and is saved in peftlab's own.
"""
from __future__ import annotations

from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, IncompatibleBaseError
from ..methods.llama_adapter import LlamaAdapterConfig
from . import native
from .hf_common import PREFIX

PEFT_TYPES = ("ADAPTION_PROMPT",)
TENSORS = ("adaption_prompt", "adaption_gate")


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "llama_adapter" and not isinstance(configs[0].layers, list)


def to_hf(model: nn.Module, name: str, config: LlamaAdapterConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes it (peftlab's format when the
    adapted blocks are not the model's top ones)."""
    adapted = [module_name for module_name, _ in core.adapter_layers(model, name)]
    leaves = {n.rsplit(".", 1)[-1] for n in adapted}
    blocks = [n for n, _ in named_base_modules(model) if n.rsplit(".", 1)[-1] in leaves]
    if len(leaves) != 1 or blocks[len(blocks) - len(adapted):] != adapted:
        return native.to_native(model, name, [config])
    tensors = {f"{PREFIX}{module_name}.{key}": value.detach()
               for module_name, layer in core.adapter_layers(model, name)
               for key, value in layer.adapters[name].state_dict().items()}
    hf = {
        "peft_type": "ADAPTION_PROMPT",
        "base_model_name_or_path": require_state(model).base_name,
        "adapter_len": config.length,
        "adapter_layers": len(adapted),
        "target_modules": leaves.pop(),
        "auto_mapping": None,
    }
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def split_keys(tensors: dict, source) -> dict:
    """``{block path: {"adaption_prompt": ..., "adaption_gate": ...}}``."""
    per_block = {}
    for key, value in tensors.items():
        path, _, local = key.removeprefix(PREFIX).rpartition(".")
        if key.startswith(PREFIX) and local in TENSORS:
            per_block.setdefault(path, {})[local] = value
    if not per_block:
        raise AdapterFormatError(f"{source}: the weights file holds no adaption_prompt / adaption_gate tensors")
    return per_block


def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the adaption prompts in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    per_block = split_keys(tensors, source)
    try:
        config = LlamaAdapterConfig(targets=hf.get("target_modules") or "self_attn", length=hf.get("adapter_len"),
                                    layers=hf.get("adapter_layers"))
        config.validate()
    except (TypeError, ValueError) as error:
        raise AdapterFormatError(f"{source}: adapter_config.json has invalid values: {error}") from None
    core.attach(model, config, name=name)
    layers = dict(core.adapter_layers(model, name))
    if set(layers) != set(per_block):
        raise IncompatibleBaseError(f"{source} adapts the blocks {sorted(per_block)}, but on this model the config selects "
                                    f"{sorted(layers)}: it was saved for another base model")
    for block, local in per_block.items():
        adapter = layers[block].adapters[name]
        expected = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in local.items()}
        if expected != found:
            raise IncompatibleBaseError(f"{source}: the tensors for '{block}' are {found}, but this model and config need "
                                        f"{expected}: it was saved for another base model")
        adapter.load_state_dict(local)
