"""Quantized base models: QLoRA's 4-bit NF4 / FP4, 8-bit, and a group-wise INT4 for QA-LoRA.

    peftlab.quantize(model, "nf4")              # every linear layer but the head, 4-bit NF4 + double quant
    peftlab.attach(model, "lora[r=16]")         # QLoRA: any module-wrapping method, unchanged
    ...train, save...
    peftlab.merge(model); peftlab.quant.merge_report(model)    # merged into the 4-bit weights, error measured
    peftlab.quant.dequantize(model); peftlab.merge(model)       # or: a merged full-precision model

    peftlab.quantize(model, "nf4", loftq_rank=16)      # LoftQ: quantized weights chosen with the LoRA init
    peftlab.attach(model, "lora[r=16,init=loftq]")
    peftlab.quantize(model, "int4", group_size=32)     # QA-LoRA: merges into the INT4 weights exactly
    peftlab.attach(model, "qalora[r=16,group_size=32]")
    peftlab.quantize(model, "nf4", embeddings=True)   # the embeddings and the (tied) head in nf4 too

``quantize`` swaps linear layers for quantized ones (``bnb.py``: bitsandbytes' ``Linear4bit`` /
``Linear8bitLt``; ``int4.py``: peftlab's group-wise INT4). A quantized layer is an ``nn.Linear`` that
can dequantize and requantize itself (``layers.py``); it is the base layer every method wraps, with
no per-backend copy of any method. Methods reach the weight through ``base_weight`` /
``set_base_weight`` (``methods/lora.py``), so merging into a quantized base dequantizes, adds the
update and requantizes; the error that adds is recorded per layer (``merge_report``). The methods
that need the weight itself in full precision refuse a quantized base with a clear error: FishMask
(picks entries by the weight's gradient), select (trains the weight in full), LoRA's init=pissa.

Embeddings and the output head stay in full precision by default (as in QLoRA); ``embeddings=True``
stores them in the same format (``embedding.py``: a tied head shares the quantized table).
``weight_bytes`` tells what the base weights take. Adapters saved from a quantized model record how its base was quantized
(``quantization_record``), so the base can be quantized the same way again (``quantize_like``)
before loading them, and ``peftlab merge`` exports them merged into the dequantized weights.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..core.config import MethodConfig
from ..core.layer import AdapterLayer
from ..core.state import get_state
from ..core.targets import find_targets, get_submodule_parent, named_base_modules
from ..errors import ConfigError, StateError
from .embedding import QuantizedEmbedding, embedding_and_head
from .layers import QuantizedLinear, is_quantized, parameter_shape
from .loftq import loftq

FORMATS = ("nf4", "fp4", "int8", "int4")

__all__ = ["FORMATS", "quantize", "dequantize", "weight_bytes", "merge_report", "quantization_record", "quantize_like",
           "is_quantized", "parameter_shape", "QuantizedLinear", "QuantizedEmbedding"]


@dataclass
class QuantizeTargets(MethodConfig):
    """Which linear layers ``quantize`` replaces (``targets`` / ``exclude`` as for a method)."""

    method: ClassVar[str] = "quantize"


def can_quantize(module: nn.Module) -> bool:
    return type(module) is nn.Linear  # not subclasses: e.g. MultiheadAttention reads its out_proj.weight itself


def quantize(model: nn.Module, format: str = "nf4", *, double_quant: bool = True, group_size: int = 32,
             targets="all-linear", exclude=(), loftq_rank: int | None = None, loftq_iter: int = 5,
             embeddings: bool = False) -> nn.Module:
    """Replace ``model``'s linear layers (every one but the output head, by default) by quantized
    ones, in place; returns the model. Call it before attaching adapters.

    format: ``nf4`` or ``fp4`` (bitsandbytes 4-bit, blocks of 64), ``int8`` (bitsandbytes, one scale per
        row), or ``int4`` (group-wise asymmetric, QA-LoRA's base).
    double_quant: 4-bit only: quantize the blocks' scales too (QLoRA's double quantization).
    group_size: int4 only: input features per group (must divide every quantized layer's input width;
        32 as in the QA-LoRA paper).
    loftq_rank: run LoftQ (``loftq.py``) for LoRA adapters of this rank (or less), ``loftq_iter``
        alternating steps, and attach them with ``lora[init=loftq]``.
    embeddings: quantize the input embedding table too (``QuantizedEmbedding``), and the output
        head: a head tied to the embeddings becomes the same quantized layer, an untied one (still
        in full precision) a quantized layer of its own. ``targets=[]`` then quantizes only these.
        LoftQ does not apply to them (no LoRA targets them).
    """
    _check_settings(format, double_quant, group_size, loftq_rank, loftq_iter)
    if not isinstance(embeddings, bool):
        raise ConfigError(f"quantize: embeddings must be true or false, got {embeddings!r}")
    state = get_state(model)
    if state is not None and state.configs:
        raise StateError(f"quantize the base model before attaching adapters; this model has {sorted(state.configs)} "
                         "(peftlab.delete them, or quantize a fresh model and load the adapters onto it)")
    build = _builder(format, double_quant, group_size)
    linears = _linear_targets(model, targets, exclude) if targets or not embeddings else {}
    tables = _embedding_tables(model) if embeddings else {}
    for name, width in [*((n, m.in_features) for n, m in linears.items()), *tables.items()]:  # all checked before any is replaced
        if format == "int4" and width % group_size:
            raise ConfigError(f"quantize: group_size={group_size} does not divide the {width} input features "
                              f"of '{name}'; choose a group size that divides every layer's input width (e.g. 32)")
    for name, linear in linears.items():
        layer = build(linear)
        if loftq_rank is not None:
            loftq(layer, linear.weight.detach(), min(loftq_rank, *layer.weight_shape), loftq_iter)
        _replace(model, name, layer)
    if embeddings:
        _quantize_embeddings(model, build)
    return model


def _linear_targets(model: nn.Module, targets, exclude) -> dict:
    spec = QuantizeTargets(targets=targets, exclude=list(exclude))
    spec.validate()
    return {name: model.get_submodule(name) for name in find_targets(model, spec, can_quantize)}


def _embedding_tables(model: nn.Module) -> dict:
    """``{name: row width}`` of the input embeddings and the output head, the tables ``embeddings=True`` quantizes."""
    embedding, head = embedding_and_head(model)
    names = {id(m): name for name, m in named_base_modules(model)}
    tables = {names[id(embedding)]: embedding.embedding_dim}
    if type(head) is nn.Linear:
        tables[names[id(head)]] = head.in_features
    return tables


def _quantize_embeddings(model: nn.Module, build) -> None:
    """The input embeddings as a ``QuantizedEmbedding``; a head tied to them becomes its table, an
    untied full-precision head a quantized layer of its own."""
    embedding, head = embedding_and_head(model)
    names = {id(m): name for name, m in named_base_modules(model)}
    quantized = QuantizedEmbedding.from_embedding(embedding, build)
    _replace(model, names[id(embedding)], quantized)
    if type(head) is nn.Linear:
        tied = head.weight is embedding.weight and head.bias is None
        _replace(model, names[id(head)], quantized.table if tied else build(head))


def _check_settings(format, double_quant, group_size, loftq_rank, loftq_iter) -> None:
    if format not in FORMATS:
        raise ConfigError(f"quantize: format must be one of {', '.join(FORMATS)}, got {format!r}")
    if not isinstance(double_quant, bool):
        raise ConfigError(f"quantize: double_quant must be true or false, got {double_quant!r}")
    if not _positive_int(group_size) or group_size % 2:
        raise ConfigError(f"quantize: group_size must be a positive even number of input features, got {group_size!r}")
    if loftq_rank is not None and not _positive_int(loftq_rank):
        raise ConfigError(f"quantize: loftq_rank must be a positive rank (the LoRA r), got {loftq_rank!r}")
    if not _positive_int(loftq_iter):
        raise ConfigError(f"quantize: loftq_iter must be a positive number of LoftQ steps, got {loftq_iter!r}")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _builder(format: str, double_quant: bool, group_size: int):
    """``linear -> quantized layer`` for ``format``."""
    if format == "int4":
        from .int4 import GroupInt4Linear
        return lambda linear: GroupInt4Linear.from_linear(linear, group_size)
    try:
        from .bnb import Bnb4bitLinear, Bnb8bitLinear
    except ImportError:
        raise ConfigError(f"quantize: format {format!r} needs bitsandbytes; pip install 'peftlab[quant]' "
                          "(or use format 'int4', which needs nothing)") from None
    if format == "int8":
        return Bnb8bitLinear.from_linear
    return lambda linear: Bnb4bitLinear.from_linear(linear, format, double_quant)


def dequantize(model: nn.Module) -> nn.Module:
    """Replace every quantized layer by a plain ``nn.Linear`` holding its dequantized weight, in
    place (adapters attached stay attached and now wrap the plain layer); returns the model. Then
    ``peftlab.merge`` + ``peftlab.unload`` give a plain full-precision model."""
    trainable = get_state(model) is None  # a bare model trains in full; under adapters the base stays frozen
    modules = list(named_base_modules(model))
    weights = {}  # id(quantized layer) -> its dequantized weight, shared by all its places (a tied head)
    for name, module in modules:
        if isinstance(module, QuantizedEmbedding):
            weights[id(module.table)] = nn.Parameter(module.dequantize(), requires_grad=trainable)
            embedding = nn.Embedding(module.num_embeddings, module.embedding_dim, module.padding_idx, device="meta")
            embedding.weight = weights[id(module.table)]
            _replace(model, name, embedding.train(module.training))
    for name, module in modules:
        if is_quantized(module):
            if id(module) not in weights:
                weights[id(module)] = nn.Parameter(module.dequantize(), requires_grad=trainable)
            linear = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
            linear.weight = weights[id(module)]
            linear.bias = module.bias
            linear.train(module.training)
            _replace(model, name, linear)
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where module ``name`` is; under an AdapterLayer, as its base layer (and as the
    base its adapters keep a reference to)."""
    parent, child = get_submodule_parent(model, name)
    current = getattr(parent, child)
    if not isinstance(current, AdapterLayer):
        setattr(parent, child, new)
        return
    old, current.base_layer = current.base_layer, new
    for adapter in current.adapters.values():
        if adapter.__dict__.get("_base_ref") is old:
            adapter.__dict__["_base_ref"] = new


def weight_bytes(model: nn.Module) -> dict:
    """Bytes the base model's weights take (adapters not counted; shared tensors once), and what
    the same weights take in fp32: ``total``, ``quantized`` (the quantized layers, their scales and
    biases included; quantized embeddings and a tied head once), ``other`` (embeddings, norms, the head,
    ... in full precision), ``fp32_total``, ``fp32_quantized``."""
    quantized = fp32_quantized = other = fp32_other = 0
    seen = set()
    for _, module in named_base_modules(model):
        module = module.table if isinstance(module, QuantizedEmbedding) else module
        if is_quantized(module):
            if id(module) in seen:
                continue
            seen.add(id(module))
            quantized += module.stored_bytes()
            fp32_quantized += 4 * (module.in_features * module.out_features + (module.out_features if module.bias is not None else 0))
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                other += p.nbytes
                fp32_other += 4 * p.numel()
    return {"total": quantized + other, "quantized": quantized, "other": other,
            "fp32_total": fp32_quantized + fp32_other, "fp32_quantized": fp32_quantized}


def merge_report(model: nn.Module) -> dict:
    """How far each quantized layer's weight is from the one it was asked to hold the last time
    it was requantized (a merge or unmerge into it): per layer and overall. ``mean_abs_change`` is
    the size of the update merged; where the error is of its size, most of the update was lost to
    rounding (merge into ``dequantize``d weights instead)."""
    per_layer = {name: dict(m.requantization) for name, m in named_base_modules(model) if is_quantized(m) and m.requantization}
    if not per_layer:
        return {"layers": 0}
    count = sum(r["count"] for r in per_layer.values())
    return {
        "layers": len(per_layer),
        "max_abs_error": max(r["max_abs_error"] for r in per_layer.values()),
        "mean_abs_error": sum(r["mean_abs_error"] * r["count"] for r in per_layer.values()) / count,
        "mean_abs_change": sum(r["mean_abs_change"] * r["count"] for r in per_layer.values()) / count,
        "per_layer": per_layer,
    }


def quantization_record(model: nn.Module) -> list | None:
    """How the base's layers are quantized, as ``quantize`` settings with the module names they
    apply to (saved with adapters); None for a model in full precision. Quantized embeddings come
    last, as ``{..., "embeddings": true, "modules": [their name]}`` (a tied head goes with them)."""
    modules = list(named_base_modules(model))
    embeddings = [(name, m) for name, m in modules if isinstance(m, QuantizedEmbedding)]
    tables = {id(m.table) for _, m in embeddings}
    groups = {}
    for name, module in modules:
        if is_quantized(module) and id(module) not in tables:
            settings = {**module.recipe(), **(module.loftq or {})}
            groups.setdefault(json.dumps(settings, sort_keys=True), []).append(name)
    record = [{**json.loads(key), "modules": names} for key, names in groups.items()]
    record += [{**m.table.recipe(), "embeddings": True, "modules": [name]} for name, m in embeddings]
    return record or None


def quantize_like(model: nn.Module, record) -> nn.Module:
    """Quantize ``model`` as ``quantization_record`` described another (or an adapter folder's
    model, whose record its weights file holds); returns the model."""
    if not isinstance(record, list):
        from ..formats.io import read_adapter
        record = read_adapter(record)[2].get("base_quantization") or []
    for entry in record:
        settings = {k: v for k, v in entry.items() if k != "modules"}
        quantize(model, targets=[] if entry.get("embeddings") else entry["modules"], **settings)
    return model
