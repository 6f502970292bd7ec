"""Houlsby adapters: "Parameter-Efficient Transfer Learning for NLP" (Houlsby et al., ICML 2019,
arXiv:1902.00751).

Fine-tuning a whole pretrained model per task stores a full copy per task. Houlsby et al. freeze
the model and insert two small bottleneck networks into every transformer layer instead: one after
the attention block's output projection and one after the feed-forward block's output projection,
each computing ``h + up(act(down(h)))`` before the residual connection and layer norm. With a
bottleneck of a few percent of the width they come within 0.4% of full fine-tuning on GLUE while
training about 3% of the parameters per task.

Here the adapters wrap the modules of the roles ``attn-out`` and ``ffn-out`` (so the same default
works on Llama, BERT, GPT-2 and OPT); each returns ``up(act(down(h)))`` for the projection's output
``h``, and the wrapper adds it. The up-projection starts at zero, so the model starts exactly as the
base model (the paper's near-identity initialization). The paper also trains the layer norms; here
they stay frozen unless you add them (``houlsby|ln_tuning``). Settings are in
``bottleneck.BottleneckConfig``: ``bottleneck`` or ``reduction``, ``activation``, and AdapterDrop's
``drop_layers`` / ``drop_robust``.

Not mergeable: the nonlinearity between the two projections cannot be folded into a weight.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..core.targets import is_linear
from .bottleneck import EXAMPLE_MODEL_SETTINGS, BottleneckConfig, after_attach, serial_adapter  # noqa: F401  (protocol facts)

CATEGORY = "additive"
PAPER = "Houlsby et al., 2019 (arXiv:1902.00751)"
MERGEABLE = False
INVALID_SETTINGS = ("reduction=0", "bottleneck=-1", "bottleneck=4,reduction=2", "activation=softmax", "drop_layers=-1",
                    "drop_robust=2")
DEFAULT_LR = 5e-3


@dataclass
class HoulsbyConfig(BottleneckConfig):
    """Adapters after the attention output and the FFN output of every layer."""

    method: ClassVar[str] = "houlsby"
    targets: Any = field(default_factory=lambda: ["attn-out", "ffn-out"])


Config = HoulsbyConfig
can_wrap = is_linear
make_adapter = serial_adapter
