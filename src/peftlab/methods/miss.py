"""MiSS: Matrix Shard Sharing (Kang & Yin, "MiSS: Balancing LoRA Performance and Efficiency with
Simple Shard Sharing", arXiv:2409.15371; first published as Bone, "Block Affine").

A frozen weight ``W`` (out x in) is cut along its inputs into ``in / r`` shards of ``r`` columns,
and every shard receives the same trained update, one ``r x out`` matrix ``D`` (PEFT's
``miss_block``, zeros at init)::

    delta W[:, j] = D[j mod r, :]          (W' = W + [D^T  D^T ... D^T])
    delta W x     = D^T (x_1 + x_2 + ... + x_{in/r})     x_k: the k-th r-wide slice of x

so the forward sums the input's slices (a width that is not a multiple of ``r`` is zero-padded,
as in PEFT) and makes one ``r x out`` product: a single trained matrix (``r out`` numbers where
a rank-r LoRA trains ``r (in + out)``), with no initialization to compute. It starts at zero
(the base model at step 0) and is linear, so it merges. Variants (PEFT's ``init_weights``):

- ``init=balance`` (PEFT's default ``True``): the above;
- ``init=mini``: ``D`` is itself one ``r x mini_r`` block repeated along the outputs
  (``out % mini_r == 0``): ``r mini_r`` trained numbers a layer;
- ``init=bat`` (Bone's "block affine"): ``W`` is cut into ``r x r`` blocks ``W_ji`` (``r`` must
  divide ``in`` and ``out``) and output block-row ``j`` has its own trained ``r x r`` ``B_j``
  (``out / r`` of them, zeros): ``W'_ji = W_ji + W_ji B_j + B_j``. The update reads the frozen
  weight (Bone's "weight guide"), so it is not linear in ``W``; merging is still exact and
  unmerge solves ``W_ji = (W'_ji - B_j)(I + B_j)^{-1}``;
- ``init=random`` (PEFT's ``False``): ``balance`` with ``D`` drawn Kaiming-uniform (not the base
  at step 0).

Reads and writes HF PEFT's ``MISS`` format exactly (``formats/hf_miss.py``). Differences from HF PEFT:
- defaults are PEFT's (r=64, no dropout, balance, mini_r=1) except ``targets`` (peftlab's
  ``all-linear``);
- a layer with fewer inputs than ``r`` gets ``r = in_features`` (one shard: ``delta W = D^T``, a
  free update of that layer), so the defaults attach to narrow layers (PEFT refuses such a layer).
  PEFT's file has one ``r`` for all layers: an adapter whose layers ended with different ``r`` is
  saved in peftlab's own format, with a warning (choose ``r`` at most the narrowest adapted width
  for a file PEFT reads);
- ``bat`` ignores ``dropout``, as PEFT does (its forward forms the weight); it works on quantized
  bases here too (the base is dequantized), where PEFT refuses backends that cannot dequantize;
- ``nn.Linear`` only (quantized linear bases included); GPT-2's ``Conv1D`` is refused clearly.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import MethodConfig
from ..errors import ConfigError
from .lora import base_weight, set_base_weight
from .vera import can_wrap, refuse_non_linear  # noqa: F401  (protocol: nn.Linear, Conv1D refused clearly)

CATEGORY = "reparameterized"
PAPER = "Kang & Yin, 2024 (arXiv:2409.15371)"
MERGEABLE = True
INVALID_SETTINGS = ("r=0", "mini_r=0", "dropout=1.5", "init=lora", "init=bat")
# peft's examples/miss_finetuning trains Llama-2-7B at 2e-5, full fine-tuning's rate for a 7B model: each entry of
# the update is one weight entry's change, as in full fine-tuning; peftlab fully fine-tunes the 22M MiniLM at 1e-4
# (bench/grid.py FULL_LR), so MiSS gets that (an SST-2 run at this rate is still to be measured)
DEFAULT_LR = 1e-4
INITS = ("balance", "bat", "mini", "random")


@dataclass
class MissConfig(MethodConfig):
    """r: shard width (the rank of the update; a narrower layer uses its width); dropout: on the
    input of the shared shard (PEFT's miss_dropout); init: balance (PEFT's default), bat (block
    affine: r x r blocks reading W; r must divide the widths), mini (an r x mini_r block repeated
    along the outputs), random (balance from Kaiming-uniform values); mini_r: the mini block's width."""

    method: ClassVar[str] = "miss"
    r: int = 64
    dropout: float = 0.0
    init: str = "balance"
    mini_r: int = 1

    def validate(self) -> None:
        super().validate()
        for key in ("r", "mini_r"):
            value = getattr(self, key)
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise ConfigError(f"miss: {key} must be a positive integer, got {value!r}")
        p = self.dropout
        if not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= p < 1.0):
            raise ConfigError(f"miss: dropout must be in [0, 1), got {p!r}")
        if self.init not in INITS:
            raise ConfigError(f"miss: init must be one of {', '.join(INITS)} (PEFT's init_weights True, 'bat', 'mini', "
                              f"False), got {self.init!r}")

    def r_for(self, out_features: int, in_features: int, module_name: str = "") -> int:
        """The layer's shard width (ConfigError where a setting cannot fit it)."""
        where = f"'{module_name}'" if module_name else "a layer"
        if self.init == "bat":
            if in_features % self.r or out_features % self.r:
                raise ConfigError(f"miss: init=bat cuts the weight into r x r blocks, but {where} is {out_features} x "
                                  f"{in_features} and r={self.r} does not divide both; choose r dividing every adapted "
                                  "layer's widths, or another init")
            return self.r
        if self.init == "mini" and out_features % self.mini_r:
            raise ConfigError(f"miss: init=mini repeats an r x mini_r block along the outputs, but mini_r={self.mini_r} "
                              f"does not divide the {out_features} outputs of {where}; choose mini_r dividing them")
        return min(self.r, in_features)


# ---- pure math -------------------------------------------------------------------------------

def shared_shard(block: torch.Tensor, out_features: int, init: str) -> torch.Tensor:
    """The r x out matrix ``D`` every shard shares (mini: its block repeated along the outputs)."""
    return block.repeat(1, out_features // block.shape[1]) if init == "mini" else block


def fold_inputs(x: torch.Tensor, r: int) -> torch.Tensor:
    """``x_1 + x_2 + ...``: the input's r-wide slices summed (the last one zero-padded)."""
    pad = -x.shape[-1] % r
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, r).sum(dim=-2)


def tiled_delta(shard: torch.Tensor, in_features: int) -> torch.Tensor:
    """``delta W`` (out x in) with column ``j`` = ``shard[j mod r]``."""
    r = shard.shape[0]
    return shard.T.repeat(1, -(-in_features // r))[:, :in_features]


def bat_delta(W: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Block affine: ``W_ji B_j + B_j`` for every r x r block of ``W`` (blocks: out/r x r x r)."""
    J, r, _ = blocks.shape
    Wb = W.reshape(J, r, W.shape[1] // r, r)  # [j, a, i, b] = W[j r + a, i r + b]
    return (torch.einsum("jaib,jbc->jaic", Wb, blocks) + blocks[:, :, None, :]).reshape(W.shape)


def bat_undo(merged: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``W`` from ``W + bat_delta(W)``: ``(W'_ji - B_j)(I + B_j)^{-1}`` block by block."""
    J, r, _ = blocks.shape
    Wb = merged.reshape(J, r, merged.shape[1] // r, r).permute(0, 2, 1, 3) - blocks[:, None]  # j, i, a, b
    eye = torch.eye(r, device=blocks.device, dtype=blocks.dtype)
    return torch.linalg.solve(eye + blocks[:, None], Wb, left=False).permute(0, 2, 1, 3).reshape(merged.shape)


# ---- module ----------------------------------------------------------------------------------

class MissLinear(nn.Module):
    """MiSS for ``nn.Linear``: ``miss_block`` is PEFT's tensor (r x out; bat: out/r x r x r; mini: r x mini_r)."""

    def __init__(self, base: nn.Module, r: int, init: str = "balance", mini_r: int = 1, dropout: float = 0.0):
        super().__init__()
        self.out_features, self.in_features = base_weight(base).shape
        w = base.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        self.r, self.init, self.mini_r = r, init, mini_r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        shape = {"bat": (self.out_features // r, r, r), "mini": (r, mini_r)}.get(init, (r, self.out_features))
        block = torch.zeros(shape)
        if init == "random":
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        self.miss_block = nn.Parameter(block.to(w.device, dtype))
        self.__dict__["_base_ref"] = base  # a plain reference, not a submodule

    def _base_weight(self) -> torch.Tensor:
        return base_weight(self.__dict__["_base_ref"]).to(self.miss_block.dtype)

    def _delta(self, W: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        if self.init == "bat":
            return bat_delta(W, block)
        return tiled_delta(shared_shard(block, self.out_features, self.init), self.in_features)

    def delta_weight(self) -> torch.Tensor:
        """``W' - W`` for the unmerged base (bat reads the base weight)."""
        return self._delta(self._base_weight() if self.init == "bat" else None, self.miss_block)

    def forward(self, x, base_out):
        block = self.miss_block
        if self.init == "bat":
            return F.linear(x.to(block.dtype), self.delta_weight()).to(x.dtype)
        shard = shared_shard(block, self.out_features, self.init)
        return (fold_inputs(self.dropout(x.to(block.dtype)), self.r) @ shard).to(x.dtype)

    def fused_forward(self, base: nn.Module, x):
        """bat: the layer in one matmul with ``W + delta W`` (formed anyway); None elsewhere."""
        if self.init != "bat" or type(base) is not nn.Linear or x.dtype != self.miss_block.dtype \
                or x.dtype != base.weight.dtype:
            return None
        return F.linear(x, base.weight + self.delta_weight(), base.bias)

    def merge(self, base: nn.Module) -> None:
        with torch.no_grad():  # in float32 at least, as PEFT merges half-precision weights
            W = base_weight(base)
            work, block = W.to(_work_dtype(self.miss_block)), self.miss_block.to(_work_dtype(self.miss_block))
            set_base_weight(base, (work + self._delta(work, block)).to(W.dtype))

    def unmerge(self, base: nn.Module) -> None:
        with torch.no_grad():
            W = base_weight(base)
            merged, block = W.to(_work_dtype(self.miss_block)), self.miss_block.to(_work_dtype(self.miss_block))
            # bat: W from W' by a blockwise solve (CPU has none in half precision)
            restored = bat_undo(merged, block) if self.init == "bat" else merged - self._delta(None, block)
            set_base_weight(base, restored.to(W.dtype))

    def detach_from(self, base: nn.Module) -> None:
        """Nothing to give back: the adapter never changed the base."""


def _work_dtype(block: torch.Tensor) -> torch.dtype:
    return torch.float32 if block.dtype in (torch.float16, torch.bfloat16) else block.dtype


# ---- method protocol -------------------------------------------------------------------------

Config = MissConfig


def make_adapter(module: nn.Module, config: MissConfig, name: str) -> nn.Module:
    refuse_non_linear("miss", module, name)
    out_features, in_features = base_weight(module).shape
    return MissLinear(module, config.r_for(out_features, in_features, name), config.init, config.mini_r, config.dropout)


def narrowed_warning(ranks: dict, r: int) -> None:
    """Say why an adapter whose layers' r differ is saved in peftlab's format, not PEFT's."""
    narrow = sorted({v for v in ranks.values() if v != r})
    warnings.warn(f"miss: layers narrower than r={r} use their width (r={narrow}); PEFT's MISS format has one r for "
                  "every layer, so this adapter is saved in peftlab's own format, which PEFT cannot read (choose r at "
                  f"most {min(ranks.values())} for a PEFT file)", stacklevel=3)
