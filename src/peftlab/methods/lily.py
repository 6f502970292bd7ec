"""LiLy: Low-Rank Interconnected Adaptation across Layers (Zhong, Zhao & Zhou, ACL 2025, arXiv:2407.09946).

LoRA gives every layer its own pair ``(A, B)``. LiLy cuts the pairs apart and shares both halves
across layers: a down-projection ``A`` (r x in) is shared by ``stride_A`` neighbouring layers
("locally shared"), and one set of ``num_B`` up-projection experts ``B_1 .. B_E`` (each r x out)
is shared by all layers of a kind ("globally shared"). Each layer keeps a small router
``R`` (num_B x r) that decides, from the data, how much of each expert it uses::

    h = A x,    p = mean over the batch's tokens of softmax(R h),    delta y = scaling * h (sum_e p_e B_e)

Sharing frees the budget for a larger ``r`` (the paper's point: the update's rank, not the count
of pairs, limits LoRA), and the router keeps the shared experts from collapsing into one.
``A`` and the routers start Kaiming-uniform, the experts at zero, so the model is exactly the base
model at step 0 (``init=random`` draws the experts too). Which layers share is decided as in HF
PEFT: layers are grouped by their name's last part and their weight's shape (``share_by=name``:
the ``q_proj`` of every block), in model order; each group has one expert set, and consecutive
runs of ``stride_A`` layers in it one ``A``. ``share_by=shape`` groups by shape alone (what PEFT
does for a regex ``target_modules``), ``share_by=layer`` shares nothing across layers (PEFT with
full module paths). Shared tensors live on the group's first layer (as VeRA's pair and VB-LoRA's
bank do, ``methods/vera.py``) and are read by the others: stored, saved and trained once.

The router's weights are one vector per call, averaged over every token of every row (as in the
paper's code and PEFT), so one row's output depends on the others in its batch and on padding,
and a decoding step with a KV cache routes on the new tokens only. Hence: the update depends on
the input, so it cannot be merged into ``W`` (``MERGEABLE = False``, as in PEFT), and it is not
row-separable, so ``peftlab.routing`` refuses to run a LiLy adapter on part of a batch.

Reads and writes HF PEFT's ``LILY`` format exactly (``formats/hf_lily.py``). Differences from HF PEFT:
- defaults are PEFT's (r=32, stride_A=1, num_B=2, scaling=1) except ``targets`` (peftlab's
  ``all-linear``; PEFT's default is q/v projections); PEFT's ``init_weights`` is ``init`` here;
- PEFT derives the grouping from the form of ``target_modules``; peftlab names it (``share_by``),
  and the converter writes ``target_modules`` (with ``exclude_modules`` where needed) so that
  PEFT derives the same groups, and reads a PEFT file's groups back, refusing one whose groups
  none of the three rules reproduce;
- ``nn.Linear`` only (quantized linear bases included), as in PEFT.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import MethodConfig
from ..errors import ConfigError, StateError
from .lora import base_weight
from .vera import can_wrap, refuse_non_linear  # noqa: F401  (protocol: nn.Linear, Conv1D refused clearly)

CATEGORY = "reparameterized"
PAPER = "Zhong, Zhao & Zhou, 2025 (arXiv:2407.09946)"
MERGEABLE = False  # the experts' mixture depends on the input
INVALID_SETTINGS = ("r=0", "stride_A=0", "num_B=1", "scaling=nan", "share_by=block", "init=ones")
# Neither PEFT's docs nor its config give a rate for LiLy; its factors start as LoRA's do (A random, B zero),
# so LoRA's usual 1e-3 (the benchmark's fallback for the LoRA family)
DEFAULT_LR = 1e-3
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}  # weights at a pretrained scale: a random tiny model's blocks barely act
SHARE_RULES = ("name", "shape", "layer")


@dataclass
class LilyConfig(MethodConfig):
    """r: rank of A and of each expert; stride_A: neighbouring layers (of a group) sharing one A;
    num_B: expert up-projections shared by a group (at least 2, for the router to learn);
    scaling: multiplies the update; share_by: how layers are grouped ("name": last name part and
    shape, "shape": shape only, "layer": no sharing across layers); init: "zeros" (experts start
    at zero: the base model) or "random"."""

    method: ClassVar[str] = "lily"
    r: int = 32
    stride_A: int = 1
    num_B: int = 2
    scaling: float = 1.0
    share_by: str = "name"
    init: str = "zeros"

    def validate(self) -> None:
        super().validate()
        for key, low in (("r", 1), ("stride_A", 1), ("num_B", 2)):
            value = getattr(self, key)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
                extra = " (the router mixes the experts, so it needs two to learn)" if key == "num_B" else ""
                raise ConfigError(f"lily: {key} must be an integer >= {low}{extra}, got {value!r}")
        s = self.scaling
        if not (isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)):
            raise ConfigError(f"lily: scaling must be a finite number (PEFT's default is 1.0), got {s!r}")
        if self.share_by not in SHARE_RULES:
            raise ConfigError(f"lily: share_by must be one of {', '.join(SHARE_RULES)}, got {self.share_by!r}")
        if self.init not in ("zeros", "random"):
            raise ConfigError(f"lily: init must be 'zeros' (experts at zero: the base model at step 0) or 'random', "
                              f"got {self.init!r}")


# ---- pure math -------------------------------------------------------------------------------

def expert_weights(hidden: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """(num_B,) mixture weights: each token's softmax over ``router @ h``, averaged over all tokens."""
    probs = torch.softmax(F.linear(hidden, router), dim=-1)
    return probs.reshape(-1, router.shape[0]).mean(dim=0)


def combined_expert(weights: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """(r x out): the experts ``B`` (num_B * r x out, expert e in rows e*r .. e*r + r - 1) mixed by ``weights``."""
    return torch.einsum("e,eio->io", weights, B.reshape(weights.shape[0], -1, B.shape[1]))


def lily_delta(x, A, B, router, scaling: float) -> torch.Tensor:
    """``scaling * (A x) @ sum_e p_e B_e`` for inputs ``x`` (..., in)."""
    hidden = F.linear(x, A)
    return hidden @ combined_expert(expert_weights(hidden, router), B) * scaling


def group_key(module_name: str, shape: tuple, share_by: str):
    """The sharing group of a layer: its name's last part and weight shape, its shape, or itself."""
    if share_by == "name":
        return (module_name.rsplit(".", 1)[-1], tuple(shape))
    return tuple(shape) if share_by == "shape" else module_name


def sharing(names_and_shapes, share_by: str, stride_A: int) -> dict:
    """``{module name: (A owner, B owner)}`` for layers given in model order."""
    groups: dict = {}
    for module_name, shape in names_and_shapes:
        groups.setdefault(group_key(module_name, shape, share_by), []).append(module_name)
    owners = {}
    for members in groups.values():
        for i, module_name in enumerate(members):
            owners[module_name] = (members[(i // stride_A) * stride_A], members[0])
    return owners


# ---- module ----------------------------------------------------------------------------------

class LilyLinear(nn.Module):
    """LiLy for ``nn.Linear``: returns ``scaling * (A x) @ mix(B)``; ``lily_A`` and ``lily_B`` live on
    their owner layers (set by ``after_attach``), ``lily_router`` on every layer."""

    def __init__(self, base: nn.Module, config: LilyConfig):
        super().__init__()
        self.out_features, self.in_features = base_weight(base).shape
        w = base.weight
        like = dict(device=w.device, dtype=w.dtype if w.dtype.is_floating_point else torch.float32)
        self.r, self.num_B, self.scaling = config.r, config.num_B, config.scaling
        self.lily_A = nn.Parameter(torch.empty(config.r, self.in_features, **like))
        self.lily_B = nn.Parameter(torch.zeros(config.num_B * config.r, self.out_features, **like))
        self.lily_router = nn.Parameter(torch.empty(config.num_B, config.r, **like))
        for p in (self.lily_A, self.lily_router) + ((self.lily_B,) if config.init == "random" else ()):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))  # bound 1 / sqrt(fan_in), PEFT's nn.Linear init

    def share(self, key: str, owner: "LilyLinear") -> None:
        """Read ``key`` (lily_A or lily_B) from ``owner`` from now on; this layer's own copy goes."""
        if owner is not self:
            del self._parameters[key]
            self.__dict__[key + "_owner"] = owner  # a plain reference, not a submodule: stored once

    def shared(self, key: str) -> torch.Tensor:
        return self.__dict__.get(key + "_owner", self)._parameters[key]

    def owner(self, key: str) -> "LilyLinear":
        return self.__dict__.get(key + "_owner", self)

    def detach_from(self, base: nn.Module) -> None:
        """Nothing to undo on the base (LiLy never changes it)."""

    def forward(self, x, base_out):
        state = self.__dict__.get("peftlab_state")
        routing = state.routing if state is not None else None
        if routing is not None and x.shape[0] != routing.rows:
            raise StateError("lily: the router averages its expert weights over every row of the batch, so a LiLy "
                             "adapter cannot run on part of a routed batch; run it alone with set_active")
        A = self.shared("lily_A")
        delta = lily_delta(x.to(A.dtype), A, self.shared("lily_B"), self.lily_router, self.scaling)
        return delta.to(base_out.dtype)


# ---- method protocol -------------------------------------------------------------------------

Config = LilyConfig


def make_adapter(module: nn.Module, config: LilyConfig, name: str) -> nn.Module:
    refuse_non_linear("lily", module, name)
    return LilyLinear(module, config)


def after_attach(model: nn.Module, name: str, config: LilyConfig) -> None:
    """Group the adapted layers, let each read the shared A and experts from their owners, and give
    every layer the model's state (to refuse per-row routing)."""
    from ..core.adapters import adapter_layers, method_adapters

    adapters = dict(method_adapters(model, name, "lily"))
    states = {n: layer._state for n, layer in adapter_layers(model, name)}
    owners = sharing([(n, (a.out_features, a.in_features)) for n, a in adapters.items()], config.share_by, config.stride_A)
    for module_name, adapter in adapters.items():
        a_owner, b_owner = owners[module_name]
        adapter.share("lily_A", adapters[a_owner])
        adapter.share("lily_B", adapters[b_owner])
        adapter.__dict__["peftlab_state"] = states[module_name]  # the layer's (shared) state: routing
