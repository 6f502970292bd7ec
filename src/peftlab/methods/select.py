"""Structured selection: train some modules of the model in full and freeze the rest.

The oldest way to fine-tune cheaply is to pick a part of the network and train only that part:
the top layers (Lee et al., 2019, "What Would Elsa Do? Freezing Layers During Transformer
Fine-Tuning", arXiv:1911.03090, find that training the top quarter of the layers keeps about 90%
of full fine-tuning quality), the attention blocks only (Touvron et al., 2022, "Three things
everyone should know about Vision Transformers", arXiv:2203.09795), or the cross-attention of an
encoder-decoder only (Gheini et al., 2021, "Cross-Attention is All You Need", arXiv:2104.08771).
It is the baseline every PEFT method should beat, and with narrow targets a method in itself::

    select[targets=attention,layers=[4,5]]    # the attention blocks of blocks 4 and 5
    select[targets=crossattention]            # cross-attention only
    select[top_layers=2]                      # every linear layer of the last two blocks
    select[targets=[all-linear,norms]]        # full fine-tuning of every linear layer and norm

``targets`` may name containers (``self_attn``, the roles ``attention`` and ``mlp``): they stand
for the modules inside them that have parameters. The default, ``all-linear``, is full
fine-tuning of every linear layer but the output head.

Design: the base stays frozen and untouched; each selected module gets a trainable delta for each
of its parameters, initialised to zero (``ParameterDelta``). The module then computes with
``theta + delta``, so the model is exactly the base at init, ``disabled()`` is exactly the base,
several named selections coexist on one base, and only the deltas are saved. When one adapter
runs alone, the module runs once with ``theta + delta``; otherwise the adapter adds
``f(x; theta + delta) - f(x; theta)`` to the module's output. Mergeable: merging adds the deltas
to the parameters (``theta += delta``), unmerging subtracts them.

The same machinery serves LayerNorm tuning (``ln_tuning.py``), which is this method restricted to
the norms, in HF PEFT's format.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
import torch.nn.functional as F
from torch.func import functional_call

from ..core.config import MethodConfig
from ..errors import ConfigError
from ..quant.layers import is_quantized

CATEGORY = "selective"
PAPER = "Lee et al., 2019 (arXiv:1911.03090)"
MERGEABLE = True
INVALID_SETTINGS = ("top_layers=0", "top_layers=two", "top_layers=1,layers=[0]")
DEFAULT_LR = 1e-4
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}  # weights at a pretrained scale: a random tiny model's blocks barely act


@dataclass
class SelectConfig(MethodConfig):
    """targets: the modules to train in full (default: every linear layer but the head);
    top_layers: train only the last k numbered blocks (instead of ``layers``)."""

    method: ClassVar[str] = "select"
    top_layers: int | None = None

    def validate(self) -> None:
        super().validate()
        k = self.top_layers
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise ConfigError(f"select: top_layers must be a positive number of blocks, got {k!r}")
        if k is not None and self.layers is not None:
            raise ConfigError(f"select: give either layers ({self.layers}) or top_layers ({k}), not both")

    def block_indices(self, num_blocks: int) -> list | None:
        k = self.top_layers
        if k is None:
            return self.layers
        if k > num_blocks:
            found = f"only {num_blocks} numbered blocks" if num_blocks else "no numbered blocks (names like 'layers.0')"
            raise ConfigError(f"select: top_layers={k}, but this model has {found}; use a smaller top_layers or targets")
        return list(range(num_blocks - k, num_blocks))


def own_parameters(module: nn.Module):
    """``(name, parameter)`` for a module's own floating-point parameters (not its children's)."""
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.dtype.is_floating_point]


def call_with(base: nn.Module, params: dict, x):
    """``base(x)`` computed with ``params`` in place of its own parameters. LayerNorm and Linear
    call their functional form directly; ``functional_call`` (any module) swaps parameters in
    and out on every call, which costs more than a small norm itself."""
    if type(base) is nn.LayerNorm:
        return F.layer_norm(x, base.normalized_shape, params.get("weight", base.weight), params.get("bias", base.bias),
                            base.eps)
    if type(base) is nn.Linear:
        return F.linear(x, params.get("weight", base.weight), params.get("bias", base.bias))
    return functional_call(base, params, (x,))


class ParameterDelta(nn.Module):
    """A trainable delta, zero at init, for each parameter of the wrapped module: the module
    computes with ``theta + delta``."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.deltas = nn.ParameterDict({name: nn.Parameter(torch.zeros_like(p)) for name, p in own_parameters(base)})
        self.__dict__["_base_ref"] = base  # a plain reference, not a submodule

    def adapted(self, base: nn.Module) -> dict:
        """The module's parameters with the deltas added."""
        return {name: getattr(base, name) + delta for name, delta in self.deltas.items()}

    def forward(self, x, base_out):
        base = self.__dict__["_base_ref"]
        return call_with(base, self.adapted(base), x) - base(x)

    def fused_forward(self, base: nn.Module, x):
        return call_with(base, self.adapted(base), x)

    def merge(self, base: nn.Module) -> None:
        with torch.no_grad():
            for name, delta in self.deltas.items():
                getattr(base, name).add_(delta)

    def unmerge(self, base: nn.Module) -> None:
        with torch.no_grad():
            for name, delta in self.deltas.items():
                getattr(base, name).sub_(delta)

    def detach_from(self, base: nn.Module) -> None:
        pass


# ---- method protocol -------------------------------------------------------------------------

Config = SelectConfig


def can_wrap(module: nn.Module) -> bool:
    """A module with parameters of its own and no children (linear layers, norms, embeddings)."""
    return (bool(own_parameters(module)) or is_quantized(module)) and not list(module.children())


def make_adapter(module: nn.Module, config: SelectConfig, name: str) -> nn.Module:
    if is_quantized(module):
        raise ConfigError(f"{config.method}: '{name}' is quantized ({module.format}); training its weight in full would "
                          "need it in full precision. Select other modules (e.g. targets=norms), or use a low-rank "
                          "method such as lora on a quantized base")
    return ParameterDelta(module)
