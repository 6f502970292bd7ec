"""Parallel adapters: "Towards a Unified View of Parameter-Efficient Transfer Learning" (He et al.,
ICLR 2022, arXiv:2110.04366).

He et al. show that prefix tuning, LoRA and adapters all add a modification ``delta h`` to some
hidden state, and differ in what ``delta h`` reads and how it is inserted. A serial adapter reads
the sub-layer's output; a parallel adapter reads the sub-layer's INPUT, like prefix tuning and
LoRA do, and its output is added to the sub-layer's output: for the FFN block,
``FFN(x) + s * up(act(down(x)))``. In their study the parallel adapter at the FFN, scaled by a
fixed ``s = 4`` ("scaled PA"), beats serial adapters at the same budget and is the FFN half of
their MAM adapter. The up-projection starts at zero, so the model starts as the base model.

Placement, the same default for every architecture: the adapter wraps the FFN's output projection
(role ``ffn-out``) and reads the FFN block's input, captured by a forward pre-hook on the block's
FFN-input module (role ``mlp``: Llama's and GPT-2's ``mlp``, BERT's ``intermediate``; else the
first ``ffn-in`` projection, OPT's ``fc1``). The hook is registered when the adapter is attached
and removed when it is deleted. BERT needs this because its FFN is split in two modules; on Llama
and GPT-2, where the FFN is one module, you may also wrap that block itself (``targets=mlp``, the
same function without a hook), or an attention block (``targets=attention``: the attention-level
parallel adapter of the paper's ablations).

Not mergeable: the nonlinearity between the two projections cannot be folded into a weight.
Settings: ``scale`` (``s``) and those of ``bottleneck.BottleneckConfig``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..core.layer import main_input
from ..core.targets import ROLES, is_linear, named_base_modules
from ..errors import ConfigError, StateError, TargetError
from . import bottleneck
from .bottleneck import EXAMPLE_MODEL_SETTINGS  # noqa: F401  (the property tests' model)
from .bottleneck import BottleneckAdapter, BottleneckConfig, block_widths, linear_pair, out_width

CATEGORY = "additive"
PAPER = "He et al., 2022 (arXiv:2110.04366)"
MERGEABLE = False
INVALID_SETTINGS = ("scale=0", "reduction=0", "activation=relu6")
DEFAULT_LR = 5e-3
FFN_INPUT_ROLES = ("mlp", "ffn-in")  # the module whose input is the FFN's input, in order of preference


@dataclass
class ParallelConfig(BottleneckConfig):
    """scale: the fixed factor ``s`` on the adapter's output (4 in the paper's scaled parallel adapter)."""

    method: ClassVar[str] = "parallel"
    targets: Any = "ffn-out"
    scale: float = 4.0

    def validate(self) -> None:
        super().validate()
        if not (isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool) and self.scale > 0):
            raise ConfigError(f"{self.method}: scale must be a positive number (4 in the paper), got {self.scale!r}")


class ParallelAdapter(BottleneckAdapter):
    """``s * up(act(down(x)))`` for ``x`` the input of the FFN (or of the wrapped block)."""

    def __init__(self, down, up, config: ParallelConfig, module_name: str, wraps_block: bool):
        super().__init__(down, up, config, module_name, scale=config.scale)
        self.wraps_block = wraps_block  # else: wraps the FFN's output projection, reads the captured FFN input
        self.ffn_input = None

    def capture(self, module, args, kwargs) -> None:
        if not self.skipped:  # AdapterDrop: a skipped adapter keeps nothing
            self.ffn_input = main_input(args, kwargs)

    def forward(self, x, base_out):
        if self.wraps_block:
            return self.bottleneck(x)
        ffn_input, self.ffn_input = self.ffn_input, None  # used once: no activation outlives its forward
        if ffn_input is None:
            raise StateError("parallel: the FFN output projection ran without its block's FFN input module running first; "
                             "a parallel adapter on ffn-out needs the whole FFN block to run (or target the block: targets=mlp)")
        if ffn_input.shape[0] != x.shape[0]:
            raise StateError("parallel: an adapter on ffn-out reads the FFN input of the whole batch and cannot be routed "
                             "per row; run it alone with set_active, or target the FFN block (targets=mlp)")
        return self.bottleneck(ffn_input)


def can_wrap(module: nn.Module) -> bool:
    return any(is_linear(m) for m in module.modules())


def make_adapter(module: nn.Module, config: ParallelConfig, name: str) -> ParallelAdapter:
    wraps_block = not is_linear(module)
    if wraps_block:
        width_in, width_out = block_widths(module)
    elif any(re.fullmatch(pattern, name) for pattern in ROLES["ffn-out"]):
        width_in = width_out = out_width(module)
    else:
        raise TargetError(f"parallel: '{name}' is a linear layer but not an FFN output projection; a parallel adapter "
                          "wraps ffn-out (the default, reading the FFN's input) or a whole block (targets=mlp or attention)")
    like = next(module.parameters())
    down, up = linear_pair(width_in, config.bottleneck_for(width_in), width_out, like)
    return ParallelAdapter(down, up, config, name, wraps_block)


def after_attach(model: nn.Module, name: str, config: ParallelConfig) -> None:
    """Hook each ffn-out adapter to the module whose input is its block's FFN input."""
    modules = dict(named_base_modules(model))
    for module_name, adapter in bottleneck.family_adapters(model, name, config.method):
        if not adapter.wraps_block:
            source = ffn_input_module(modules, module_name)
            adapter.hooks.append(source.register_forward_pre_hook(adapter.capture, with_kwargs=True))
    bottleneck.after_attach(model, name, config)


def ffn_input_module(modules: dict, module_name: str) -> nn.Module:
    """In the transformer block of ``module_name`` (an FFN output projection), the module that reads the FFN's input."""
    found = re.match(r"(.*?\.\d+\.)", module_name)
    block = found.group(1) if found else ""
    for role in FFN_INPUT_ROLES:
        for other, module in modules.items():
            if other.startswith(block) and any(re.fullmatch(pattern, other) for pattern in ROLES[role]):
                return module
    raise TargetError(f"parallel: found no FFN input module (roles {', '.join(FFN_INPUT_ROLES)}) in the block of "
                      f"'{module_name}', so the adapter cannot read the FFN's input; target the whole FFN block instead "
                      "(e.g. targets=mlp)")


Config = ParallelConfig
