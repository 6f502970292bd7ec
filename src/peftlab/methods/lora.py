"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., ICLR 2022, arXiv:2106.09685).

A frozen weight ``W`` (out x in) is adapted by a trainable low-rank product: ``W + s * B @ A``
with ``A`` (r x in), ``B`` (out x r) and ``s = alpha / r``. ``B`` starts at zero, so the model is
exactly the base model at step 0, and the product can be folded into ``W`` after training
(merge) so inference costs nothing extra.

Variants here:
- rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732): ``s = alpha / sqrt(r)``, which keeps the
  update's scale stable as the rank grows.
- PiSSA (Meng et al., 2024, arXiv:2404.02948): ``A`` and ``B`` start from the top-r singular
  vectors and values of ``W`` and the residual ``W - s B A`` stays in the base, so training
  moves the principal directions first. Saved adapters are converted to plain LoRA of rank 2r
  that applies to the original base (``B' A' = B A - B0 A0``), as HF PEFT does.
- OLoRA (Büyükakyüz, 2024, arXiv:2406.01775): ``W = QR``; ``B`` starts at the first r columns of
  ``Q`` (orthonormal), ``A`` at the first r rows of ``R`` (upper triangular) and the base keeps
  ``W - s B A``, so the model is unchanged at init. As in HF PEFT's ``olora_init`` the factors are
  not divided by the scale ``s`` (so ``s B A`` is ``s Q_r R_r``; with the default alpha = 2r, s = 2).
  Saved exactly like PiSSA: a plain LoRA of rank 2r on the original base (what PEFT writes with
  ``path_initial_model_for_weight_conversion``).
- ``lora_bias`` (HF PEFT's option): ``lora_B`` gets a trainable bias ``b`` (zero at init); the
  update is ``s (B A x + b)`` as in PEFT, merging adds ``s b`` to the base bias (a base without a
  bias cannot merge it). Only with init default/gaussian and on linear layers, as in PEFT.
- LoftQ (Li et al., 2023, arXiv:2310.08659): on a base quantized with
  ``peftlab.quantize(model, "nf4", loftq_rank=r)``, ``s B A`` starts at the rank-r correction LoftQ
  chose together with the quantized weights (``quant/loftq.py``), so quantized base + LoRA starts
  near the full-precision model instead of at the quantized one.
- EVA (Paszke et al., 2024, arXiv:2410.07170), CorDA (Yang et al., 2024, arXiv:2406.05223) and LoRA-GA (Wang et
  al., 2024, arXiv:2407.05000): inits chosen from a few batches before training (``init=eva|corda|lora_ga``), by
  the ``calibrate`` hook that ``peftlab.train`` runs on its first batches (see ``lora_data.py``, where they live).
- per-module ranks and alphas through ``rank_pattern`` / ``alpha_pattern``.
- ``target_parameters`` (HF PEFT's option): LoRA on raw ``nn.Parameter``s that are no module's
  weight, e.g. a mixture-of-experts layer's (experts x d1 x d2) stack, a rank-r pair per expert
  (``lora_params.py``).
- ``layer_replication`` (HF PEFT's option, as in its ``replicate_layers``): ``[[0, 4], [2, 5]]``
  rebuilds the decoder's layers as ``0 1 2 3 2 3 4``, every copy sharing the base weights of the layer
  it copies and getting its own LoRA, so a deeper model is fine-tuned for the parameters of a LoRA.
  The model stays replicated after the adapter is deleted (as in PEFT); merging is refused, since
  the copies share one base weight.

On a quantized base (``peftlab.quant``) merging dequantizes, adds and requantizes (see
``base_weight`` / ``set_base_weight``, which every method's merge goes through).

Wraps ``nn.Linear``, ``nn.Embedding``, GPT-2's ``Conv1D`` (weight stored as in x out) and
``nn.Conv1d/2d/3d`` (named in ``targets``; ``all-linear`` stays linear-only). On a convolution, as in
HF PEFT, ``lora_A`` is a convolution with the base's kernel into r channels and ``lora_B`` a 1x1
convolution back (see ``LoraConv``). Deliberate difference: peftlab's ``lora_A`` also takes the base's
dilation and padding mode, where PEFT's uses dilation 1 and zero padding: with a dilated or non-zero
padded base, PEFT's unmerged output is not what its merged kernel computes (or fails on a shape
mismatch), while here merged equals unmerged. The two agree on every other convolution, and files are
the same either way.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import MethodConfig
from ..core.targets import is_linear
from ..errors import ConfigError, StateError, TargetError
from ..quant.layers import is_quantized

CATEGORY = "reparameterized"
PAPER = "Hu et al., 2022 (arXiv:2106.09685)"
MERGEABLE = True
INVALID_SETTINGS = ("r=0", "alpha=-1", "dropout=1.5", "init=svd", "lora_bias=maybe", "lora_bias=true,init=pissa",
                    "target_parameters=[]", "target_parameters=[w],dropout=0.1", "eva_rho=0.5",
                    "corda_method=mid")
INITS = ("default", "gaussian", "pissa", "olora", "loftq", "eva", "corda", "lora_ga")
BASE_INITS = ("pissa", "olora")  # inits that move part of W into the adapter (saved as plain LoRA of rank 2r)
DATA_INITS = ("eva", "corda", "lora_ga")  # inits chosen from a few batches (lora_data.py), by the calibrate hook
DATA_BASE_INITS = ("corda", "lora_ga")  # of those, the ones that move part of W into the adapter too


@dataclass
class LoraConfig(MethodConfig):
    """r: rank; alpha: scale numerator; dropout on the adapter input; rslora: alpha/sqrt(r);
    target_parameters: raw parameters to adapt (MoE expert stacks, ``lora_params.py``), by name or dotted
    suffix, e.g. ``[experts.gate_up_proj]``; with ``targets=[]`` only those;
    init: default (B = 0), gaussian, pissa, olora, loftq (on a LoftQ-quantized base), or one chosen from the first
    training batches (``lora_data.py``): eva (A from the inputs' principal directions, ranks redistributed by
    explained variance, up to round(r * eva_rho) per layer), corda (from the SVD of W C, C the inputs' covariance;
    corda_method ipm: the largest components, kpm: the smallest) or lora_ga (from the SVD of the weight's gradient); rank_pattern /
    alpha_pattern: per-module overrides keyed by a module-name suffix or regex, e.g. ``{"mlp.down_proj": 4}``;
    lora_bias: a trainable bias on lora_B (HF PEFT's ``lora_bias``); layer_replication: ``[start, end)``
    ranges of decoder layers to rebuild the model from, copies sharing base weights (HF PEFT's option)."""

    method: ClassVar[str] = "lora"
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    rslora: bool = False
    init: str = "default"
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    lora_bias: bool = False
    layer_replication: list | None = None
    target_parameters: list | None = None
    eva_rho: float = 2.0
    corda_method: str = "ipm"

    def validate(self) -> None:
        if isinstance(self.target_parameters, str):
            self.target_parameters = [self.target_parameters]
        if self.target_parameters is not None:
            if not (isinstance(self.target_parameters, (list, tuple)) and self.target_parameters
                    and all(isinstance(t, str) and t for t in self.target_parameters)):
                raise ConfigError(f"{self.method}: target_parameters must be a list of parameter names (or dotted suffixes), "
                                  f"e.g. [experts.gate_up_proj]; got {self.target_parameters!r}")
            if self.targets in ([], (), None):  # only the parameters: the module targets may be empty
                self.targets = "all-linear"
                try:
                    super().validate()
                finally:
                    self.targets = []
            else:
                super().validate()
            self._validate_target_parameters()
        else:
            super().validate()
        for key in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, key)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise ConfigError(f"{self.method}: {key} must map module names (suffixes or regexes) to values, "
                                  f"e.g. {{'down_proj': 4}}; got {value!r}")
        ranks = [self.r, *self.rank_pattern.values()]
        if not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks):
            raise ConfigError(f"{self.method}: rank r must be a positive integer, got {ranks}")
        alphas = [self.alpha, *self.alpha_pattern.values()]
        if not all(isinstance(a, (int, float)) and not isinstance(a, bool) and a > 0 for a in alphas):
            raise ConfigError(f"{self.method}: alpha must be a positive number, got {alphas}")
        if not (isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"{self.method}: dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.rslora, bool):
            raise ConfigError(f"{self.method}: rslora must be true or false, got {self.rslora!r}")
        if self.init not in INITS:
            raise ConfigError(f"{self.method}: init must be one of {', '.join(INITS)}, got {self.init!r}")
        if not isinstance(self.lora_bias, bool):
            raise ConfigError(f"{self.method}: lora_bias must be true or false, got {self.lora_bias!r}")
        if self.init in DATA_INITS and self.method != "lora":
            raise ConfigError(f"{self.method}: init={self.init} is supported by lora only; use init=default or gaussian")
        if not (isinstance(self.eva_rho, (int, float)) and not isinstance(self.eva_rho, bool) and self.eva_rho >= 1):
            raise ConfigError(f"{self.method}: eva_rho must be a number >= 1 (each layer may take up to round(r * eva_rho) "
                              f"ranks; 1 keeps every layer at r), got {self.eva_rho!r}")
        if self.corda_method not in ("ipm", "kpm"):
            raise ConfigError(f"{self.method}: corda_method must be ipm (the adapter takes the largest components of W C) or "
                              f"kpm (the smallest), got {self.corda_method!r}")
        if self.method != "lora":  # the variants' updates are not LoRA's plain s B A (PEFT refuses them with DoRA too)
            if self.init == "olora":
                raise ConfigError(f"{self.method}: init=olora is supported by lora only; use init=default or gaussian")
            if self.lora_bias:
                raise ConfigError(f"{self.method}: lora_bias=true is supported by lora only")
        if self.layer_replication is not None:
            ranges = self.layer_replication
            if not (isinstance(ranges, (list, tuple)) and ranges and all(
                    isinstance(pair, (list, tuple)) and len(pair) == 2
                    and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in pair) and pair[0] < pair[1]
                    for pair in ranges)):
                raise ConfigError(f"{self.method}: layer_replication must be a list of [start, end) layer ranges with "
                                  f"0 <= start < end, e.g. [[0,4],[2,5]]; got {ranges!r}")
            if self.method != "lora":
                raise ConfigError(f"{self.method}: layer_replication is supported by lora only")
            if self.init in (*BASE_INITS, *DATA_BASE_INITS, "loftq"):
                raise ConfigError(f"{self.method}: layer_replication shares each base weight between layer copies, which "
                                  f"init={self.init} would rewrite once per copy; use init=default or gaussian")
        if self.lora_bias and self.init not in ("default", "gaussian"):
            raise ConfigError(f"{self.method}: lora_bias=true works with init=default or gaussian only (as in HF PEFT), "
                              f"got init={self.init}")

    def _validate_target_parameters(self) -> None:
        if self.method != "lora":
            raise ConfigError(f"{self.method}: target_parameters is supported by lora only (as in HF PEFT)")
        refused = [f"{key}={value}" for key, value, fine in (
            ("dropout", self.dropout, self.dropout == 0), ("lora_bias", self.lora_bias, not self.lora_bias),
            ("init", self.init, self.init in ("default", "gaussian"))) if not fine]
        if refused:
            raise ConfigError(f"{self.method}: target_parameters does not work with {', '.join(refused)} (as in HF PEFT: a "
                              "parameter's update cannot take dropout on the input, a bias, or a base-rewriting init); "
                              "use dropout=0, lora_bias=false, init=default or gaussian")

    def rank_for(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.alpha)


def _pattern_value(patterns: dict, module_name: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?(?:{key})$", module_name):
            return value
    return default


# ---- pure math -------------------------------------------------------------------------------

def scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / (math.sqrt(r) if rslora else r)


def delta_weight(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """The update ``s * B @ A`` in (out x in) layout."""
    return (B @ A) * scale


def loftq_factors(base: nn.Module, r: int, scale: float):
    """``(A, B)`` with ``s * B @ A`` the rank-r part of the LoftQ correction ``W - Q`` that
    ``peftlab.quantize(..., loftq_rank)`` left on the quantized base (``quant/loftq.py``)."""
    L, R = getattr(base, "loftq_B", None), getattr(base, "loftq_A", None)
    if L is None:
        raise ConfigError("lora: init=loftq needs a base quantized with LoftQ, which chooses the quantized weights and the "
                          "LoRA init together: call peftlab.quantize(model, 'nf4', loftq_rank=r) on the full-precision "
                          "model first, then attach lora[init=loftq]")
    if r > R.shape[0]:
        raise ConfigError(f"lora: init=loftq with r={r}, but the base was quantized with loftq_rank={R.shape[0]}; "
                          f"use r <= {R.shape[0]} or quantize with loftq_rank={r}")
    root = math.sqrt(scale)
    return R[:r] / root, L[:, :r] / root


def pissa_factors(weight: torch.Tensor, r: int, scale: float):
    """Top-r SVD factors with ``s * B @ A = U_r S_r V_r^T`` (weight is out x in)."""
    U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
    root = torch.sqrt(S[:r] / scale)
    A = root[:, None] * Vh[:r]
    B = U[:, :r] * root[None, :]
    return A.to(weight.dtype), B.to(weight.dtype)


def olora_factors(weight: torch.Tensor, r: int):
    """OLoRA's ``(A, B) = (R[:r], Q[:, :r])`` from the reduced QR of the (out x in) weight, as HF PEFT
    computes them (in float32, not divided by the scale)."""
    if r > min(weight.shape):
        raise ConfigError(f"lora: init=olora takes the first r columns of Q in W = QR, but r={r} exceeds the smaller side "
                          f"of a {weight.shape[0]}x{weight.shape[1]} weight; use r <= {min(weight.shape)}")
    Q, R = torch.linalg.qr(weight.float())
    return R[:r].contiguous().to(weight.dtype), Q[:, :r].contiguous().to(weight.dtype)


class _FusedLoraLinear(torch.autograd.Function):
    """``x W^T + b + s (x A^T) B^T`` in two BLAS calls forward and backward.

    The unfused form adds the adapter output to the base output and scales it in separate
    full-width elementwise passes; here the adapter product accumulates into the base output
    (``addmm_``) and the scale is applied to the thin (N x r) tensor, which removes every
    full-width temporary from the training step.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale):
        x2 = x.reshape(-1, x.shape[-1])
        xa = (x2 @ A.t()).mul_(scale)
        out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        out.addmm_(xa, B.t())
        needs_x = ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
        ctx.save_for_backward(x2 if needs_x else None, weight, A, B, xa)
        ctx.scale = scale
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, weight, A, B, xa = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gb = (g @ B).mul_(ctx.scale)  # N x r
        dx = dW = db = dA = dB = None
        if ctx.needs_input_grad[0]:
            dx = (g @ weight).addmm_(gb, A).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dW = g.t() @ x2
        if ctx.needs_input_grad[2]:
            db = g.sum(0)
        if ctx.needs_input_grad[3]:
            dA = gb.t() @ x2
        if ctx.needs_input_grad[4]:
            dB = g.t() @ xa
        return dx, dW, db, dA, dB, None


# ---- modules ---------------------------------------------------------------------------------

class MergesDelta:
    """merge / unmerge for an adapter whose whole effect is a weight update ``delta_weight()``
    (out x in): LoRA and every variant whose update is a weight (AdaLoRA, KronA, DyLoRA, ...)."""

    def merge(self, base: nn.Module) -> None:
        set_base_weight(base, base_weight(base) + self.delta_weight())

    def unmerge(self, base: nn.Module) -> None:
        set_base_weight(base, base_weight(base) - self.delta_weight())

    def detach_from(self, base: nn.Module) -> None:
        """Nothing to give back: the adapter never changed the base."""


class LoraLinear(MergesDelta, nn.Module):
    """LoRA for ``nn.Linear`` and ``Conv1D``: returns ``s * B A dropout(x)``."""

    alters_base = False  # True for PiSSA and OLoRA, whose init moves part of W into the adapter
    awaiting_data = False  # True from init until a data-driven init (lora_data.py) has run; convolutions never wait

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False, init: str = "default",
                 lora_bias: bool = False):
        super().__init__()
        self.transposed = not isinstance(base, nn.Linear)  # Conv1D stores (in x out)
        out_features, in_features = base_weight(base).shape
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = scaling(alpha, r, rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dtype = base.weight.dtype if base.weight.dtype.is_floating_point else torch.float32
        self.lora_A = nn.Linear(in_features, r, bias=False, device=base.weight.device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=lora_bias, device=base.weight.device, dtype=dtype)
        if lora_bias and getattr(base, "bias", None) is None:
            warnings.warn("lora: lora_bias=true on a layer without a bias: the adapter works, but cannot be merged",
                          stacklevel=2)
        self.init = init
        self.awaiting_data = init in DATA_INITS  # until the calibrate hook (lora_data.py) or a load sets A and B
        if init in DATA_BASE_INITS:
            if is_quantized(base):
                raise ConfigError(f"lora: init={init} rewrites the base weight in full precision (W - s B A), which a quantized "
                                  f"base cannot hold; use init={init} on a full-precision model (or init=eva)")
            # persistent: a native save keeps the part of W the adapter took, so a load can take it again
            self.register_buffer("pissa_A0", torch.zeros(r, in_features, device=base.weight.device, dtype=dtype))
            self.register_buffer("pissa_B0", torch.zeros(out_features, r, device=base.weight.device, dtype=dtype))
            object.__setattr__(self, "_base_ref", base)  # not a submodule: the layer owns the base
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1 / r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
            if lora_bias:
                nn.init.zeros_(self.lora_B.bias)
            if init == "loftq":
                A, B = loftq_factors(base, r, self.scaling)
                self.lora_A.weight.copy_(A)
                self.lora_B.weight.copy_(B)
            if init in BASE_INITS:
                if is_quantized(base):
                    raise ConfigError(f"lora: init={init} rewrites the base weight in full precision (W - s B A), which a quantized "
                                      "base cannot hold without requantizing it; use init=loftq on a base quantized with "
                                      f"peftlab.quantize(model, 'nf4', loftq_rank=r), or init={init} on a full-precision model")
                W = base_weight(base)
                A, B = pissa_factors(W, r, self.scaling) if init == "pissa" else olora_factors(W, r)
                self.lora_A.weight.copy_(A)
                self.lora_B.weight.copy_(B)
                self.register_buffer("pissa_A0", A.clone(), persistent=False)
                self.register_buffer("pissa_B0", B.clone(), persistent=False)
                self.alters_base = True
                set_base_weight(base, base_weight(base) - delta_weight(A, B, self.scaling))

    def take_from_base(self, base: nn.Module, A: torch.Tensor, B: torch.Tensor) -> None:
        """Start at ``(A, B)`` with the base keeping ``W - s B A`` (CorDA, LoRA-GA after calibration)."""
        with torch.no_grad():
            self.lora_A.weight.copy_(A)
            self.lora_B.weight.copy_(B)
            self.pissa_A0.copy_(A)
            self.pissa_B0.copy_(B)
            set_base_weight(base, base_weight(base) - delta_weight(self.lora_A.weight, self.lora_B.weight, self.scaling))
        self.alters_base = True
        self.awaiting_data = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.awaiting_data = False  # loaded tensors: nothing left to choose from data
        if self.init in DATA_BASE_INITS and not self.alters_base and bool(self.pissa_A0.ne(0).any()):
            base = self.__dict__["_base_ref"]
            set_base_weight(base, base_weight(base) - delta_weight(self.pissa_A0, self.pissa_B0, self.scaling))
            self.alters_base = True

    def forward(self, x, base_out):
        bias = self.lora_B.bias
        if bias is None:
            return self.lora_B(self.lora_A(self.dropout(x)) * self.scaling)
        return F.linear(self.lora_A(self.dropout(x)) * self.scaling, self.lora_B.weight, bias * self.scaling)

    def fused_forward(self, base: nn.Module, x):
        """The whole layer's output in one fused op, or None where it does not apply."""
        if type(base) is not nn.Linear or not isinstance(self.dropout, nn.Identity) or x.dtype != self.lora_A.weight.dtype:
            return None
        bias = base.bias
        if self.lora_B.bias is not None:  # lora_bias: s b joins the base bias (autograd carries its gradient)
            bias = self.lora_B.bias * self.scaling if bias is None else bias + self.lora_B.bias * self.scaling
        return _FusedLoraLinear.apply(x, base.weight, bias, self.lora_A.weight, self.lora_B.weight, self.scaling)

    def merge(self, base: nn.Module) -> None:
        if getattr(base, "peftlab_shared_base", False):
            raise StateError("lora: this layer's base weight is shared with its copies (layer_replication), so an adapter "
                             "cannot be merged into it (as in HF PEFT); use it unmerged")
        bias = self._base_bias(base)
        MergesDelta.merge(self, base)
        if bias is not None:
            bias.data += self.lora_B.bias.detach() * self.scaling

    def unmerge(self, base: nn.Module) -> None:
        bias = self._base_bias(base)
        MergesDelta.unmerge(self, base)
        if bias is not None:
            bias.data -= self.lora_B.bias.detach() * self.scaling

    def _base_bias(self, base: nn.Module):
        """The base bias that lora_bias folds into (None without lora_bias); refuses a base without one."""
        lora_B = getattr(self, "lora_B", None)
        if lora_B is None or lora_B.bias is None:
            return None
        if getattr(base, "bias", None) is None:
            raise StateError("lora: an adapter with lora_bias=true cannot be merged into a layer without a bias "
                             "(as in HF PEFT); use it unmerged")
        return base.bias

    def delta_weight(self) -> torch.Tensor:
        return delta_weight(self.lora_A.weight, self.lora_B.weight, self.scaling)

    # PiSSA and OLoRA only: the base holds W - s B0 A0, so rows not using this adapter add s B0 A0 back.
    def inactive_delta(self, x):
        return F.linear(F.linear(x, self.pissa_A0) * self.scaling, self.pissa_B0)

    def detach_from(self, base: nn.Module) -> None:
        """Called when the adapter is removed unmerged: give the base back what PiSSA / OLoRA took."""
        if self.alters_base:
            set_base_weight(base, base_weight(base) + delta_weight(self.pissa_A0, self.pissa_B0, self.scaling))

    def hf_state(self) -> tuple[dict, int, float]:
        """Tensors to save (HF PEFT names), with the rank and alpha they stand for.
        PiSSA and OLoRA are saved as the equivalent plain LoRA of rank 2r on the original base."""
        if self.awaiting_data:
            raise StateError(f"lora: this init={self.init} adapter has not seen any data yet, so it is not what init={self.init} "
                             "starts from; train it with peftlab.train (which initialises it from the first batches) or call "
                             "peftlab.methods.lora_data.initialize(model, batches) first")
        A, B = self.lora_A.weight.detach(), self.lora_B.weight.detach()
        if not self.alters_base:
            tensors = {"lora_A.weight": A, "lora_B.weight": B}
            if getattr(self.lora_B, "bias", None) is not None:
                tensors["lora_B.bias"] = self.lora_B.bias.detach()
            return tensors, self.r, self.alpha
        A2 = torch.cat([A, self.pissa_A0], 0)
        B2 = torch.cat([B, -self.pissa_B0], 1)
        alpha2 = self.alpha * (math.sqrt(2) if self.rslora else 2)
        return {"lora_A.weight": A2, "lora_B.weight": B2}, 2 * self.r, alpha2


CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_conv(module: nn.Module) -> bool:
    """``nn.Conv1d`` / ``Conv2d`` / ``Conv3d`` (not GPT-2's ``Conv1D``, which is a linear layer)."""
    return isinstance(module, CONV_TYPES)


def conv_delta_weight(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """The kernel of ``B o A`` (a 1x1 conv after a k x k one): ``s * B[o, c] A[c, i, k...]`` summed over
    the rank c, in the base kernel's (out, in, k...) layout."""
    return (B.flatten(1) @ A.flatten(1)).view(B.shape[0], *A.shape[1:]) * scale


class LoraConv(LoraLinear):
    """LoRA for ``nn.Conv1d/2d/3d``: ``lora_A`` is a convolution with the base's kernel size, stride,
    padding, dilation and padding mode into r channels, ``lora_B`` a 1x1 convolution back to the base's
    output channels (grouped like the base), so ``s * B(A(x))`` has the base output's shape. With
    ``groups = 1`` the pair is one convolution whose kernel is ``s * B A`` over the rank (merge adds it to
    the base kernel); with ``groups > 1`` A reads all input channels, which a grouped kernel cannot hold,
    so such an adapter runs unmerged (as in HF PEFT)."""

    fused_forward = None

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 init: str = "default", lora_bias: bool = False):
        nn.Module.__init__(self)
        kind = type(base).__name__
        if init not in ("default", "gaussian"):
            raise ConfigError(f"lora: init={init} applies to linear layers only; on the {kind} use init=default or gaussian "
                              "(or leave the convolution out of the targets)")
        if r % base.groups:
            raise ConfigError(f"lora: a {kind} with groups={base.groups} needs a rank divisible by its groups (lora_B is "
                              f"grouped like the base), got r={r}; use r={base.groups * -(-r // base.groups)} "
                              "or a rank_pattern for this layer")
        self.transposed = False
        self.r, self.alpha, self.rslora, self.init = r, alpha, rslora, init
        self.scaling = scaling(alpha, r, rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        conv = CONV_TYPES[base.weight.dim() - 3]
        ones = (1,) * (base.weight.dim() - 2)
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = conv(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
                           bias=False, padding_mode=base.padding_mode, **factory)
        self.lora_B = conv(r, base.out_channels, ones, ones, groups=base.groups, bias=lora_bias, **factory)
        if lora_bias and base.bias is None:
            warnings.warn(f"lora: lora_bias=true on a {kind} without a bias: the adapter works, but cannot be merged",
                          stacklevel=2)
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1 / r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
            if lora_bias:
                nn.init.zeros_(self.lora_B.bias)

    def forward(self, x, base_out):
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def merge(self, base: nn.Module) -> None:
        if base.groups > 1:
            raise StateError(f"lora: an adapter on a {type(base).__name__} with groups={base.groups} cannot be merged: its "
                             "update reads every input channel, which a grouped kernel cannot hold (as in HF PEFT); "
                             "use it unmerged")
        LoraLinear.merge(self, base)

    def delta_weight(self) -> torch.Tensor:
        if self.lora_B.groups > 1:
            raise StateError(f"lora: the update of a grouped convolution (groups={self.lora_B.groups}) is no kernel of the "
                             "base's shape; it exists only as the two convolutions")
        return conv_delta_weight(self.lora_A.weight, self.lora_B.weight, self.scaling)


class LoraEmbedding(nn.Module):
    """LoRA for ``nn.Embedding``: the update ``s * (B A)^T`` is a (vocab x dim) table of rank r."""

    def __init__(self, base: nn.Embedding, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False, init: str = "default"):
        super().__init__()
        if init in (*BASE_INITS, *DATA_INITS, "loftq"):
            raise ConfigError(f"lora: init={init} applies to linear layers only; exclude the embedding or use init=default")
        self.r, self.alpha, self.rslora, self.init = r, alpha, rslora, init
        self.scaling = scaling(alpha, r, rslora)
        w = base.weight
        # A starts at zero and B random (as HF PEFT), so the output equals the base at step 0.
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, base.num_embeddings, device=w.device, dtype=w.dtype))
        self.lora_embedding_B = nn.Parameter(torch.randn(base.embedding_dim, r, device=w.device, dtype=w.dtype))
        self.padding_idx = base.padding_idx

    def forward(self, ids, base_out):
        rows = F.embedding(ids, self.lora_embedding_A.t(), padding_idx=self.padding_idx)
        return (rows @ self.lora_embedding_B.t()) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_embedding_B @ self.lora_embedding_A).t() * self.scaling

    def merge(self, base) -> None:
        base.weight.data += self.delta_weight()

    def unmerge(self, base) -> None:
        base.weight.data -= self.delta_weight()

    def detach_from(self, base) -> None:
        pass

    def hf_state(self):
        return {"lora_embedding_A": self.lora_embedding_A.detach(), "lora_embedding_B": self.lora_embedding_B.detach()}, self.r, self.alpha


def base_weight(base: nn.Module) -> torch.Tensor:
    """The base weight in (out x in) layout, whatever the module stores (a quantized base: dequantized)."""
    if is_quantized(base):
        return base.dequantize()
    return base.weight.t() if type(base).__name__ == "Conv1D" else base.weight


def set_base_weight(base: nn.Module, value: torch.Tensor) -> None:
    """Make the base weight ``value`` (out x in). A quantized base requantizes it, which rounds it to
    the format's grid; the error this adds is recorded (``peftlab.quant.merge_report``)."""
    if is_quantized(base):
        base.requantize(value)
        return
    value = value.t() if type(base).__name__ == "Conv1D" else value
    base.weight.data.copy_(value)


def decoder_layers(model: nn.Module):
    """``(owner, attribute, ModuleList)`` of a Llama-, BERT- or Falcon/GPT-2-style model's layers
    (where HF PEFT's ``replicate_layers`` looks)."""
    root = model
    while hasattr(root, "model") and isinstance(root.model, nn.Module):
        root = root.model
    root = getattr(root, "bert", root)
    for owner, attribute in ((root, "layers"), (getattr(root, "encoder", None), "layer"), (root, "h")):
        layers = getattr(owner, attribute, None) if owner is not None else None
        if isinstance(layers, nn.ModuleList):
            return owner, attribute, layers
    raise TargetError("lora: layer_replication needs the model's decoder layers as a ModuleList at .layers, "
                      ".encoder.layer or .h (Llama, BERT, Falcon/GPT-2 style); this model has none")


def _shared_copy(layer: nn.Module, index: int) -> nn.Module:
    """A deep copy of ``layer`` whose parameters are the original's (same tensors), renumbered ``index``."""
    import copy

    clone = copy.deepcopy(layer)
    for name, module in layer.named_modules():
        target = clone.get_submodule(name)
        for pname, param in module.named_parameters(recurse=False):
            target.register_parameter(pname, param)
        if hasattr(target, "layer_idx"):  # transformers' KV cache slots
            target.layer_idx = index
        if name and any(True for _ in module.parameters(recurse=False)):
            target.peftlab_shared_base = True
    return clone


def replicate_layers(model: nn.Module, ranges) -> None:
    """Rebuild the decoder's layers from ``[start, end)`` ranges of the current ones, copies sharing weights."""
    owner, attribute, layers = decoder_layers(model)
    if getattr(model, "peftlab_layer_replication", None) is not None:
        if [list(r) for r in ranges] == model.peftlab_layer_replication:
            return  # a second adapter with the same map: already done
        raise ConfigError(f"lora: this model's layers were already replicated as {model.peftlab_layer_replication}; "
                          f"another layer_replication ({[list(r) for r in ranges]}) needs a fresh model")
    if max(end for _, end in ranges) > len(layers):
        raise ConfigError(f"lora: layer_replication {[list(r) for r in ranges]} reaches past the model's {len(layers)} layers")
    if any(type(m).__name__ == "AdapterLayer" for m in layers.modules()):
        raise ConfigError("lora: layer_replication copies the layers, adapters included; attach the adapter with "
                          "layer_replication first, before any other adapter")
    new = []
    for start, end in ranges:
        for i in range(start, end):
            new.append(_shared_copy(layers[i], len(new)))
    setattr(owner, attribute, nn.ModuleList(new))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(new)
    model.peftlab_layer_replication = [list(r) for r in ranges]


# ---- method protocol -------------------------------------------------------------------------

Config = LoraConfig


def can_wrap(module: nn.Module) -> bool:
    return is_linear(module) or isinstance(module, nn.Embedding) or is_conv(module)


def find_targets(model: nn.Module, config: LoraConfig) -> list:
    """The usual targets, after replicating layers first when ``layer_replication`` asks for it."""
    from ..core.targets import find_targets as default_targets

    if config.layer_replication is not None:
        replicate_layers(model, config.layer_replication)
    names = default_targets(model, config, can_wrap) if config.targets != [] else []
    if config.target_parameters:
        from .lora_params import matched_parameters

        owners = matched_parameters(model, config)
        clash = [n for n in owners if n in names]
        if clash:
            raise ConfigError(f"lora: '{clash[0]}' is chosen both by targets and (through its parameters) by "
                              "target_parameters; leave it out of one of them (targets=[] adapts only the parameters)")
        names = names + list(owners)
    return names


def uses_hook(config: LoraConfig, hook: str) -> bool:
    """Only the inits chosen from data need the calibrate hook (so plain LoRA trains anywhere, ``train_many`` too)."""
    return hook != "calibrate" or config.init in DATA_INITS


def calibrate(model: nn.Module, name: str, config: LoraConfig, batches, loss_fn) -> None:
    """The training hook: init=eva / corda / lora_ga choose their start from ``batches`` (``lora_data.py``)."""
    if config.init in DATA_INITS:
        from .lora_data import initialize_adapter

        initialize_adapter(model, name, config, batches, loss_fn)


def make_adapter(module: nn.Module, config: LoraConfig, name: str) -> nn.Module:
    if config.target_parameters:
        from .lora_params import make_param_adapter

        params = [p for p, _ in module.named_parameters(recurse=False)
                  if any(f"{name}.{p}" == t or f"{name}.{p}".endswith("." + t) for t in config.target_parameters)]
        if params:
            return make_param_adapter(module, params, config, name)
    args = (module, config.rank_for(name), config.alpha_for(name), config.dropout, config.rslora, config.init)
    if isinstance(module, nn.Embedding):
        if config.lora_bias:
            raise ConfigError("lora: lora_bias=true applies to linear layers only (as in HF PEFT); exclude the embedding")
        return LoraEmbedding(*args)
    if is_conv(module):
        return LoraConv(*args, lora_bias=config.lora_bias)
    return LoraLinear(*args, lora_bias=config.lora_bias)
