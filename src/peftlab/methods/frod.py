"""FRoD: Full-Rank Efficient Fine-Tuning with Rotational Degrees (AAAI 2026,
doi:10.1609/aaai.v40i31.39813).

LoRA's update is low-rank. FRoD keeps a full-rank update cheap by writing every adapted weight in
a basis shared by the layers that play the same role in different blocks (all ``q_proj``, all
``down_proj``, ...)::

    W = U diag(lambda) V^T          V: in x in, shared by the category;  U: out x in, unit columns
    W' = U (S + diag(lambda)) V^T   S: in x in, zero on the diagonal, non-zero at a few fixed places

What trains is ``lambda`` (``in`` numbers, starting at the column norms that make ``U diag(lambda)
V^T = W``) and the values of ``S`` at ``floor(sparse_rate * in^2)`` random off-diagonal places (the
"rotational degrees": they mix the basis directions). A layer trains ``in + nnz`` numbers, yet the
update reaches every rank.

The shared basis is the "hierarchical joint decomposition" of a category's weights ``W_1..W_L``
(ordered by block index): stacked row-wise they are ``Q R`` (QR); with ``Q_l`` the rows of ``Q``
that belong to ``W_l``, ``T = mean_l (Q_l^T Q_l + alpha I)^-1`` (``alpha = regularization_alpha``
keeps the inverse stable for correlated layers) and ``V = R^T E`` for ``T``'s eigenvectors ``E``.
(When the stack has fewer rows than columns, ``V`` is the stack's right singular vectors.) Then per
layer ``B = W V^-T`` (solved in float64), ``lambda = |B|`` column-wise and ``U = B / lambda``. The
places of ``S`` are drawn category by category (sorted names) from one CPU generator seeded with
``projection_prng_key``: HF PEFT's bases and places for the same model, so they regenerate alike.

Reads and writes HF PEFT's ``FROD`` format exactly (``formats/hf_frod.py``). Differences from HF
PEFT:
- PEFT's layer replaces ``W`` by ``U (S + diag(lambda)) V^T``; here the layer adds the update
  ``U (S + diag(lambda - lambda_0)) V^T`` to ``W`` (``lambda_0``: the start values, recomputed from
  ``V`` and ``W`` as ``U`` is). The two differ only by ``W - U diag(lambda_0) V^T``, the float32
  round-off of the reconstruction, far under the 1e-5 the files are tested at; in exchange the
  model is exactly the base at step 0, and merge, unmerge, routing, several adapters and quantized
  bases work as for any weight update (PEFT keeps a copy of the pre-merge weight for unmerge);
- defaults are PEFT's (sparse_rate=0.01, regularization_alpha=1e-3, projection_prng_key=0,
  save_projection=True) except ``targets`` (peftlab's ``all-linear``); ``frod_dropout`` is
  ``dropout``; PEFT's ``init_weights=False`` (a random start, for its tests) and
  ``runtime_offload_base_weight`` have no setting here;
- each named FRoD adapter has its own bases (PEFT shares the first adapter's); a file holds one;
- ``nn.Linear`` only (quantized linear bases included: the bases come from the dequantized
  weight); GPT-2's ``Conv1D`` is refused clearly; ``bias`` training has no setting here.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import MethodConfig
from ..errors import ConfigError
from .lora import MergesDelta, base_weight
from .vera import can_wrap, refuse_non_linear  # noqa: F401  (protocol: nn.Linear, Conv1D refused clearly)

CATEGORY = "reparameterized"
PAPER = "FRoD, AAAI 2026 (doi:10.1609/aaai.v40i31.39813)"
MERGEABLE = True
# neither PEFT nor its docs give a rate; lambda and S are O(1) coefficients in the shared basis, so the LoRA
# family's 1e-3 (peftlab's fallback), to be measured on SST-2
DEFAULT_LR = 1e-3
# a step moves lambda and S relative to W's own scale, and a random tiny model's blocks (weights at 0.02) barely act:
# 12 steps at 1e-3 move its loss under 0.1%; at a pretrained scale (0.2) it trains as the registry tests expect
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}
INVALID_SETTINGS = ("sparse_rate=1.5", "sparse_rate=-0.1", "regularization_alpha=-1", "dropout=1.5",
                    "projection_prng_key=1.5", "save_projection=maybe")


@dataclass
class FrodConfig(MethodConfig):
    """sparse_rate: share of a layer's in x in off-diagonal places S trains (cost: rate * in^2 numbers);
    regularization_alpha: ridge term of the shared basis's inverses; projection_prng_key: seed of S's
    places; save_projection: write the bases and places into the file (else both sides recompute them
    from the base weights and the key); dropout: on the layer's input."""

    method: ClassVar[str] = "frod"
    sparse_rate: float = 0.01
    regularization_alpha: float = 1e-3
    projection_prng_key: int = 0
    save_projection: bool = True
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        rate = self.sparse_rate
        if not (isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0.0 <= rate <= 1.0):
            raise ConfigError(f"frod: sparse_rate (the share of off-diagonal places that train) must be in [0, 1], "
                              f"got {rate!r}; PEFT's default is 0.01")
        a = self.regularization_alpha
        if not (isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) and a >= 0):
            raise ConfigError(f"frod: regularization_alpha must be a small non-negative number (default 1e-3), got {a!r}")
        key = self.projection_prng_key
        if not (isinstance(key, int) and not isinstance(key, bool) and -2**63 <= key < 2**64):
            raise ConfigError(f"frod: projection_prng_key must be an integer seed, got {key!r}")
        if not isinstance(self.save_projection, bool):
            raise ConfigError(f"frod: save_projection must be true or false, got {self.save_projection!r}")
        if not (isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"frod: dropout must be in [0, 1), got {self.dropout!r}")


# ---- pure math -------------------------------------------------------------------------------

def category(module_name: str) -> str:
    """The role a module plays in its block, from its last two name parts: ``self_attn_q_proj``;
    BERT's ``attention.output.dense`` is ``attention_output`` (apart from the MLP's ``output.dense``).
    Modules of one category share a basis (PEFT's rule)."""
    parts = module_name.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    if parts[-2:] == ["output", "dense"] and len(parts) >= 3 and parts[-3] == "attention":
        return "attention_output"
    return f"{parts[-2]}_{parts[-1]}"


def block_index(module_name: str, fallback: int) -> int:
    """The block a module sits in: the number after ``layers``, else the first number in its name,
    else ``fallback`` (its position among the adapted modules)."""
    parts = module_name.split(".")
    if "layers" in parts:
        following = parts[parts.index("layers") + 1:parts.index("layers") + 2]
        if following and following[0].isdigit():
            return int(following[0])
    return next((int(p) for p in parts if p.isdigit()), fallback)


def shared_basis(weights: list, alpha: float) -> torch.Tensor:
    """``V`` (in x in) for one category's weights (each out_l x in, float32), in block order."""
    stacked = torch.cat(weights, dim=0)
    if stacked.shape[0] < stacked.shape[1]:
        return torch.linalg.svd(stacked, full_matrices=True)[2].T
    Q, R = torch.linalg.qr(stacked)
    n = R.shape[1]
    T = torch.zeros(n, n, dtype=R.dtype, device=R.device)
    for Q_l in Q.split([w.shape[0] for w in weights], dim=0):
        T += torch.linalg.inv(Q_l.T @ Q_l + alpha * torch.eye(n, dtype=R.dtype, device=R.device))
    return R.T @ torch.linalg.eigh(T / len(weights))[1]


def sparse_places(n: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """(2 x nnz) rows and columns of S's trained values: ``floor(rate n^2)`` off-diagonal places of
    an n x n matrix (at least one when rate > 0), drawn by one ``randperm`` of the row-major
    off-diagonal places."""
    rows, cols = torch.meshgrid(torch.arange(n, device="cpu"), torch.arange(n, device="cpu"), indexing="ij")
    places = torch.stack([rows.flatten(), cols.flatten()], dim=1)
    off = places[places[:, 0] != places[:, 1]]
    nnz = min(int(n * n * rate), off.shape[0])
    if rate > 0 and off.shape[0] > 0:
        nnz = max(1, nnz)
    if not nnz:
        return torch.empty(2, 0, dtype=torch.long, device="cpu")
    return off[torch.randperm(off.shape[0], generator=generator, device="cpu")[:nnz]].t().contiguous()


def nnz_for(n: int, rate: float) -> int:
    """How many places ``sparse_places`` draws for an n x n matrix."""
    off = n * n - n
    nnz = min(int(n * n * rate), off)
    return max(1, nnz) if rate > 0 and off > 0 else nnz


def factor(W: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, lambda)`` with ``U diag(lambda) V^T = W``: ``B = W V^-T`` in float64 (a pseudo-inverse
    where V is singular), ``lambda`` its column norms, ``U`` its columns scaled to unit length
    (zero where a norm vanishes). Returned in float32."""
    w, v = W.detach().double().cpu(), V.detach().double().cpu()
    try:
        B = torch.linalg.solve(v, w.T).T
    except RuntimeError:
        B = w @ torch.linalg.pinv(v, rtol=1e-6).T
    lam = torch.linalg.norm(B, dim=0)
    U = torch.zeros_like(B)
    keep = lam > 1e-12
    U[:, keep] = B[:, keep] / lam[keep]
    return U.float(), lam.float()


def dense_s(values: torch.Tensor, places: torch.Tensor, n: int) -> torch.Tensor:
    """S (n x n): ``values`` at ``places`` (summed where a place repeats), zero elsewhere."""
    return values.new_zeros(n, n).index_put((places[0], places[1]), values, accumulate=True)


def delta_weight(U, V, S, lam, lam0) -> torch.Tensor:
    """The update ``U (S + diag(lambda - lambda_0)) V^T`` (out x in)."""
    return U @ (S + torch.diag(lam - lam0)) @ V.T


# ---- module ----------------------------------------------------------------------------------

class FrodLinear(MergesDelta, nn.Module):
    """FRoD for ``nn.Linear``: returns ``U (S + diag(lambda - lambda_0)) V^T dropout(x)``. The first
    layer of a category holds its shared ``frod_V`` / ``frod_s_indices`` / ``frod_s_size``; the others
    read them from it. ``U`` and ``lambda_0`` are derived from ``V`` and the base weight, never saved."""

    def __init__(self, base: nn.Module, sparse_rate: float, dropout: float = 0.0):
        super().__init__()
        self.out_features, self.in_features = base_weight(base).shape
        w = base.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        n = self.in_features
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.frod_lambda_l = nn.Parameter(torch.zeros(n, device=w.device, dtype=dtype))  # set by after_attach
        self.frod_lambda_s_values = nn.Parameter(torch.zeros(nnz_for(n, sparse_rate), device=w.device, dtype=dtype))
        self.register_buffer("frod_U", torch.zeros(self.out_features, n, device=w.device, dtype=dtype), persistent=False)
        self.register_buffer("lambda_0", torch.zeros(n, device=w.device, dtype=dtype), persistent=False)
        self.__dict__["_base_ref"] = base  # a plain reference, not a submodule
        self.register_load_state_dict_post_hook(lambda module, keys: module.refresh())

    # the category's shared tensors: registered on one layer (saved once), referenced by the rest
    def own_projection(self, V: torch.Tensor, places: torch.Tensor) -> None:
        like = self.frod_lambda_l
        self.register_buffer("frod_V", V.to(like.device, like.dtype))
        self.register_buffer("frod_s_indices", places.to(like.device, torch.long))
        self.register_buffer("frod_s_size", torch.tensor([V.shape[0], V.shape[0]], device=like.device))

    def use_projection_of(self, owner: "FrodLinear") -> None:
        self.__dict__["projection_owner"] = owner  # a plain reference, not a submodule

    def projection(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The category's ``(V, S places, S size)``."""
        owner = self.__dict__.get("projection_owner", self)
        return owner._buffers["frod_V"], owner._buffers["frod_s_indices"], owner._buffers["frod_s_size"]

    def refresh(self, start: bool = False) -> None:
        """``U`` and ``lambda_0`` from the category's ``V`` and the base weight; with ``start``, also
        ``lambda = lambda_0`` (the adapter's start)."""
        owner = self.__dict__.get("projection_owner", self)
        if "frod_V" not in owner._buffers or owner._buffers["frod_V"].is_meta:
            return  # not yet tied to its category (a state dict loaded before after_attach), or a model of sizes only
        U, lam = factor(base_weight(self.__dict__["_base_ref"]), self.projection()[0])
        with torch.no_grad():
            self.frod_U.copy_(U)
            self.lambda_0.copy_(lam)
            if start:
                self.frod_lambda_l.copy_(lam)

    def _s(self) -> torch.Tensor:
        _, places, _ = self.projection()
        return dense_s(self.frod_lambda_s_values, places, self.in_features)

    def delta_weight(self) -> torch.Tensor:
        V = self.projection()[0]
        return delta_weight(self.frod_U, V, self._s(), self.frod_lambda_l, self.lambda_0)

    def forward(self, x, base_out):
        V = self.projection()[0]
        z = self.dropout(x).to(V.dtype) @ V
        z = z * (self.frod_lambda_l - self.lambda_0) + z @ self._s().T
        return F.linear(z, self.frod_U).to(x.dtype)

    def fused_forward(self, base: nn.Module, x):
        """While training, the whole layer in PEFT's form ``U (S + diag(lambda)) V^T x + b``: since
        ``U diag(lambda_0) V^T = W`` (up to float32 round-off), the frozen base's own matmul can be
        skipped, which saves one of the step's three (out x in)-sized products (the SST-2 step went
        from 1.16x PEFT's to below it, ``benchmarks/twin_step.py``). Evaluation, merges and
        gradient-free training keep the exact ``W x + delta`` form. None where it does not apply."""
        if (type(base) is not nn.Linear or not isinstance(self.dropout, nn.Identity)
                or not (torch.is_grad_enabled() and self.frod_lambda_l.requires_grad)):
            return None
        V = self.projection()[0]
        z = x.to(V.dtype) @ V
        z = z * self.frod_lambda_l + z @ self._s().T
        bias = None if base.bias is None else base.bias.to(z.dtype)
        return F.linear(z, self.frod_U, bias).to(x.dtype)


# ---- method protocol -------------------------------------------------------------------------

Config = FrodConfig


def make_adapter(module: nn.Module, config: FrodConfig, name: str) -> nn.Module:
    refuse_non_linear("frod", module, name)
    return FrodLinear(module, config.sparse_rate, config.dropout)


def after_attach(model: nn.Module, name: str, config: FrodConfig) -> None:
    """Build each category's shared basis and S places from its layers' weights (PEFT's order: block
    index, then sorted category names through one generator), tie the layers to them and start
    every ``lambda`` at the column norms that reproduce ``W``."""
    from ..core.adapters import method_adapters

    adapters = list(method_adapters(model, name, "frod"))
    by_block: dict = defaultdict(dict)  # block -> category -> adapter (a later module of the same pair wins, as in PEFT)
    for position, (module_name, adapter) in enumerate(adapters):
        by_block[block_index(module_name, position)][category(module_name)] = adapter
    generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
    owners = {}
    for cat in sorted({c for cats in by_block.values() for c in cats}):
        members = [cats[cat] for _, cats in sorted(by_block.items()) if cat in cats]
        weights = [base_weight(a.__dict__["_base_ref"]).detach() for a in members]
        widths = {w.shape[1] for w in weights}
        if len(widths) != 1:
            raise ConfigError(f"frod: the layers of category {cat!r} have different input widths {sorted(widths)}; they "
                              "share one basis, so they must agree: narrow 'targets'")
        n = widths.pop()
        V = torch.empty(n, n, device="meta") if any(w.is_meta for w in weights) else \
            shared_basis([w.float().cpu() for w in weights], config.regularization_alpha)  # meta: sizes only (table.py)
        owners[cat] = (V, sparse_places(n, config.sparse_rate, generator))
    first = {}
    for module_name, adapter in adapters:
        cat = category(module_name)
        if cat in first:
            adapter.use_projection_of(first[cat])
        else:
            first[cat] = adapter
            adapter.own_projection(*owners[cat])
        adapter.refresh(start=True)
