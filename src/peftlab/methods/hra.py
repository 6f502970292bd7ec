"""HRA: Householder Reflection Adaptation (Yuan et al., NeurIPS 2024, "Bridging The Gap between
Low-rank and Orthogonal Adaptation via Householder Reflection Adaptation", arXiv:2405.17484).

A frozen weight ``W`` (out x in) is multiplied on its input side by a chain of ``r`` trained
Householder reflections, as in HF PEFT::

    W' = W H,   H = H_1 H_2 ... H_r,   H_i = I - 2 u_i u_i^T / ||u_i||^2   (u_i in R^in)

Each ``H_i`` is orthogonal, so ``H`` is too: every output neuron's weight row is turned by the same
``H``, and the angles and norms of the rows (``W' W'^T = W W^T``) are the pretrained layer's, as
in OFT, for ``r x in`` trained numbers (PEFT's ``hra_u``, in x r). The paper's other reading:
``W H - W`` has rank at most ``r``, an adaptive low-rank update. peftlab computes the chain in
that form (the "compact WY" / UT form of a product of reflections, Joffrain et al. 2006): with
``Y`` the unit vectors (in x r) and ``T = I/2 + strict_upper(Y^T Y)`` (r x r, upper triangular),
``H = I - Y T^{-1} Y^T`` and ``W H - W = -(W Y) T^{-1} Y^T``. So the layer never forms an
in x in matrix: its extra work is about a rank-r LoRA's (``x Y``, an r x r triangle, ``W Y``),
where PEFT builds ``H`` by ``r`` dense in x in products and multiplies it into ``W`` at every call.

Init (PEFT's ``init_weights=True``, peftlab's ``init=symmetric``): the ``r/2`` vectors drawn
(Kaiming uniform) are each used twice in a row, ``u_{2k-1} = u_{2k}``; a reflection is its own
inverse, so ``H = I`` and the model is exactly the base at step 0, while the gradient is not zero.
``init=random`` (PEFT's ``init_weights=False``) draws all ``r``.

``gram_schmidt`` (PEFT's ``apply_GS``) orthonormalises the vectors first (``Q`` of ``U``; the
product of reflections in orthonormal directions is ``I - 2 Q Q^T``): the reflection planes are
kept exactly orthogonal, the strict form of the paper's orthogonality regulariser (its lambda ->
infinity). ``W' = W H`` is a weight, so HRA merges; unmerge multiplies by ``H^T = H^{-1}``.

Reads and writes HF PEFT's ``HRA`` format exactly (``formats/hf_hra.py``). Differences from HF PEFT:
- defaults are PEFT's (r=8, apply_GS off, the symmetric init) except ``targets`` (peftlab's
  ``all-linear``);
- the symmetric init with an odd ``r`` is refused (PEFT warns and silently starts from random
  vectors, not the base); ``gram_schmidt`` with the symmetric init is refused too: its equal
  pairs leave Gram-Schmidt nothing to orthogonalise (PEFT then divides rounding noise by its norm,
  and its layer at step 0 is neither the base nor orthogonal), and ``I - 2 Q Q^T`` is never the
  identity anyway: use ``init=random`` with it;
- the paper's soft regulariser ``lambda ||I - U^T U||^2`` is not offered (PEFT has none either;
  as a training hook it would also keep HRA out of ``train_many``); ``gram_schmidt`` is the hard form;
- ``nn.Linear`` only (quantized linear bases included); PEFT's ``Conv2d`` layers and GPT-2's
  ``Conv1D`` are refused clearly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.config import MethodConfig
from ..errors import ConfigError
from .lora import base_weight, set_base_weight
from .oft import can_wrap, refuse_non_linear  # noqa: F401  (protocol: nn.Linear; Conv1D refused clearly)

CATEGORY = "reparameterized"
PAPER = "Yuan et al., 2024 (arXiv:2405.17484)"
MERGEABLE = True
INVALID_SETTINGS = ("r=0", "r=3", "init=ones", "gram_schmidt=maybe", "gram_schmidt=true")
# the authors' SST-2 script (DeBERTaV3-base, r=8: nlu/experiments/glue/sst2.sh in github.com/DaShenZi721/HRA)
DEFAULT_LR = 6e-3
# an orthogonal H keeps norms, so on a tiny random model (weights at 0.02) it barely moves the loss; at a
# pretrained weight scale it trains (as OFT, methods/oft.py)
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}
INITS = ("symmetric", "random")
LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass
class HraConfig(MethodConfig):
    """r: number of Householder reflections per layer (even for the symmetric init);
    gram_schmidt: orthonormalise the reflection vectors (PEFT's apply_GS; needs init=random);
    init: symmetric (pairs of equal reflections: the base at step 0) or random (PEFT's init_weights=False)."""

    method: ClassVar[str] = "hra"
    r: int = 8
    gram_schmidt: bool = False
    init: str = "symmetric"

    def validate(self) -> None:
        super().validate()
        if not (isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0):
            raise ConfigError(f"hra: r (the number of reflections) must be a positive integer, got {self.r!r}")
        if not isinstance(self.gram_schmidt, bool):
            raise ConfigError(f"hra: gram_schmidt must be true or false, got {self.gram_schmidt!r}")
        if self.init not in INITS:
            raise ConfigError(f"hra: init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.init == "symmetric" and self.r % 2:
            raise ConfigError(f"hra: r={self.r} is odd, but the symmetric init (pairs of equal reflections, so the "
                              "model starts as the base) needs an even r; use an even r, or init=random")
        if self.init == "symmetric" and self.gram_schmidt:
            raise ConfigError("hra: gram_schmidt=true cannot start from the symmetric init: its equal pairs leave "
                              "Gram-Schmidt nothing to orthogonalise, and I - 2QQ^T is never the identity; "
                              "add init=random")


# ---- pure math -------------------------------------------------------------------------------

def chain_factors(u: torch.Tensor, gram_schmidt: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Y, S)`` with ``H_1 H_2 ... H_r = I - Y S Y^T`` for the reflections along ``u``'s columns
    (in x r). Plain: ``Y`` the unit columns, ``S = (I/2 + strict_upper(Y^T Y))^{-1}`` (upper
    triangular). Gram-Schmidt: ``Y`` orthonormal (QR of ``u``: the same span, column by column,
    as Gram-Schmidt; signs do not matter to ``Y Y^T``), ``S = 2 I``."""
    dtype = u.dtype
    if dtype in LOW_PRECISION:  # CPU QR and triangular solves have no half-precision kernels: r x r work, float32
        Y, S = chain_factors(u.float(), gram_schmidt)
        return Y.to(dtype), S.to(dtype)
    eye = torch.eye(u.shape[1], device=u.device, dtype=dtype)
    if gram_schmidt:
        return torch.linalg.qr(u).Q, 2 * eye
    Y = u / torch.linalg.vector_norm(u, dim=0)
    T = torch.triu(Y.T @ Y, diagonal=1) + eye / 2
    return Y, torch.linalg.solve_triangular(T, eye, upper=True)


def chain_matrix(u: torch.Tensor, gram_schmidt: bool = False) -> torch.Tensor:
    """``H`` (in x in), dense."""
    Y, S = chain_factors(u, gram_schmidt)
    return torch.eye(Y.shape[0], device=u.device, dtype=u.dtype) - Y @ S @ Y.T


def reflect_inputs(x: torch.Tensor, Y: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """``x H^T`` over the last dimension (so that ``W`` sees ``H^T x``: ``W H`` applied)."""
    return x - (x @ Y) @ S.T @ Y.T


def reflect_weight(W: torch.Tensor, Y: torch.Tensor, S: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``W H`` (the merged weight), or ``W H^T = W H^{-1}`` with ``inverse``."""
    return W - (W @ Y) @ (S.T if inverse else S) @ Y.T


# ---- module ----------------------------------------------------------------------------------

def symmetric_vectors(in_features: int, r: int) -> torch.Tensor:
    """(in x r): ``r/2`` Kaiming-uniform columns, each repeated once in place (PEFT's init)."""
    half = torch.empty(in_features, r // 2)
    nn.init.kaiming_uniform_(half, a=math.sqrt(5))
    return half.repeat_interleave(2, dim=1)


class HraLinear(nn.Module):
    """HRA for ``nn.Linear``: the layer sees ``x H^T``; ``hra_u`` (in x r) is PEFT's tensor."""

    def __init__(self, base: nn.Module, r: int, gram_schmidt: bool = False, init: str = "symmetric"):
        super().__init__()
        self.out_features, self.in_features = base_weight(base).shape
        w = base.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        self.r, self.gram_schmidt, self.init = r, gram_schmidt, init
        if init == "symmetric":
            u = symmetric_vectors(self.in_features, r)
        else:
            u = torch.empty(self.in_features, r)
            nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        self.hra_u = nn.Parameter(u.to(w.device, dtype))
        self.__dict__["_base_ref"] = base  # a plain reference, not a submodule

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return chain_factors(self.hra_u, self.gram_schmidt)

    def reflection(self) -> torch.Tensor:
        """``H`` (in x in), dense (for tests and inspection; the layer never forms it)."""
        return chain_matrix(self.hra_u, self.gram_schmidt)

    def delta_weight(self) -> torch.Tensor:
        """``W H - W = -(W Y) S Y^T``: rank at most r."""
        Y, S = self.factors()
        W = base_weight(self.__dict__["_base_ref"]).to(Y.dtype)
        return -(W @ Y) @ S @ Y.T

    def forward(self, x, base_out):
        # x H^T W^T - x W^T = -(x Y S^T)(W Y)^T: a rank-r path, exactly 0 at H = I; the base adds the bias
        Y, S = self.factors()
        W = base_weight(self.__dict__["_base_ref"]).to(Y.dtype)
        return -(((x.to(Y.dtype) @ Y) @ S.T) @ (W @ Y).T).to(x.dtype)

    def fused_forward(self, base: nn.Module, x):
        """The whole layer as the base layer on the reflected inputs: one thin correction, one base matmul."""
        Y, S = self.factors()
        return base(reflect_inputs(x.to(Y.dtype), Y, S).to(x.dtype))

    def _reflect_base(self, base: nn.Module, inverse: bool) -> None:
        with torch.no_grad():  # in float32 at least, as PEFT merges half-precision weights
            W = base_weight(base)
            u = self.hra_u.float() if self.hra_u.dtype in LOW_PRECISION else self.hra_u
            Y, S = chain_factors(u, self.gram_schmidt)
            set_base_weight(base, reflect_weight(W.to(Y.dtype), Y, S, inverse).to(W.dtype))

    def merge(self, base: nn.Module) -> None:
        self._reflect_base(base, inverse=False)

    def unmerge(self, base: nn.Module) -> None:
        self._reflect_base(base, inverse=True)

    def detach_from(self, base: nn.Module) -> None:
        """Nothing to give back: the adapter never changed the base."""


# ---- method protocol -------------------------------------------------------------------------

Config = HraConfig


def make_adapter(module: nn.Module, config: HraConfig, name: str) -> nn.Module:
    refuse_non_linear("hra", module, name)
    in_features = base_weight(module).shape[1]
    if config.gram_schmidt and config.r > in_features:
        raise ConfigError(f"hra: gram_schmidt=true needs r <= in_features, but '{name}' has {in_features} inputs and "
                          f"r={config.r} (at most {in_features} orthonormal directions); lower r or exclude the layer")
    return HraLinear(module, config.r, config.gram_schmidt, config.init)
