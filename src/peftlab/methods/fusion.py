"""AdapterFusion: "AdapterFusion: Non-Destructive Task Composition for Transfer Learning" (Pfeiffer
et al., EACL 2021, arXiv:2005.00247).

Adapters trained on different tasks each hold some knowledge; multi-task training of one adapter
mixes them but suffers catastrophic interference. AdapterFusion keeps the task adapters frozen
("non-destructive") and learns, in a second stage, how to combine them for a target task: at every
position where the adapters sit, an attention over their outputs, with the query read from the
sub-layer's output ``h`` and keys and values from each adapter's output ``z_n``::

    score_n = (h Q) . (z_n K),    w = softmax_n(score),    fused = sum_n w_n (z_n V)

``Q`` and ``K`` start random (std 0.02) and ``V`` at the identity plus tiny noise (1e-6), as in the
paper, so the fused output starts near the average of the adapters' outputs (so, unlike the other
methods, it is not the base model at init: ``IDENTITY_AT_INIT = False``).

``fusion[adapters=[a,b,c]]`` adds a fusion layer at every module where any of the named adapters
(already attached or loaded bottleneck adapters: houlsby, pfeiffer, parallel, compacter,
compacterpp) sits; with no list it fuses every bottleneck adapter of the model, and the names are
recorded in its config. Each fusion layer computes the named adapters' outputs itself (they run
inside it, not beside it: activate the fusion adapter alone), adds the fused result, and trains
only ``Q``, ``K``, ``V``: the fused adapters are not active, so their parameters are frozen. A saved
fusion adapter holds its own parameters and the names it fuses; loading it needs those adapters
loaded first. Not mergeable: attention over adapter outputs is input-dependent.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn

from ..core import adapters as core
from ..core.config import MethodConfig
from ..core.state import get_state
from ..core.targets import find_targets as find_targets_by_name
from ..core.targets import is_linear
from ..errors import ConfigError, StateError, TargetError
from .bottleneck import EXAMPLE_MODEL_SETTINGS  # noqa: F401  (the property tests' model)
from .bottleneck import BOTTLENECK_METHODS, block_widths, out_width

CATEGORY = "additive"
PAPER = "Pfeiffer et al., 2021 (arXiv:2005.00247)"
MERGEABLE = False
IDENTITY_AT_INIT = False  # the fused adapters' outputs count from the start
INVALID_SETTINGS = ("adapters=[task_a,task_a]", "adapters=[task_a]", "adapters=3")
# Adapters (name: spec) a model needs before fusion attaches; the tests and the method table use them.
EXAMPLE_PREREQUISITES = {"task_a": "houlsby", "task_b": "houlsby"}
DEFAULT_LR = 5e-3
TARGETS = "adapters"  # a fusion layer sits wherever the adapters it fuses sit


@dataclass
class FusionConfig(MethodConfig):
    """adapters: names of the attached bottleneck adapters to fuse (at least two); empty: all of the model's.
    targets: by default every module where those adapters sit; names, roles or regexes narrow that."""

    method: ClassVar[str] = "fusion"
    targets: Any = TARGETS
    adapters: list = field(default_factory=list)

    def validate(self) -> None:
        super().validate()
        names = self.adapters
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(f"fusion: adapters must be a list of adapter names, e.g. fusion[adapters=[a,b]]; got {names!r}")
        if len(set(names)) != len(names):
            raise ConfigError(f"fusion: adapters lists a name twice: {names}")
        if len(names) == 1:
            raise ConfigError(f"fusion: adapters names one adapter ({names[0]!r}); fusion combines at least two")


class FusionAdapter(nn.Module):
    """Attention over the outputs of the named sibling adapters in the same AdapterLayer."""

    method = "fusion"

    def __init__(self, width: int, like: torch.Tensor):
        super().__init__()
        factory = dict(device=like.device, dtype=like.dtype if like.dtype.is_floating_point else torch.float32)
        self.query = nn.Linear(width, width, **factory)
        self.key = nn.Linear(width, width, **factory)
        self.value = nn.Linear(width, width, bias=False, **factory)
        with torch.no_grad():
            for projection in (self.query, self.key):
                nn.init.normal_(projection.weight, std=0.02)
                nn.init.zeros_(projection.bias)
            nn.init.normal_(self.value.weight, std=1e-6)
            self.value.weight.add_(torch.eye(width, **factory))
        self.fused = []  # names of the sibling adapters fused here, set by after_attach

    def bind(self, layer: nn.Module, names: list) -> None:
        self.__dict__["layer"] = layer  # a plain reference, not a submodule: the siblings are not fusion's parameters
        self.fused = [n for n in names if n in layer.adapters]

    def siblings(self) -> list:
        adapters = self.__dict__["layer"].adapters
        missing = [n for n in self.fused if n not in adapters]
        if missing:
            raise StateError(f"fusion: the adapters it fuses, {missing}, were deleted; "
                             "load them again or delete the fusion adapter")
        return [adapters[n] for n in self.fused if not adapters[n].skipped]

    @property
    def skipped(self) -> bool:
        """AdapterDrop: a fusion layer whose adapters are all dropped is dropped too."""
        return not self.siblings()

    def forward(self, x, base_out):
        outputs = torch.stack([adapter(x, base_out) for adapter in self.siblings()], dim=-2)  # (..., adapters, width)
        return fuse(self.query(base_out), self.key(outputs), self.value(outputs))

    def detach_from(self, base: nn.Module) -> None:
        pass


def fuse(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """softmax over adapters of query . key, times the values: query (..., width), keys/values (..., adapters, width)."""
    weights = torch.softmax((keys * query.unsqueeze(-2)).sum(-1), dim=-1)
    return (weights.unsqueeze(-1) * values).sum(-2)


# ---- method protocol ---------------------------------------------------------------------------

Config = FusionConfig


def find_targets(model: nn.Module, config: FusionConfig) -> list[str]:
    """The modules holding any of the fused adapters; an empty ``adapters`` becomes every bottleneck adapter."""
    state = get_state(model)
    attached = state.configs if state is not None else {}

    def is_bottleneck(name):
        return all(c.method in BOTTLENECK_METHODS for c in attached[name])

    names = config.adapters or [n for n in attached if is_bottleneck(n)]
    for name in names:
        if name not in attached:
            raise ConfigError(f"fusion: adapters names {name!r}, but this model has no adapter of that name "
                              f"(it has {sorted(attached) or 'none'}); attach or peftlab.load the adapters to fuse first")
        if not is_bottleneck(name):
            raise ConfigError(f"fusion: adapters names {name!r}, a {'|'.join(c.method for c in attached[name])} adapter; "
                              f"fusion combines bottleneck adapters ({', '.join(BOTTLENECK_METHODS)})")
    if len(names) < 2:
        raise ConfigError(f"fusion: this model has {len(names)} bottleneck adapter(s) ({names}); fusion combines at least two, "
                          "attach them first or name them with adapters=[a,b]")
    config.adapters = list(names)  # the names are saved with the fusion adapter
    positions = [module_name for module_name, layer in core.adapter_layers(model) if any(n in layer.adapters for n in names)]
    # targets (default: all those positions), layers and exclude narrow them as for any method
    asked = config if config.targets != TARGETS else replace(config, targets=["re:" + re.escape(n) for n in positions])
    chosen = [n for n in find_targets_by_name(model, asked, lambda module: True) if n in positions]
    if not chosen:
        raise TargetError(f"fusion: targets {config.targets} select none of the modules where {names} sit ({positions[:4]}...)")
    return chosen


def make_adapter(module: nn.Module, config: FusionConfig, name: str) -> FusionAdapter:
    width = out_width(module) if is_linear(module) else block_widths(module)[1]
    return FusionAdapter(width, next(module.parameters()))


def after_attach(model: nn.Module, name: str, config: FusionConfig) -> None:
    for _, layer in core.adapter_layers(model, name):
        if isinstance(layer.adapters[name], FusionAdapter):
            layer.adapters[name].bind(layer, config.adapters)
