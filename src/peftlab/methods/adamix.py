"""AdaMix: Mixture-of-Adaptations for Parameter-efficient Model Tuning (Wang et al., EMNLP 2022,
arXiv:2205.12410).

Why: one bottleneck adapter per position has a fixed, small capacity. AdaMix trains ``M`` of them
per position as a mixture of experts, but routes *randomly* (no router to learn, no load-balancing
loss), and at the end averages the experts' weights into one adapter, so inference costs exactly
what a single adapter costs while training explored several.

What, per adapted module (Houlsby's places by default: the attention output and the FFN output):

- ``M = experts`` down-projections ``D_1..D_M`` (d -> b) and up-projections ``U_1..U_M`` (b -> d);
- training: every forward draws a down expert ``i`` and an up expert ``j`` uniformly and
  independently (each adapter its own draw) and returns ``U_j(act(D_i(h)))`` for the wrapped
  module's output ``h``; the wrapper adds it, as for every serial adapter (``bottleneck.py``);
- consistency (``consistency=w``, default 1): the experts of a pair should agree, so the training
  loss gets ``w * mean_adapters mean((U_j act(D_i h) - U_j' act(D_i' h))^2)`` with ``(i, j)`` the
  pair the forward used and ``(i', j')`` a second draw, on the same ``h`` (the ``regularization``
  hook, which ``peftlab.train`` adds to the loss; ``consistency=0`` turns it off);
- inference (eval mode): the mean of the experts' weights and biases, ``D = mean_k D_k`` and
  ``U = mean_k U_k``, as one adapter ``U(act(D(h)))``.

Every up-projection starts at zero, so the model starts exactly as the base model; the
down-projections start as PyTorch's default ``nn.Linear``, each expert its own draw. The random
draws use torch's generator, so seeded runs repeat, and gradient checkpointing's recomputation
(which restores the generator) sees the same pair. AdapterDrop (``drop_layers`` / ``drop_robust``)
and the other bottleneck settings work as in ``houlsby``.

Differences from the paper: its consistency loss compares the *model's* output distributions of two
stochastic forward passes (a second full forward per step). peftlab's training hooks see neither the
batch nor the loss, and a second forward would double the step, so here each adapter compares its two
pairs' outputs on the input it saw (mean squared difference, one extra adapter pass, no extra model
pass): the same pull of the experts towards agreement, measured where the experts act (the authors'
code weighs its symmetric KL by 100; the scales differ, so ``consistency`` has its own default). The
paper's sharing of one projection across the experts is ``share=down`` or ``share=up`` (one expert
there, ``experts`` on the other side). HF PEFT has no AdaMix, so the adapter (all experts) is saved in
peftlab's own format.

Not mergeable: the nonlinearity between the two projections cannot be folded into a weight (averaging
the experts is the paper's merge, and eval mode does it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.targets import is_linear
from ..errors import ConfigError
from .bottleneck import (EXAMPLE_MODEL_SETTINGS, BottleneckAdapter, BottleneckConfig, after_attach,  # noqa: F401  (protocol)
                         family_adapters, out_width)

CATEGORY = "additive"
PAPER = "Wang et al., 2022 (arXiv:2205.12410)"
MERGEABLE = False
# Twice peftlab's Houlsby / Pfeiffer rate (5e-3, AdamW): a trained pair is a bottleneck adapter, but each expert
# is picked in only about 1/experts of the steps (at 5e-3, 12 steps on the tiny models moved the loss a third as
# far as Houlsby's). Not yet measured for AdaMix on a real task
DEFAULT_LR = 1e-2
INVALID_SETTINGS = ("experts=0", "consistency=-1", "share=both", "reduction=0", "activation=softmax")
SHARES = ("none", "down", "up")


@dataclass
class AdaMixConfig(BottleneckConfig):
    """experts: adapters per position (M); consistency: weight of the agreement loss between two random
    pairs (0 = off); share: none, or the projection (down / up) all experts share; plus the bottleneck
    settings (bottleneck / reduction, activation, AdapterDrop)."""

    method: ClassVar[str] = "adamix"
    targets: Any = field(default_factory=lambda: ["attn-out", "ffn-out"])
    experts: int = 4
    consistency: float = 1.0
    share: str = "none"

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.experts, int) or isinstance(self.experts, bool) or self.experts < 1:
            raise ConfigError(f"{self.method}: experts (adapters per position) must be a positive integer, got {self.experts!r}")
        if isinstance(self.consistency, bool) or not isinstance(self.consistency, (int, float)) or not self.consistency >= 0:
            raise ConfigError(f"{self.method}: consistency (the agreement loss's weight) must be a number >= 0, "
                              f"got {self.consistency!r}")
        if self.share not in SHARES:
            raise ConfigError(f"{self.method}: share (a projection all experts share) must be one of {', '.join(SHARES)}, "
                              f"got {self.share!r}")


# ---- modules -----------------------------------------------------------------------------------

class Experts(nn.Module):
    """``M`` linear maps of one shape: the chosen one (``choice``) in training, their average otherwise."""

    def __init__(self, linears: list):
        super().__init__()
        self.experts = nn.ModuleList(linears)
        self.choice = None

    def averaged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias): the mean of the experts' weights and of their biases."""
        return (torch.stack([e.weight for e in self.experts]).mean(0),
                torch.stack([e.bias for e in self.experts]).mean(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.choice is None:
            return nn.functional.linear(x, *self.averaged())
        return self.experts[self.choice](x)


def expert_linears(count: int, width_in: int, width_out: int, like: torch.Tensor, *, zero: bool) -> Experts:
    dtype = like.dtype if like.dtype.is_floating_point else torch.float32
    linears = [nn.Linear(width_in, width_out, device=like.device, dtype=dtype) for _ in range(count)]
    if zero:
        for linear in linears:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
    return Experts(linears)


def draw_pair(downs: int, ups: int) -> tuple[int, int]:
    """A random (down expert, up expert), each uniform, drawn independently."""
    return int(torch.randint(downs, ())), int(torch.randint(ups, ()))


class AdaMixAdapter(BottleneckAdapter):
    """A bottleneck adapter whose projections are expert sets: a random pair per training forward."""

    def __init__(self, down: Experts, up: Experts, config: AdaMixConfig, module_name: str):
        super().__init__(down, up, config, module_name)
        self.counts = (len(down.experts), len(up.experts))
        self.consistency = config.consistency
        self.last_pair = None  # the (down, up) pair of the latest training forward
        self.seen = None  # (input, down, up) of the latest training forward, for the consistency loss

    def pair_output(self, h: torch.Tensor, pair: tuple | None) -> torch.Tensor:
        """``U_j(act(D_i(h)))`` for ``pair = (i, j)``, or the averaged adapter for ``None``."""
        self.down.choice, self.up.choice = pair if pair is not None else (None, None)
        try:
            return self.bottleneck(h)
        finally:
            self.down.choice = self.up.choice = None

    def forward(self, x, base_out):
        if not self.training:
            return self.pair_output(base_out, None)
        pair = draw_pair(*self.counts)
        self.last_pair = pair
        if self.consistency and torch.is_grad_enabled():
            self.seen = (base_out.detach(), pair)
        return self.pair_output(base_out, pair)


def averaged_adapter(adapter: AdaMixAdapter) -> tuple[nn.Linear, nn.Linear]:
    """The one adapter inference uses: (down, up) ``nn.Linear``s holding the experts' mean weights."""
    pieces = []
    for experts in (adapter.down, adapter.up):
        weight, bias = experts.averaged()
        linear = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        pieces.append(linear)
    return pieces[0], pieces[1]


# ---- the consistency loss ------------------------------------------------------------------------

def uses_hook(config: AdaMixConfig, hook: str) -> bool:
    return hook == "regularization" and config.consistency > 0


def regularization(model: nn.Module, name: str, config: AdaMixConfig):
    """``consistency *`` the mean over adapters of the squared difference between the latest forward's
    pair and a second random pair on the same input; None when no adapter ran a training forward."""
    terms = []
    for _, adapter in family_adapters(model, name, config.method):
        seen, adapter.seen = adapter.seen, None
        if seen is None:
            continue
        h, pair = seen
        terms.append((adapter.pair_output(h, pair) - adapter.pair_output(h, draw_pair(*adapter.counts))).pow(2).mean())
    return config.consistency * torch.stack(terms).mean() if terms else None


Config = AdaMixConfig
can_wrap = is_linear


def make_adapter(module: nn.Module, config: AdaMixConfig, module_name: str) -> AdaMixAdapter:
    width = out_width(module)
    size = config.bottleneck_for(width)
    down = expert_linears(1 if config.share == "down" else config.experts, width, size, module.weight, zero=False)
    up = expert_linears(1 if config.share == "up" else config.experts, size, width, module.weight, zero=True)
    return AdaMixAdapter(down, up, config, module_name)
