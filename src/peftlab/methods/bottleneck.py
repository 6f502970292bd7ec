"""What the bottleneck-adapter family shares (Houlsby, Pfeiffer, parallel, Compacter, AdapterFusion).

Not a method itself: ``houlsby.py``, ``pfeiffer.py``, ``parallel.py``, ``compacter.py`` and
``compacterpp.py`` are thin method files over the config, modules and AdapterDrop logic here.

A bottleneck adapter is the small network ``up(act(down(h)))``: a projection from the model width
``d`` down to a bottleneck ``b << d`` (``bottleneck=b``, or ``reduction=r`` for ``b = d // r``), a
nonlinearity, and a projection back up to ``d``. Its output is added to a hidden state (an
``AdapterLayer`` adds what an adapter returns), and the up-projection starts at zero, so at step 0
the model is exactly the base model: the near-identity start Houlsby et al. prescribe. The
down-projection starts as PyTorch's default ``nn.Linear`` (uniform in +-1/sqrt(d)), as in He et al.'s
code for the unified view. The nonlinearity between the projections makes these adapters
impossible to fold into the base weights: none of them merges.

Where ``h`` comes from makes the family: a serial adapter (Houlsby, Pfeiffer, Compacter) reads the
output of the projection it wraps and its result is added to that output; a parallel adapter reads
the input of the FFN block and adds to the block's output (``parallel.py``).

AdapterDrop (Rücklé et al., 2021, "AdapterDrop: On the Efficiency of Adapters in Transformers",
arXiv:2010.11918), for every member: ``drop_layers=n`` skips the adapters of the lowest ``n``
transformer layers (block index < n); a skipped adapter is not called at all (``skipped``, which
``AdapterLayer`` checks), so it costs nothing and gets no gradient. Without ``drop_robust`` this is
the paper's "specialized AdapterDrop": the same layers are skipped in training and inference. With
``drop_robust=true`` it is "robust AdapterDrop": before every training forward a count ``k`` is drawn
uniformly from ``{0, ..., L-1}`` (``L`` = the number of layers the adapter spans) and the lowest ``k``
layers' adapters are skipped for that batch, so one trained adapter serves any ``drop_layers`` at
inference (choose it later with ``set_drop_layers``). The draw uses torch's generator, so seeded
runs, resumed runs and gradient checkpointing's recomputation all see the same ``k``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core import adapters as core
from ..core import model_adapters
from ..core.config import MethodConfig
from ..core.state import require_state
from ..core.targets import is_linear, layer_index
from ..errors import ConfigError, TargetError
from .lora import base_weight

DEFAULT_REDUCTION = 16
# The tiny test models are initialised with std 0.02, so a sub-layer's output (what a serial adapter reads)
# has an RMS of 0.001 to 0.007, against 1.5 (attention) and 18 (FFN) in SmolLM2-135M (weights of std 0.18):
# the adapter could hardly learn there. The property tests use weights of a pretrained scale instead.
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}
ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
}
# The methods whose adapters compute a bottleneck delta that AdapterFusion can fuse.
BOTTLENECK_METHODS = ("houlsby", "pfeiffer", "parallel", "compacter", "compacterpp")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class BottleneckConfig(MethodConfig):
    """bottleneck: the adapter's inner width, or reduction: width // reduction (exactly one of the two;
    neither means reduction=16); activation: the nonlinearity (relu, gelu, gelu_tanh, silu/swish, tanh);
    drop_layers: AdapterDrop, skip the adapters of the lowest n transformer layers; drop_robust: in
    training, skip the lowest k layers for a k drawn anew for every batch (robust AdapterDrop)."""

    method: ClassVar[str] = ""
    bottleneck: int | None = None
    reduction: int | None = None
    activation: str = "relu"
    drop_layers: int = 0
    drop_robust: bool = False

    def validate(self) -> None:
        super().validate()
        if self.bottleneck is not None and self.reduction is not None:
            raise ConfigError(f"{self.method}: set either bottleneck (the inner width) or reduction (width // reduction), "
                              f"not both; got bottleneck={self.bottleneck}, reduction={self.reduction}")
        for key in ("bottleneck", "reduction"):
            value = getattr(self, key)
            if value is not None and not (_is_int(value) and value > 0):
                raise ConfigError(f"{self.method}: {key} must be a positive integer, got {value!r}")
        if self.bottleneck is None and self.reduction is None:
            self.reduction = DEFAULT_REDUCTION
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"{self.method}: unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        if not (_is_int(self.drop_layers) and self.drop_layers >= 0):
            raise ConfigError(f"{self.method}: drop_layers (AdapterDrop: skip the adapters of the lowest n layers) must be "
                              f"a non-negative integer, got {self.drop_layers!r}")
        if not isinstance(self.drop_robust, bool):
            raise ConfigError(f"{self.method}: drop_robust must be true or false, got {self.drop_robust!r}")

    def bottleneck_for(self, width: int) -> int:
        size = self.bottleneck or width // self.reduction
        if size < 1:
            raise ConfigError(f"{self.method}: reduction={self.reduction} leaves no bottleneck for width {width} "
                              f"({width} // {self.reduction} = 0); use a reduction of at most {width}, or set bottleneck")
        return size


# ---- modules -----------------------------------------------------------------------------------

class BottleneckAdapter(nn.Module):
    """``scale * up(act(down(h)))`` with ``h`` the wrapped module's output (serial placement).

    ``down`` and ``up`` are any modules mapping the last dimension (``nn.Linear`` here, PHM layers in
    Compacter); ``module_name`` gives the transformer layer index AdapterDrop uses.
    """

    def __init__(self, down: nn.Module, up: nn.Module, config: BottleneckConfig, module_name: str, scale: float = 1.0):
        super().__init__()
        self.down, self.act, self.up = down, ACTIVATIONS[config.activation](), up
        self.scale = scale
        self.method = config.method  # which registered method built this (the class is shared)
        self.layer = layer_index(module_name)
        self.drop_layers, self.drop_robust = config.drop_layers, config.drop_robust
        self.drop_count = 0  # robust AdapterDrop: layers below this are skipped in the current training batch
        self.hooks = []  # handles of hooks this adapter put on other modules, removed by detach_from

    @property
    def skipped(self) -> bool:
        """AdapterDrop: True when this adapter sits in a layer that is dropped right now."""
        if self.layer is None:
            return False
        lowest = self.drop_count if self.training and self.drop_robust else self.drop_layers
        return self.layer < lowest

    def bottleneck(self, h: torch.Tensor) -> torch.Tensor:
        out = self.up(self.act(self.down(h)))
        return out * self.scale if self.scale != 1 else out

    def forward(self, x, base_out):
        return self.bottleneck(base_out)

    def detach_from(self, base: nn.Module) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()


def linear_pair(width_in: int, size: int, width_out: int, like: torch.Tensor) -> tuple[nn.Linear, nn.Linear]:
    """Down- and up-projections on ``like``'s device: the down one PyTorch's default init, the up one zero."""
    dtype = like.dtype if like.dtype.is_floating_point else torch.float32
    down = nn.Linear(width_in, size, device=like.device, dtype=dtype)
    up = nn.Linear(size, width_out, device=like.device, dtype=dtype)
    nn.init.zeros_(up.weight)
    nn.init.zeros_(up.bias)
    return down, up


def out_width(linear: nn.Module) -> int:
    return base_weight(linear).shape[0]


def block_widths(module: nn.Module) -> tuple[int, int]:
    """(input width, output width) of a block: the input of its first linear layer, the output of its last."""
    linears = [m for m in module.modules() if is_linear(m)]
    if not linears:
        raise TargetError(f"{type(module).__name__} has no linear layer, so its input and output widths are unknown; "
                          "target a projection or a block such as mlp or attention")
    return base_weight(linears[0]).shape[1], out_width(linears[-1])


def serial_adapter(module: nn.Module, config: BottleneckConfig, module_name: str) -> BottleneckAdapter:
    width = out_width(module)
    down, up = linear_pair(width, config.bottleneck_for(width), width, module.weight)
    return BottleneckAdapter(down, up, config, module_name)


# ---- AdapterDrop -------------------------------------------------------------------------------

def family_adapters(model: nn.Module, name: str, method: str) -> list:
    """``(module name, adapter)`` of one method in adapter ``name``, in module order."""
    return list(core.method_adapters(model, name, method))


def after_attach(model: nn.Module, name: str, config: BottleneckConfig) -> None:
    """Robust AdapterDrop's per-batch draw: a pre-hook on the backbone, owned by the first adapter."""
    if not config.drop_robust:
        return
    adapters = [adapter for _, adapter in family_adapters(model, name, config.method)]
    layers = [a.layer for a in adapters if a.layer is not None]
    if not layers:
        return
    span = max(layers) + 1

    def draw(module, args):
        if module.training:
            count = int(torch.randint(span, ()))
            for adapter in adapters:
                adapter.drop_count = count

    adapters[0].hooks.append(model_adapters.backbone(model).register_forward_pre_hook(draw))


def set_drop_layers(model: nn.Module, name: str, count: int) -> None:
    """Skip the bottleneck adapters of adapter ``name`` in the lowest ``count`` layers from now on
    (AdapterDrop at inference, e.g. after robust training); saving records the new count."""
    state = require_state(model)
    state.check_known([name])
    if not (_is_int(count) and count >= 0):
        raise ConfigError(f"drop_layers must be a non-negative integer, got {count!r}")
    configs = [c for c in state.configs[name] if c.method in BOTTLENECK_METHODS]
    if not configs:
        raise ConfigError(f"adapter {name!r} has no bottleneck adapter (methods: {[c.method for c in state.configs[name]]})")
    for config in configs:
        config.drop_layers = count
        for _, adapter in family_adapters(model, name, config.method):
            adapter.drop_layers = count

