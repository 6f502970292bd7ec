"""Attaching, activating, merging and removing named adapters on a model.

These functions are the whole public life cycle of an adapter; they are re-exported as
``peftlab.attach``, ``peftlab.merge`` and so on.
"""
from __future__ import annotations

import contextlib
import inspect
from collections import defaultdict

from torch import nn

from ..errors import ConfigError, StateError, TargetError
from ..quant.layers import parameter_count
from .config import MethodConfig, parse_spec
from . import model_adapters
from .layer import AdapterLayer
from .routing import Routing
from .state import STATE_ATTR, get_state, require_state
from .targets import find_targets, get_submodule_parent, named_base_modules


def build_configs(spec) -> list[MethodConfig]:
    """A spec string, a config object, or a list of config objects -> list of validated configs.
    A recipe method (one whose file has ``expand(config)``, e.g. MAM = prefix + parallel adapter)
    becomes the configs it stands for."""
    from ..methods import get_method

    if isinstance(spec, MethodConfig):
        configs = [spec]
    elif isinstance(spec, (list, tuple)) and all(isinstance(c, MethodConfig) for c in spec):
        configs = list(spec)
    elif isinstance(spec, dict):
        configs = [get_method(spec.get("method", "")).Config.from_dict(spec)]
    else:
        configs = []
        for method_name, settings in parse_spec(spec):
            try:
                configs.append(get_method(method_name).Config.from_dict(settings))
            except TypeError as error:  # a dataclass rejecting a value of the wrong shape
                raise ConfigError(f"{method_name}: {error}") from None
    out = []
    for config in configs:
        config.validate()
        expand = getattr(get_method(config.method), "expand", None)
        out += build_configs(expand(config)) if expand is not None else [config]
    return out


def train_new_head(configs: list, model: nn.Module) -> list:
    """A classifier's new head (``classifier`` / ``score``) trains in full alongside the adapter,
    unless a config already names what to train in full."""
    if not any(c.modules_to_save for c in configs):
        head = next((name for name in ("classifier", "score") if hasattr(model, name)), None)
        if head is not None:
            configs[0].modules_to_save = [head]
    return configs


def attach(model: nn.Module, spec, name: str = "default") -> nn.Module:
    """Add adapter ``name`` to ``model`` (in place) and freeze everything else; returns the model.

    ``spec`` is a spec string (``"lora[r=16,alpha=32]"``, methods joined by ``|``) or config object(s).
    Besides ``can_wrap`` / ``make_adapter``, a method file may define ``find_targets(model, config)``
    to choose its modules from the model itself (AdapterFusion: where the adapters it fuses sit) and
    ``after_attach(model, name, config)``, run once its adapters are in place (a parameter shared by
    all layers, hooks on other modules, references to sibling adapters); an adapter's
    ``detach_from`` undoes what it set up.
    """
    from ..methods import get_method

    if not isinstance(model, nn.Module):
        raise TypeError(f"peftlab.attach expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"adapter name must be a non-empty string without dots, got {name!r}")
    state = get_state(model, create=True)
    if name in state.configs:
        raise ConfigError(f"this model already has an adapter named {name!r}; pick another name or peftlab.delete it first")
    configs = build_configs(spec)
    plan = []  # (config, method, [module names]) all resolved before the model is touched
    claimed = {}
    for config in configs:
        method = get_method(config.method)
        for suffix in config.modules_to_save:
            _find_modules(model, suffix)
        if is_model_method(method):
            if any(m == config.method for _, m, _ in model_adapters.model_adapters(model, name)):
                raise ConfigError(f"adapter {name!r} lists {config.method} twice")
            plan.append((config, method, None))
            continue
        choose = getattr(method, "find_targets", None)  # e.g. AdapterFusion: where other adapters sit
        names = choose(model, config) if choose else find_targets(model, config, method.can_wrap)
        for module_name in names:
            if module_name in claimed:
                raise TargetError(
                    f"{config.method} and {claimed[module_name]} both target '{module_name}' in adapter {name!r}; "
                    "give one of them an 'exclude' or narrower 'targets'"
                )
            claimed[module_name] = config.method
        plan.append((config, method, names))
    # A method can still refuse a module while building its adapter (e.g. PiSSA on an embedding):
    # undo everything done so far, so a failed attach leaves the model as it was.
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    first = not state.configs
    touched = []
    try:
        if first:
            for p in model.parameters():
                p.requires_grad_(False)
        for config, method, names in plan:
            for module_name in config.modules_to_save:
                _unfreeze_module(model, module_name)
            if names is None:
                module = method.make_model_adapter(model, config)
                module.train(model.training)
                model_adapters.add(model, name, config.method, module, state)
                continue
            for module_name in names:
                layer = _wrap(model, module_name, state)
                touched.append((module_name, layer))
                adapter = method.make_adapter(layer.base_layer, config, module_name)
                adapter.train(layer.training)  # new modules start in train mode; follow the model's mode
                layer.adapters[name] = adapter
            if hasattr(method, "after_attach"):  # ties across layers: shared weights, hooks, sibling adapters
                method.after_attach(model, name, config)
    except BaseException:
        model_adapters.remove(model, name)
        for module_name, layer in reversed(touched):
            if name in layer.adapters:
                layer.adapters[name].detach_from(layer.base_layer)
                del layer.adapters[name]
            if not len(layer.adapters) and isinstance(model.get_submodule(module_name), AdapterLayer):
                parent, child = get_submodule_parent(model, module_name)
                setattr(parent, child, layer.base_layer)
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        if first:
            delattr(model, STATE_ATTR)
        raise
    if first:
        state.base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    state.configs[name] = configs
    state.active = [name]
    _set_trainable(model, [name])
    return model


def is_model_method(method) -> bool:
    """Soft prompts and prefixes act on the whole model (``model_adapters.py``), not on modules."""
    return hasattr(method, "make_model_adapter")


def _wrap(model: nn.Module, module_name: str, state) -> AdapterLayer:
    parent, child = get_submodule_parent(model, module_name)
    current = getattr(parent, child)
    if isinstance(current, AdapterLayer):
        return current
    layer = AdapterLayer(current, state)
    layer.train(current.training)
    setattr(parent, child, layer)
    return layer


def _find_modules(model: nn.Module, suffix) -> list:
    if not isinstance(suffix, str):
        raise ConfigError(f"modules_to_save: module names must be strings, got {suffix!r}")
    found = [m for n, m in named_base_modules(model) if n == suffix or n.endswith("." + suffix)]
    if not found:
        raise TargetError(f"modules_to_save: no module named {suffix!r}; module names end with e.g. 'classifier' or 'score'")
    return found


def _unfreeze_module(model: nn.Module, suffix: str) -> None:
    for module in _find_modules(model, suffix):
        for p in module.parameters():
            p.requires_grad_(True)


def adapter_layers(model: nn.Module, name: str | None = None):
    """Yield ``(module name, AdapterLayer)`` for every wrapped module (holding ``name`` if given)."""
    for module_name, module in model.named_modules():
        if isinstance(module, AdapterLayer) and (name is None or name in module.adapters):
            yield module_name, module


def set_active(model: nn.Module, names) -> None:
    """Apply these adapters (one name or a list, summed in order) to every row."""
    state = require_state(model)
    if state.composition is not None:
        raise StateError(f"a composition block ({state.composition.block!r}) decides which adapters run; remove() it "
                         "(or leave its with block) before setting active adapters")
    names = [names] if isinstance(names, str) else list(names)
    state.check_known(names)
    state.active = names
    _set_trainable(model, names)


def all_adapters(model: nn.Module, name: str | None = None):
    """Yield ``(adapter name, module)`` for every adapter module, per layer and model-level."""
    for _, layer in adapter_layers(model):
        for adapter_name, adapter in layer.adapters.items():
            if name is None or adapter_name == name:
                yield adapter_name, adapter
    for adapter_name, _, module in model_adapters.model_adapters(model, name):
        yield adapter_name, module


def method_adapters(model: nn.Module, name: str, method: str):
    """Yield ``(module name, adapter)`` for the per-layer adapters of one method in adapter ``name``
    (what a method's own training hooks iterate over)."""
    from ..methods import get_method

    kind = get_method(method)
    for module_name, layer in adapter_layers(model, name):
        adapter = layer.adapters[name]
        if getattr(adapter, "method", None) == method or type(adapter).__module__ == kind.__name__:
            yield module_name, adapter


def _set_trainable(model, names) -> None:
    for adapter_name, adapter in all_adapters(model):
        for p in adapter.parameters():
            p.requires_grad_(adapter_name in names and getattr(p, "peftlab_trainable", True))


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Inside this block the model is exactly the base model."""
    state = require_state(model)
    previous, state.disabled = state.disabled, True
    try:
        yield model
    finally:
        state.disabled = previous


@contextlib.contextmanager
def routing(model: nn.Module, row_adapters):
    """Run each batch row through its own adapter (``None`` = the base model).

    The rows are grouped by adapter once, here; every layer of every forward inside the block
    (including each step of ``generate``) reuses that grouping.
    """
    state = require_state(model)
    if isinstance(row_adapters, str) or not hasattr(row_adapters, "__iter__"):
        raise ConfigError(f"routing needs one adapter name (or None) per batch row, as a list; got {row_adapters!r}")
    row_adapters = list(row_adapters)
    if not row_adapters:
        raise ConfigError("routing got an empty list; give one adapter name (or None for the base) per batch row")
    state.check_known(row_adapters)
    if state.merged:
        raise StateError(f"adapters {state.merged} are merged into the weights; unmerge them before routing rows to adapters")
    previous, state.routing = state.routing, Routing(row_adapters)
    try:
        yield model
    finally:
        state.routing = previous


def merge(model: nn.Module, name: str = "default") -> None:
    """Fold adapter ``name`` into the base weights; forward results stay the same."""
    state = require_state(model)
    state.check_known([name])
    if name in state.merged:
        raise StateError(f"adapter {name!r} is already merged")
    _check_mergeable(state, name)
    layers = list(adapter_layers(model, name))
    _check_untied(model, layers, name)
    done = []
    try:
        for _, layer in layers:
            layer.adapters[name].merge(layer.base_layer)
            done.append(layer)
    except BaseException:  # a layer refused (e.g. a zero (IA)^3 scale): leave the model unmerged
        for layer in reversed(done):
            layer.adapters[name].unmerge(layer.base_layer)
        raise
    state.merged.append(name)
    if name not in state.active:
        state.active.append(name)


def unmerge(model: nn.Module, name: str = "default") -> None:
    """Take a merged adapter back out of the base weights."""
    state = require_state(model)
    if name not in state.merged:
        raise StateError(f"adapter {name!r} is not merged (merged: {state.merged or 'none'})")
    for _, layer in adapter_layers(model, name):
        layer.adapters[name].unmerge(layer.base_layer)
    state.merged.remove(name)


def _check_mergeable(state, name) -> None:
    from ..methods import get_method

    for config in state.configs[name]:
        if not get_method(config.method).MERGEABLE:
            raise StateError(f"adapter {name!r} uses {config.method}, which cannot be merged into the base weights")


def _check_untied(model, layers, name) -> None:
    """Merging into a weight that another module shares (tied input and output embeddings)
    would change that module too, so the merged model would no longer match the unmerged one."""
    owners = defaultdict(list)
    for module_name, module in named_base_modules(model):
        for p in module.parameters(recurse=False):
            owners[id(p)].append(module_name)
    for module_name, layer in layers:
        weight = getattr(layer.base_layer, "weight", None)
        others = [n for n in owners.get(id(weight), []) if n != module_name]
        if weight is not None and others:
            raise StateError(
                f"adapter {name!r} cannot be merged: '{module_name}' shares its weight with {others} (tied embeddings), "
                "so merging would change both; keep the adapter unmerged, or untie the weights before attaching"
            )


def delete(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; layers left with no adapters go back to their plain modules."""
    state = require_state(model)
    state.check_known([name])
    if name in state.merged:
        unmerge(model, name)
    for module_name, layer in list(adapter_layers(model, name)):
        layer.adapters[name].detach_from(layer.base_layer)
        del layer.adapters[name]
        if not len(layer.adapters):
            parent, child = get_submodule_parent(model, module_name)
            setattr(parent, child, layer.base_layer)
    model_adapters.remove(model, name)
    del state.configs[name]
    state.active = [n for n in state.active if n != name]


def unload(model: nn.Module) -> nn.Module:
    """Remove every peftlab module and return the plain model. Merged adapters stay in the
    weights (merge first to keep an adapter's effect); unmerged ones are dropped."""
    state = require_state(model)
    for module_name, layer in list(adapter_layers(model)):
        for name, adapter in layer.adapters.items():
            if name not in state.merged:
                adapter.detach_from(layer.base_layer)
        parent, child = get_submodule_parent(model, module_name)
        setattr(parent, child, layer.base_layer)
    for name in list(state.configs):
        model_adapters.remove(model, name)
    delattr(model, STATE_ATTR)
    return model


def summary(model: nn.Module) -> dict:
    """Trainable and total parameter counts, overall and per adapter and per method."""
    state = get_state(model)
    total = parameter_count(model)  # a quantized weight at its full-precision size
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_adapter, per_method = defaultdict(int), defaultdict(int)
    if state is not None:
        for _, layer in adapter_layers(model):
            for name, adapter in layer.adapters.items():
                count = sum(p.numel() for p in adapter.parameters())
                per_adapter[name] += count
                per_method[_method_of(adapter, state.configs[name])] += count
        for name, method, module in model_adapters.model_adapters(model):
            count = sum(p.numel() for p in module.parameters())
            per_adapter[name] += count
            per_method[method] += count
    adapter_total = sum(per_adapter.values())
    return {
        "total": total,
        "base": total - adapter_total,
        "trainable": trainable,
        "trainable_percent": round(100.0 * trainable / max(total, 1), 4),
        "adapters": dict(per_adapter),
        "methods": dict(per_method),
        "active": list(state.active) if state else [],
        "merged": list(state.merged) if state else [],
    }


def _method_of(adapter, configs) -> str:
    if len(configs) == 1:
        return configs[0].method
    declared = getattr(adapter, "method", None)
    module = type(adapter).__module__.rsplit(".", 1)[-1]
    return next((c.method for c in configs if c.method in (declared, module)), configs[0].method)


# ---- training hooks --------------------------------------------------------------------------
# A method file may define any of these module-level functions; the trainer calls them for the
# active adapters (``peftlab.train`` does; a hand-written loop calls these three helpers):
#   regularization(model, name, config) -> scalar tensor added to the loss (L0 gates, orthogonality)
#   after_step(model, name, config, step, total_steps[, lr])  after optimizer.step(), gradients still
#       there (budget schedules, proximal updates, pruning)
#   calibrate(model, name, config, batches, loss_fn)     once before training (Fisher masks)


def method_hook(config, hook: str):
    """The method's ``hook`` function for this config, or None. A method whose hook serves only some settings
    says which with ``uses_hook(config, hook) -> bool`` (LoRA: calibrate for its inits chosen from data)."""
    from ..methods import get_method

    method = get_method(config.method)
    fn = getattr(method, hook, None)
    uses = getattr(method, "uses_hook", None)
    return None if fn is None or (uses is not None and not uses(config, hook)) else fn


def active_hooks(model: nn.Module, hook: str):
    state = get_state(model)
    if state is None:
        return
    for name in state.active:
        for config in state.configs.get(name, []):
            fn = method_hook(config, hook)
            if fn is not None:
                yield fn, name, config


def regularization(model: nn.Module):
    """The sum of the active adapters' regularization terms, or None when no method has one."""
    terms = [fn(model, name, config) for fn, name, config in active_hooks(model, "regularization")]
    terms = [t for t in terms if t is not None]
    return sum(terms[1:], terms[0]) if terms else None


def after_step(model: nn.Module, step: int, total_steps: int, lr: float | None = None) -> None:
    """Run the active methods' per-step updates (``step`` counts from 1). ``lr``, the step's
    learning rate, goes to the hooks that take an ``lr`` argument (SoRA's proximal step)."""
    for fn, name, config in active_hooks(model, "after_step"):
        extra = {"lr": lr} if "lr" in inspect.signature(fn).parameters else {}
        fn(model, name, config, step, total_steps, **extra)


def calibrate(model: nn.Module, batches, loss_fn) -> None:
    """Let methods that choose their parameters from data (FishMask) look at ``batches`` first;
    ``loss_fn(model, batch)`` returns a scalar loss."""
    for fn, name, config in active_hooks(model, "calibrate"):
        fn(model, name, config, batches, loss_fn)
