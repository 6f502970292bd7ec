"""VB-LoRA: Extreme Parameter-Efficient Fine-Tuning with Vector Banks (Li et al., NeurIPS 2024,
arXiv:2405.17604).

LoRA's factors ``A`` (r x in) and ``B`` (out x r) are not stored: each is cut into sub-vectors of
length ``b`` (``vector_length``), and every sub-vector is assembled from one bank of ``h`` vectors
(``num_vectors`` x ``b``) shared by all adapted layers. Each sub-vector owns a row of ``h`` logits
``z``; its value is the softmax-weighted mixture of the bank vectors with the ``k`` largest
logits (``topk``, 2 by default)::

    v = sum_{i in topk(z)} softmax(z_topk)_i * bank_i,        delta W = B A   (no scale)

A's sub-vectors run along its rows (logits ``r x in/b x h``), B's along its columns (logits
``out/b x r x h``). What trains is the bank once plus each layer's logits, so the stored size is
about ``h b + (r (in + out) / b) h`` numbers, and with ``save_only_topk_weights`` the file keeps
only each sub-vector's ``k`` indices and ``k - 1`` mixture weights. The bank starts uniform in
``+-init_vector_bank_bound`` (0.02) and the logits normal with ``init_logits_std`` (0.1), as in
the paper: both factors start non-zero, so the model is close to but not exactly the base at step
0 (``IDENTITY_AT_INIT = False``), and every part gets a gradient from the first step. The update
is a weight, so it merges into ``W``; the forward forms ``A`` and ``B`` (thin) and runs them
through LoRA's fused kernel.

The bank is handled like VeRA's shared pair (``methods/vera.py``): a parameter registered on the
first adapted layer (so it is saved once, trained once, and moves with ``.to()``) and referenced
by the others.

Reads and writes HF PEFT's ``VBLORA`` format exactly (``formats/hf_vblora.py``): logits as
``vblora_logits_A`` / ``vblora_logits_B`` (or their ``_topk_indices`` / ``_topk_weights`` with
``save_only_topk_weights``), the bank once as ``base_model.vblora_vector_bank``. Differences from
HF PEFT:
- defaults are PEFT's (r=4, num_vectors=256, topk=2, init bounds) except ``targets`` (peftlab's
  ``all-linear``) and ``vector_length``: PEFT's 256 must divide every adapted width, which the
  tiny test models (32) and this project's benchmark models (SmolLM2: 576, MiniLM: 384) fail;
  here the default (``vector_length=none``) is the largest length up to 256 that divides every
  adapted layer's input and output width (256 on Llama-7B-like widths, 192 on SmolLM2 and MiniLM,
  16 on the tiny Llama), and the file records the length used; PEFT's ``vblora_dropout`` is
  ``dropout`` here;
- a file saved with ``save_only_topk_weights`` keeps -inf logits outside each top-k, so it serves
  and merges but cannot be trained further: a training forward on such logits raises (as PEFT's);
- ``nn.Linear`` only (quantized linear bases included); GPT-2's ``Conv1D`` is refused clearly;
  ``bias`` training has no setting here (use ``bitfit`` beside it);
- each named VB-LoRA adapter has its own bank (as in PEFT, which keys banks by adapter name).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.config import MethodConfig
from ..errors import ConfigError, TrainingError
from .lora import base_weight
from .lowrank import FactoredUpdate
from .vera import can_wrap, refuse_non_linear  # noqa: F401  (protocol: nn.Linear, Conv1D refused clearly)

CATEGORY = "reparameterized"
PAPER = "Li et al., 2024 (arXiv:2405.17604)"
MERGEABLE = True
IDENTITY_AT_INIT = False  # bank and logits both start random (the paper's init): delta W is small, not zero
INVALID_SETTINGS = ("r=0", "topk=0", "num_vectors=1", "vector_length=0", "init_logits_std=-1", "dropout=1.5",
                    "save_only_topk_weights=maybe")
# The paper (and peft's VB-LoRA example) trains the logits at 1e-2 and the bank at 1e-3 (RoBERTa on GLUE), with the
# head at 4e-3; peftlab has one rate per run, so the head's 4e-3, between the two
DEFAULT_LR = 4e-3
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}  # weights at a pretrained scale: a random tiny model's blocks barely act
MAX_AUTO_LENGTH = 256  # PEFT's default vector_length: the automatic length is the largest divisor of the widths up to it


@dataclass
class VBLoRAConfig(MethodConfig):
    """r: rank of the assembled A and B; num_vectors: vectors in the shared bank; vector_length:
    their length, dividing every adapted width (none: the largest such length up to 256); topk:
    bank vectors mixed per sub-vector; dropout: on the adapter's input; init_vector_bank_bound:
    the bank starts uniform in +-bound; init_logits_std: the logits start normal with this std;
    save_only_topk_weights: HF files keep only the top-k indices and weights (inference only)."""

    method: ClassVar[str] = "vblora"
    r: int = 4
    num_vectors: int = 256
    vector_length: int | None = None
    topk: int = 2
    dropout: float = 0.0
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1
    save_only_topk_weights: bool = False

    def validate(self) -> None:
        super().validate()
        for key in ("r", "num_vectors", "topk"):
            value = getattr(self, key)
            if not (_is_int(value) and value > 0):
                raise ConfigError(f"vblora: {key} must be a positive integer, got {value!r}")
        if not 2 <= self.num_vectors < 2**31:
            raise ConfigError(f"vblora: num_vectors must be at least 2 (a bank to choose from), got {self.num_vectors!r}")
        if self.topk > self.num_vectors:
            raise ConfigError(f"vblora: topk ({self.topk}) cannot exceed num_vectors ({self.num_vectors}); the paper's "
                              "choice is topk=2")
        if self.vector_length is not None and not (_is_int(self.vector_length) and self.vector_length > 0):
            raise ConfigError(f"vblora: vector_length must be a positive integer dividing every adapted width, or none "
                              f"(chosen from the widths), got {self.vector_length!r}")
        if not (_is_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"vblora: dropout must be in [0, 1), got {self.dropout!r}")
        bound, std = self.init_vector_bank_bound, self.init_logits_std
        if not (_is_number(bound) and math.isfinite(bound) and bound > 0):
            raise ConfigError(f"vblora: init_vector_bank_bound must be a finite number > 0 (a zero bank makes A, B and every "
                              f"gradient zero), got {bound!r}; the paper's is 0.02")
        if not (_is_number(std) and math.isfinite(std) and std >= 0):
            raise ConfigError(f"vblora: init_logits_std must be a finite number >= 0, got {std!r}")
        if not isinstance(self.save_only_topk_weights, bool):
            raise ConfigError(f"vblora: save_only_topk_weights must be true or false, got {self.save_only_topk_weights!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---- pure math -------------------------------------------------------------------------------

def mix(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """Sub-vectors from logits (..., h) and bank (h x b): the softmax of the ``topk`` largest
    logits weighting the bank vectors they select; shape (..., b)."""
    top, index = logits.topk(topk, dim=-1)
    weights = torch.softmax(top, dim=-1)
    return (bank[index] * weights[..., None]).sum(-2)  # a broadcast product: einsum's bmm over k=2 was slower


def factors(logits_A, logits_B, bank, topk) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)``: A (r x in) from logits (r, in/b, h), its rows cut into sub-vectors; B (out x r)
    from logits (out/b, r, h), its columns cut into sub-vectors."""
    A = mix(logits_A, bank, topk).reshape(logits_A.shape[0], -1)
    B = mix(logits_B, bank, topk).transpose(1, 2).reshape(-1, logits_B.shape[1])
    return A, B


def delta_weight(logits_A, logits_B, bank, topk) -> torch.Tensor:
    """The update ``B A`` (out x in)."""
    A, B = factors(logits_A, logits_B, bank, topk)
    return B @ A


def topk_from_logits(logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The compact form PEFT saves with ``save_only_topk_weights``: the top-k indices and the first
    ``k - 1`` softmax weights (the last is one minus their sum)."""
    top, index = logits.topk(topk, dim=-1)
    return index, torch.softmax(top, dim=-1)[..., :-1].contiguous()


def logits_from_topk(index: torch.Tensor, weights: torch.Tensor, num_vectors: int) -> torch.Tensor:
    """Logits (..., h) that give back those top-k mixtures: log weights at the indices, -inf elsewhere."""
    weights = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
    full = torch.full((*index.shape[:-1], num_vectors), float("-inf"), dtype=weights.dtype, device=weights.device)
    return full.scatter(-1, index.long(), weights.log())


def auto_vector_length(widths, cap: int = MAX_AUTO_LENGTH) -> int:
    """The largest length up to ``cap`` dividing every width."""
    g = 0
    for width in widths:
        g = math.gcd(g, int(width))
    return max(d for d in range(1, min(cap, g) + 1) if g % d == 0)


# ---- module ----------------------------------------------------------------------------------

class VBLoRALinear(FactoredUpdate, nn.Module):
    """VB-LoRA for ``nn.Linear``: returns ``B (A dropout(x))`` with A and B mixed from the bank. The
    first layer of an adapter holds the bank parameter ``vblora_vector_bank``; the others read it there."""

    def __init__(self, base: nn.Module, config: VBLoRAConfig):
        super().__init__()
        self.out_features, self.in_features = base_weight(base).shape
        w = base.weight
        self._like = dict(device=w.device, dtype=w.dtype if w.dtype.is_floating_point else torch.float32)
        self.r, self.topk, self.num_vectors = config.r, config.topk, config.num_vectors
        self.init_logits_std = config.init_logits_std
        self.vector_length = None  # set by build() once the adapter knows every adapted width
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def build(self, vector_length: int) -> None:
        """Create the logits (normal, ``init_logits_std``) for sub-vectors of ``vector_length``."""
        b, h = vector_length, self.num_vectors
        self.vector_length = b
        self.vblora_logits_A = nn.Parameter(torch.empty(self.r, self.in_features // b, h, **self._like))
        self.vblora_logits_B = nn.Parameter(torch.empty(self.out_features // b, self.r, h, **self._like))
        with torch.no_grad():
            self.vblora_logits_A.normal_(0, self.init_logits_std)
            self.vblora_logits_B.normal_(0, self.init_logits_std)

    # the shared bank: registered on one layer (saved and trained once), referenced by the rest
    def own_bank(self, bank: torch.Tensor) -> None:
        self.vblora_vector_bank = nn.Parameter(bank.to(**self._like))

    def use_bank_of(self, owner: "VBLoRALinear") -> None:
        self.__dict__["bank_owner"] = owner  # a plain reference, not a submodule: the bank is stored once

    def bank(self) -> torch.Tensor:
        return self.__dict__.get("bank_owner", self)._parameters["vblora_vector_bank"]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A, B, 1.0)``: forward, fused forward, delta and merging come from ``FactoredUpdate``."""
        if self.training and torch.is_grad_enabled() and torch.isinf(self.vblora_logits_A[0, 0]).any():
            raise TrainingError("vblora: these logits were loaded from a save_only_topk_weights file (-inf outside each "
                                "top-k), which serves and merges but cannot be trained further; train from a file "
                                "saved with save_only_topk_weights=false")
        return (*factors(self.vblora_logits_A, self.vblora_logits_B, self.bank(), self.topk), 1.0)


# ---- method protocol -------------------------------------------------------------------------

Config = VBLoRAConfig


def make_adapter(module: nn.Module, config: VBLoRAConfig, name: str) -> nn.Module:
    refuse_non_linear("vblora", module, name)
    return VBLoRALinear(module, config)


def after_attach(model: nn.Module, name: str, config: VBLoRAConfig) -> None:
    """Choose (or check) the vector length from every adapted width, create each layer's logits,
    draw the one bank and give it to every layer."""
    from ..core.adapters import method_adapters

    adapters = list(method_adapters(model, name, "vblora"))
    if not adapters:
        return
    widths = [w for _, a in adapters for w in (a.in_features, a.out_features)]
    length = config.vector_length or auto_vector_length(widths)
    for module_name, adapter in adapters:
        bad = [w for w in (adapter.in_features, adapter.out_features) if w % length]
        if bad:
            raise ConfigError(f"vblora: vector_length={length} does not divide the width {bad[0]} of '{module_name}' "
                              f"(every adapted input and output width must be a multiple of it); use "
                              f"vector_length={auto_vector_length(widths)} or leave it unset to have it chosen")
        adapter.build(length)
    bank = torch.empty(config.num_vectors, length).uniform_(-config.init_vector_bank_bound, config.init_vector_bank_bound)
    adapters[0][1].own_bank(bank)
    for _, adapter in adapters[1:]:
        adapter.use_bank_of(adapters[0][1])
