"""LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models Fine-tuning (Zhang et al.,
2023, arXiv:2308.03303).

Why: LoRA shrinks the trainable parameters and the optimizer state, but not the activations a
training step keeps. The gradient of LoRA's down-projection ``A`` is ``dA = s (g B)^T x``, so every
adapted layer keeps its full-width input ``x`` (tokens x d_in) until the backward pass; with LoRA on
all linear layers that is about what full fine-tuning keeps. LoRA-FA ("frozen A") freezes ``A`` at
its random initialization and trains only ``B``. Backward then needs ``x A^T`` (tokens x r), which
the forward pass computes anyway, instead of ``x``: a layer keeps r numbers per token instead of
d_in (8 instead of 576 on SmolLM2-135M at r=8). A random ``A`` is a random projection of the input
onto r directions, and ``B`` learns the update within them; the paper reports LoRA's accuracy at up
to 1.4x less memory than LoRA.

What: ``lora_fa`` takes LoRA's settings (rank, alpha, rsLoRA, dropout, targets...). ``A`` starts as
in LoRA (Kaiming-uniform, or Gaussian with ``init=gaussian``) and never trains; ``B`` starts at 0, so
the model is the base model at step 0. The layer runs one fused autograd function
(``_FrozenALinear``) that saves only ``x A^T`` for backward (the weights it also holds are
parameters, not activations). Without the fused path (dropout, a quantized or Conv1D base) the plain
LoRA computation is used, which autograd also runs without keeping ``x``, since nothing trainable
needs it (with dropout, the dropout mask is kept).

Mergeable: yes. At inference a LoRA-FA adapter *is* a LoRA (``W + s B A``): it merges like LoRA, and
``peftlab.save`` writes it in HF PEFT's LoRA format, so ``peft`` and vLLM load it as a plain LoRA
(and ``peftlab.load`` reads it back as one: training it further then trains ``A`` too unless it is
attached as ``lora_fa`` again). HF PEFT has LoRA-FA as an optimizer over a LoRA model
(``peft.optimizers.create_lorafa_optimizer``), which also projects ``B``'s gradient by ``(A A^T)^-1``
(the paper's later version); adapters it trains are plain LoRA files too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.targets import is_linear
from ..errors import ConfigError
from .lora import LoraConfig, LoraLinear

CATEGORY = "reparameterized"
PAPER = "Zhang et al., 2023 (arXiv:2308.03303)"
MERGEABLE = True
INVALID_SETTINGS = ("r=0", "alpha=-1", "init=pissa")
DEFAULT_LR = 5e-3  # only B moves, so about twice LoRA's rate for a comparable step (the trainer's default is 2e-3)
INITS = ("default", "gaussian")  # A is a random projection: a data-derived init (PiSSA, LoftQ) is another method


@dataclass
class LoraFaConfig(LoraConfig):
    """LoRA's settings; A stays at its random init (``init``: default = Kaiming-uniform, or gaussian)."""

    method: ClassVar[str] = "lora_fa"

    def validate(self) -> None:
        if self.init not in INITS:
            raise ConfigError(f"{self.method}: init must be one of {', '.join(INITS)} (A is a frozen random projection), "
                              f"got {self.init!r}; use lora for init={self.init}")
        super().validate()


class _FrozenALinear(torch.autograd.Function):
    """``x W^T + b + s (x A^T) B^T`` with frozen ``W`` and ``A``: backward keeps ``x A^T`` only.

    ``dx = g W + s (g B) A``, ``dB = s g^T (x A^T)``, ``db = sum g``: none of them reads ``x``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale):
        x2 = x.reshape(-1, x.shape[-1])
        xa = (x2 @ A.t()).mul_(scale)  # N x r, scaled once here rather than in backward
        out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        out.addmm_(xa, B.t())
        ctx.save_for_backward(weight, A, B, xa)
        ctx.scale = scale
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        weight, A, B, xa = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        dx = db = dB = None
        if ctx.needs_input_grad[0]:
            dx = (g @ weight).addmm_((g @ B).mul_(ctx.scale), A).view(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            db = g.sum(0)
        if ctx.needs_input_grad[4]:
            dB = g.t() @ xa
        return dx, None, db, None, dB, None


class LoraFaLinear(LoraLinear):
    """LoRA with ``A`` frozen: only ``lora_B`` trains."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 init: str = "default"):
        super().__init__(base, r, alpha, dropout, rslora, init)
        self.lora_A.weight.requires_grad_(False)
        self.lora_A.weight.peftlab_trainable = False  # stays frozen whenever the adapter is made active

    def fused_forward(self, base: nn.Module, x):
        """The whole layer in ``_FrozenALinear``, or None where it does not apply (LoRA's conditions,
        and a base weight or ``A`` that someone made trainable, whose gradient would need ``x``)."""
        if (type(base) is not nn.Linear or not isinstance(self.dropout, nn.Identity) or x.dtype != self.lora_B.weight.dtype
                or base.weight.requires_grad or self.lora_A.weight.requires_grad):
            return None
        return _FrozenALinear.apply(x, base.weight, base.bias, self.lora_A.weight, self.lora_B.weight, self.scaling)


# ---- method protocol -------------------------------------------------------------------------

Config = LoraFaConfig


def can_wrap(module: nn.Module) -> bool:
    return is_linear(module)


def make_adapter(module: nn.Module, config: LoraFaConfig, name: str) -> nn.Module:
    return LoraFaLinear(module, config.rank_for(name), config.alpha_for(name), config.dropout, config.rslora, config.init)
