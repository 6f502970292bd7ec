"""Pfeiffer adapters: one bottleneck adapter per layer, after the feed-forward block (Pfeiffer et
al., "AdapterFusion: Non-Destructive Task Composition for Transfer Learning", EACL 2021,
arXiv:2005.00247; the configuration found by their architecture search, used in MAD-X, Pfeiffer et
al., 2020, arXiv:2005.00052).

Houlsby et al. put two adapters in every layer. Pfeiffer et al. searched over placements and found
that a single adapter after the FFN block matches two, with half the parameters and less latency;
this configuration became the default of AdapterHub.

The adapter wraps the FFN's output projection (role ``ffn-out``: ``mlp.down_proj`` on Llama,
``output.dense`` on BERT) and returns ``up(act(down(h)))`` for its output ``h``; the wrapper adds it.
The up-projection starts at zero, so the model starts exactly as the base model. Settings are in
``bottleneck.BottleneckConfig`` (``bottleneck`` or ``reduction``, ``activation``, AdapterDrop's
``drop_layers`` / ``drop_robust``).

Not mergeable: the nonlinearity between the two projections cannot be folded into a weight.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..core.targets import is_linear
from .bottleneck import EXAMPLE_MODEL_SETTINGS, BottleneckConfig, after_attach, serial_adapter  # noqa: F401  (protocol facts)

CATEGORY = "additive"
PAPER = "Pfeiffer et al., 2021 (arXiv:2005.00247)"
MERGEABLE = False
INVALID_SETTINGS = ("reduction=0", "bottleneck=0", "activation=softmax", "drop_layers=-2")
DEFAULT_LR = 5e-3


@dataclass
class PfeifferConfig(BottleneckConfig):
    """One adapter after the FFN output of every layer."""

    method: ClassVar[str] = "pfeiffer"
    targets: Any = "ffn-out"


Config = PfeifferConfig
can_wrap = is_linear
make_adapter = serial_adapter
