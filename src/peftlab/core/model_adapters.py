"""Adapters that act on the whole model instead of one module: soft prompts, KV prefixes.

A method of this kind provides ``make_model_adapter(model, config) -> nn.Module`` instead of
``can_wrap`` / ``make_adapter``. Its module lives at ``model.peftlab_model_adapters[name][method]``,
a real submodule, so ``.to()``, ``.parameters()`` and optimizers see it, and it acts through two
hooks that peftlab puts once on the model's backbone (``model.base_model`` for a transformers
model: the decoder or encoder stack without its head):

- ``rewrite_inputs(backbone_kwargs) -> (kwargs, note)`` before the backbone runs, e.g. to prepend
  soft-prompt embeddings, lengthen the attention mask, or fill the KV cache with prefixes;
- ``rewrite_output(output, note) -> output`` after it, e.g. to drop the hidden states of the
  virtual tokens so that the head, the loss and ``generate`` see the user's sequence only.

``note`` is whatever ``rewrite_inputs`` wants to hand to ``rewrite_output`` for the same call.
The hooks do nothing inside ``peftlab.disabled`` or when no model-level adapter is active.
"""
from __future__ import annotations

import inspect

from torch import nn

from ..errors import StateError
from . import kv_cache

STORE = "peftlab_model_adapters"
HOOKS_ATTR = "_peftlab_model_hooks"


def backbone(model: nn.Module) -> nn.Module:
    """The module whose inputs model-level adapters rewrite: ``model.base_model`` when the
    model has a distinct one (transformers models), else the model itself."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def store(model: nn.Module, create: bool = False) -> nn.ModuleDict | None:
    found = model._modules.get(STORE)
    if found is None and create:
        found = nn.ModuleDict()
        model.add_module(STORE, found)
    return found


def model_adapters(model: nn.Module, name: str | None = None):
    """Yield ``(adapter name, method name, module)`` for every model-level adapter (of ``name``)."""
    found = store(model)
    if found is None:
        return
    for adapter_name, methods in found.items():
        if name is None or adapter_name == name:
            for method_name, module in methods.items():
                yield adapter_name, method_name, module


def add(model: nn.Module, name: str, method_name: str, module: nn.Module, state) -> None:
    methods = store(model, create=True)
    if name not in methods:
        methods[name] = nn.ModuleDict()
    methods[name][method_name] = module
    _install_hooks(model, state)


def remove(model: nn.Module, name: str) -> None:
    found = store(model)
    if found is None or name not in found:
        return
    del found[name]
    if not len(found):
        delattr(model, STORE)
        for handle in getattr(model, HOOKS_ATTR, ()):
            handle.remove()
        object.__setattr__(model, HOOKS_ATTR, ())


def _install_hooks(model: nn.Module, state) -> None:
    if getattr(model, HOOKS_ATTR, ()):
        return
    target = backbone(model)
    signature = inspect.signature(target.forward)
    cache_keyword = kv_cache.keyword(target)
    notes = []  # one entry per backbone call in flight (pre-hook pushes, post-hook pops)

    def active_modules():
        if state.disabled:
            return []
        names = state.active
        if state.routing is not None:
            names = [n for n in dict.fromkeys(state.routing.row_adapters) if n is not None]
            routed = [n for n in names if any(True for _ in model_adapters(model, n))]
            if routed:
                raise StateError(f"adapters {routed} change the model's inputs (soft prompts or prefixes), which cannot "
                                 "differ row by row yet; run them with set_active, one adapter per batch")
            return []
        return [module for n in names for _, _, module in model_adapters(model, n)]

    def before(module, args, kwargs):
        active = active_modules()
        if not active:
            notes.append(None)
            return None
        if args:  # positional inputs become keywords, so adapters see one shape of call
            kwargs = dict(signature.bind_partial(*args, **kwargs).arguments)
            extra = kwargs.pop("kwargs", None)
            if isinstance(extra, dict):
                kwargs.update(extra)
        kwargs = kv_cache.normalize(kwargs, cache_keyword)  # adapters find a cache under the backbone's own name
        call_notes = []
        for adapter in active:
            kwargs, note = adapter.rewrite_inputs(kwargs)
            call_notes.append((adapter, note))
        notes.append(call_notes)
        return (), kwargs

    def after(module, args, kwargs, output):
        call_notes = notes.pop() if notes else None
        if not call_notes:
            return None
        for adapter, note in reversed(call_notes):
            output = adapter.rewrite_output(output, note)
        return output

    handles = (target.register_forward_pre_hook(before, with_kwargs=True),
               target.register_forward_hook(after, with_kwargs=True))
    object.__setattr__(model, HOOKS_ATTR, handles)
