"""SHiRA: Sparse High Rank Adapters (Bhardwaj et al., NeurIPS 2024, arXiv:2406.13175).

Why: LoRA's update ``B A`` touches every entry of ``W``, so switching adapters in the fused mode
rewrites whole matrices, and two fused LoRAs interfere everywhere. SHiRA instead trains a fixed,
very sparse set of ``W``'s own entries and leaves every other entry exactly as it was::

    W' = W + S,    S[i, j] = s_k at the k-th masked position (i_k, j_k),  0 elsewhere

A layer (out x in) trains ``k = r * (in + out)`` entries, exactly as many numbers as a rank-``r``
LoRA, but ``S`` is not limited to rank ``r``: a random sparse matrix is almost surely of full rank
(min(out, in)) once its rows and columns are all hit. Switching adapters touches ``k`` entries;
``S`` starts at zero, so the model is exactly the base at step 0; ``S`` is linear in the values,
so it merges into ``W`` and unmerges exactly.

The mask is the paper's SHiRA-Rand, as HF PEFT's ``mask_type="random"``: the first ``k`` of a
random permutation of the ``out * in`` flat positions (a CPU ``torch.Generator``, seeded with
``random_seed``; unseeded, i.e. torch's fixed default seed, when ``random_seed`` is None), taken in
increasing order (row ``p // in``, column ``p % in``), so the same seed and shape give PEFT's mask.
Positions are kept in a persistent buffer and saved beside the values, so a loaded adapter never
depends on how its mask was drawn.

Reads and writes HF PEFT's ``SHIRA`` format exactly (``formats/hf_shira.py``): values
``shira_weight`` (k), positions ``shira_indices`` (2 x k, int32). Differences from HF PEFT:
- the default ``r`` is 8 (peftlab's LoRA default: the same trainable count as ``lora``), not
  PEFT's 32: at 32, ``r * (in + out)`` exceeds ``out * in`` for any layer narrower than 64 and
  PEFT (like peftlab) refuses such a layer, so the tiny models would take no SHiRA at all;
- only the random mask: PEFT's user-supplied ``mask_fn`` has no setting here, but a file made with
  any mask loads (its positions are in the file);
- ``init=gaussian`` is PEFT's ``init_weights=False`` (standard-normal values, for tests);
- ``nn.Linear`` only (quantized linear bases included); GPT-2's ``Conv1D`` is refused clearly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import MethodConfig
from ..errors import ConfigError
from .sparse_delta import WeightDelta, delta_dtype
from .vera import can_wrap, refuse_non_linear  # noqa: F401  (protocol: nn.Linear, Conv1D refused clearly)

CATEGORY = "selective"
PAPER = "Bhardwaj et al., 2024 (arXiv:2406.13175)"
MERGEABLE = True
# FishMask's rate: the same kind of update (a fixed sparse set of W's own entries, starting at 0,
# trained directly); neither the paper nor PEFT gives one for models of this size. SST-2 to be measured.
DEFAULT_LR = 2e-3
INVALID_SETTINGS = ("r=0", "r=-2", "random_seed=1.5", "init=ones", "r=1000")
INITS = ("zeros", "gaussian")


@dataclass
class ShiraConfig(MethodConfig):
    """r: a layer trains r * (in + out) of its entries (a rank-r LoRA's count; the update's rank is
    not limited to r); random_seed: seed of the random mask (None: torch's default generator seed,
    as PEFT); init: zeros (the base at step 0) or gaussian (PEFT's init_weights=False)."""

    method: ClassVar[str] = "shira"
    r: int = 8
    random_seed: int | None = None
    init: str = "zeros"

    def validate(self) -> None:
        super().validate()
        if not (isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0):
            raise ConfigError(f"shira: r must be a positive integer (a layer trains r * (in + out) entries), got {self.r!r}")
        seed = self.random_seed
        if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool) and -2**63 <= seed < 2**64):
            raise ConfigError(f"shira: random_seed must be an integer seed or None, got {seed!r}")
        if self.init not in INITS:
            raise ConfigError(f"shira: init must be one of {', '.join(INITS)}, got {self.init!r}")


# ---- pure math -------------------------------------------------------------------------------

def entries_to_train(out_features: int, in_features: int, r: int) -> int:
    """``r * (in + out)``, refused (as PEFT does) where the layer has fewer entries than that."""
    k = r * (in_features + out_features)
    if k > out_features * in_features:
        raise ConfigError(f"shira: r={r} asks for r * (in + out) = {k} entries of a {out_features} x {in_features} layer, "
                          f"which has only {out_features * in_features}; choose r <= "
                          f"{out_features * in_features // (in_features + out_features)} or leave the layer out with 'exclude'")
    return k


def random_mask(out_features: int, in_features: int, k: int, seed: int | None) -> torch.Tensor:
    """(2 x k) rows and columns of the trained entries: ``k`` distinct flat positions drawn by a
    random permutation (CPU generator seeded with ``seed``; unseeded for None), in increasing order."""
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    flat = torch.randperm(out_features * in_features, generator=generator)[:k].sort().values
    return torch.stack([flat // in_features, flat % in_features])


def sparse_update(values: torch.Tensor, indices: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The dense (out x in) ``S``: ``values`` at ``indices``, zero elsewhere (differentiable in ``values``)."""
    return values.new_zeros(out_features, in_features).index_put((indices[0], indices[1]), values)


# ---- module ----------------------------------------------------------------------------------

class ShiraLinear(WeightDelta):
    """SHiRA for ``nn.Linear``: ``k`` trained values at fixed positions of ``W``."""

    def __init__(self, base: nn.Module, r: int, random_seed: int | None, init: str = "zeros"):
        super().__init__(base)
        self.out_features, self.in_features = self.weight_shape
        self.r = r
        k = entries_to_train(self.out_features, self.in_features, r)
        device = base.weight.device
        # saved with the values (PEFT saves them too), so an adapter never depends on how they were drawn
        self.register_buffer("shira_indices", random_mask(self.out_features, self.in_features, k, random_seed).to(device))
        start = torch.zeros(k) if init == "zeros" else torch.randn(k)
        self.shira_weight = nn.Parameter(start.to(device, delta_dtype(base)))

    def current_delta(self) -> torch.Tensor:
        return sparse_update(self.shira_weight, self.shira_indices, self.out_features, self.in_features)

    def delta_weight(self) -> torch.Tensor:
        with torch.no_grad():
            return self.current_delta()

    def adapted_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W + S`` without forming ``S``: the values added at their positions (out of place)."""
        idx = self.shira_indices
        return weight.index_put((idx[0], idx[1]), self.shira_weight.to(weight.dtype), accumulate=True)

    def forward(self, x, base_out):
        delta = self.current_delta()
        return F.linear(x.to(delta.dtype), delta)

    def load_indices(self, indices: torch.Tensor) -> None:
        """Take the positions a file holds (2 x k integers inside this layer)."""
        with torch.no_grad():
            self.shira_indices.copy_(indices.to(self.shira_indices))


# ---- method protocol -------------------------------------------------------------------------

Config = ShiraConfig


def make_adapter(module: nn.Module, config: ShiraConfig, name: str) -> nn.Module:
    refuse_non_linear("shira", module, name)
    return ShiraLinear(module, config.r, config.random_seed, config.init)
