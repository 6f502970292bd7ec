"""Which modules of a model a method attaches to.

A target is a module-name suffix (``q_proj`` matches ``model.layers.3.self_attn.q_proj``),
a regex on the full name written ``re:<regex>``, ``all-linear``: every linear layer except
the output head (QLoRA's recipe), or a role (``ffn-out``, ``attn-out``, ``keys``, ``norms``...,
see ``ROLES``) that names the same place in every supported architecture; a list may mix them
(``targets=[all-linear,norms]``). ``all-linear`` and ``norms`` pick modules by type and mean
those of them the method can wrap. A container the method cannot wrap (``self_attn``, the role
``attention``) stands for the modules inside it that it can. ``layers`` keeps modules of some
block indices only; ``exclude`` removes names or regexes. A spec that matches nothing is an
error that names the module names closest to what was asked for.
"""
from __future__ import annotations

import difflib
import re

from torch import nn

from ..errors import TargetError
from .layer import AdapterLayer

ALL_LINEAR = "all-linear"

# Roles: the places in a transformer block that methods talk about, written once per architecture
# family (Llama/Mistral/Qwen, BERT/RoBERTa, GPT-2, OPT/Phi), so a method's default targets work on
# any of them. A target list may mix roles with module names: ``targets=[ffn-out,q_proj]``.
ROLES = {
    "queries": [r".*\.q_proj", r".*\.attention\.self\.query"],
    "keys": [r".*\.k_proj", r".*\.attention\.self\.key"],
    "values": [r".*\.v_proj", r".*\.attention\.self\.value"],
    "attn-out": [r".*\.self_attn\.o_proj", r".*\.attention\.output\.dense", r".*\.attn\.c_proj",
                 r".*\.self_attn\.out_proj", r".*\.self_attn\.dense"],
    "ffn-in": [r".*\.mlp\.(gate|up)_proj", r".*\.intermediate\.dense", r".*\.mlp\.c_fc", r".*\.fc1"],
    "ffn-out": [r".*\.mlp\.down_proj", r".*\.layer\.\d+\.output\.dense", r".*\.mlp\.c_proj", r".*\.fc2"],
    "attention": [r".*\.self_attn", r".*\.attention\.self", r".*\.h\.\d+\.attn"],
    "mlp": [r".*\.mlp", r".*\.layer\.\d+\.intermediate"],
    "norms": [],  # by type: every LayerNorm / RMSNorm (see is_norm)
}
_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or GPT-2 style Conv1D (a linear layer with its weight stored transposed)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def named_base_modules(model: nn.Module):
    """Yield ``(name, module)`` as if no adapters were attached: a wrapped module appears under
    its original name and the adapters' own submodules are skipped."""

    def walk(module, prefix):
        for child_name, child in module.named_children():
            if child_name == "peftlab_model_adapters":  # soft prompts and prefixes (model_adapters.py)
                continue
            name = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, AdapterLayer):
                yield name, child.base_layer
                continue
            yield name, child
            if not getattr(child, "base_module_leaf", False):  # one base module, as what it replaced (quant.QuantizedEmbedding)
                yield from walk(child, name)

    yield from walk(model, "")


def output_head_names(model: nn.Module) -> set:
    """Names of modules that produce the model's outputs (never wrapped by ``all-linear``)."""
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in named_base_modules(model):
        if out is not None and (module is out or (isinstance(out, AdapterLayer) and module is out.base_layer)):
            heads.add(name)
        if name.split(".")[-1] in ("lm_head", "score", "classifier", "qa_outputs"):
            heads.add(name)
    return heads


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, or an RMSNorm of any model family (``LlamaRMSNorm``, ``nn.RMSNorm``, ...)."""
    return isinstance(module, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))) or type(module).__name__.endswith(
        ("RMSNorm", "LayerNorm"))


def expand_roles(targets: list, modules: dict, heads: set = frozenset()) -> list:
    """Target patterns with each role name (and ``all-linear``, which skips ``heads``) replaced by
    the module names it selects."""
    out = []
    for pattern in targets:
        if pattern == ALL_LINEAR:
            out += [n for n, m in modules.items() if is_linear(m) and n not in heads]
        elif pattern == "norms":
            out += [n for n, m in modules.items() if is_norm(m)]
        elif pattern in ROLES:
            out += [n for n in modules if any(re.fullmatch(r, n) for r in ROLES[pattern])]
        else:
            out.append(pattern)
    return out


def layer_index(name: str) -> int | None:
    found = _LAYER_INDEX.search(name)
    return int(found.group(1)) if found else None


def block_count(modules) -> int:
    """How many numbered blocks (``layers.0`` ... ``layers.N-1``) the module names show."""
    return 1 + max((i for i in map(layer_index, modules) if i is not None), default=-1)


def matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def find_targets(model: nn.Module, config, can_wrap) -> list[str]:
    """Module names the config selects, checked to be wrappable by the method."""
    modules = dict(named_base_modules(model))
    targets = [config.targets] if isinstance(config.targets, str) else list(config.targets)
    heads = output_head_names(model) if ALL_LINEAR in targets else set()
    expanded = expand_roles(targets, modules, heads)
    chosen = _wrappable_contents([n for n in modules if any(matches(n, p) for p in expanded)], modules, can_wrap)
    layers = config.block_indices(block_count(modules))
    if layers is not None:
        chosen = [n for n in chosen if layer_index(n) in set(layers)]
    excluded = expand_roles(config.exclude, modules)
    chosen = [n for n in chosen if not any(matches(n, p) for p in excluded)]
    by_type = set(expand_roles([t for t in targets if t in (ALL_LINEAR, "norms")], modules, heads))
    chosen = [n for n in chosen if n not in by_type or can_wrap(modules[n])] or chosen  # none left: the check below says why
    if not chosen:
        raise TargetError(_nothing_matched(config, modules))
    for name in chosen:
        if not can_wrap(modules[name]):
            raise TargetError(
                f"{config.method}: target '{name}' is a {type(modules[name]).__name__}, which {config.method} cannot wrap; "
                "choose linear or embedding layers (see peftlab.summary or print(model) for names)"
            )
    return chosen


def _wrappable_contents(names: list, modules: dict, can_wrap) -> list:
    """``names`` with each container the method cannot wrap replaced by the outermost modules
    inside it that it can wrap (``self_attn`` -> its projections); in model order."""
    picked = set()
    for name in names:
        module = modules[name]
        if can_wrap(module) or not list(module.children()):
            picked.add(name)
            continue
        inside = [n for n in modules if n.startswith(name + ".") and can_wrap(modules[n])]
        picked.update(n for n in inside if not any(n.startswith(outer + ".") for outer in inside))
    return [n for n in modules if n in picked]


def _nothing_matched(config, modules: dict) -> str:
    asked = config.targets if isinstance(config.targets, list) else [config.targets]
    names = list(modules)
    leaves = sorted({n.split(".")[-1] for n in names})
    hints = []
    for pattern in asked:
        plain = str(pattern).removeprefix("re:")
        hints += difflib.get_close_matches(plain.split(".")[-1], leaves, n=3, cutoff=0.4)
        hints += difflib.get_close_matches(plain, names, n=2, cutoff=0.6)
    hints = list(dict.fromkeys(hints)) or leaves[:8]
    where = f" in layers {config.layers}" if config.layers is not None else ""
    excluded = f" after excluding {config.exclude}" if config.exclude else ""
    return (
        f"{config.method}: targets {asked}{where}{excluded} matched no module of this model. "
        f"Closest module names: {', '.join(hints)}. Use a suffix such as 'q_proj', a regex 're:...', or 'all-linear'."
    )


def get_submodule_parent(model: nn.Module, name: str):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, child
