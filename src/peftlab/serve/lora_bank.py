"""Many LoRA adapters on one base model, mixed row by row in one batch.

The design follows S-LoRA (Sheng et al., 2023) and Punica (Chen et al., 2023):

- **Slots.** ``max_loras`` adapters are *resident* at a time, stacked per target module as
  ``A[slot]`` (in x r_max) and ``B[slot]`` (r_max x out, the LoRA scale folded in); ranks below
  ``max_lora_rank`` are zero-padded, which adds exact zeros. Slot 0 is all zeros: the base model.
- **A CPU cache.** Up to ``max_cpu_loras`` adapters are kept in memory (least recently used
  goes first); the rest are read from disk when a request needs them.
- **Reference counts.** Every running request holds its adapter's slot; a slot in use is never
  given to another adapter, and an adapter in use is never evicted or unloaded.
- **One grouping per step.** ``set_rows`` receives the slot of every row of the step's batch,
  sorts and segments them once (``core.routing.Routing``), and every wrapped layer of that step
  reads the result in ``lora_delta``.

Adapters are read in Hugging Face PEFT's format (what ``peftlab.save`` writes and what ``peft``
and vLLM read), with the checks of ``peftlab.load``: safetensors only, a matching base, shapes
that fit. Three kinds batch together (``ModuleUpdate``): LoRA (a low-rank delta), DoRA (the same
delta, then a per-output gain ``m / ||W + s B A||``, its norms computed against the served base
when the adapter takes a slot) and (IA)^3 (a per-output or per-input gain, no delta). A gain is a
vector per slot, so each row takes its adapter's in one elementwise product beside the shared
base pass. Other methods, embedding LoRA and ``modules_to_save`` change more than that and are
refused with the reason.
"""
from __future__ import annotations

import itertools
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.routing import Routing
from ..core.targets import get_submodule_parent
from ..errors import AdapterFormatError, ConfigError, IncompatibleBaseError, StateError
from ..formats import hf_lora
from ..formats.io import read_adapter
from ..methods.lora import base_weight, scaling
from ..quant.layers import is_quantized
from .runner import PackedLinear

BASE_SLOT = 0
SWITCH_STEPS = 32  # steps between two merged-mode switches (a switch rewrites every adapted weight)


@dataclass
class ModuleUpdate:
    """What one adapter does to one linear layer, in the form the bank batches:
    ``y = g * (W (x * l_in) + b + s x A^T B^T) + (1 - g) * b``, where LoRA has only ``A``, ``B``
    and the scale ``s``; DoRA adds its magnitude ``m`` (``g = m / ||W + s B A||`` per output row,
    computed against this base when the adapter takes a slot); (IA)^3 has no ``A`` or ``B``, only
    its vector: ``g = l`` on an output (bias included, as PEFT does) or ``l_in = l`` on a
    feedforward input."""

    A: torch.Tensor | None = None  # (r x in)
    B: torch.Tensor | None = None  # (out x r)
    scale: float = 1.0
    magnitude: torch.Tensor | None = None  # DoRA's m (out,)
    ia3: torch.Tensor | None = None  # (IA)^3's l: (out,), or (in,) where ia3_input
    ia3_input: bool = False

    @property
    def rank(self) -> int:
        return 0 if self.A is None else self.A.shape[0]


@dataclass
class LoraWeights:
    """One adapter as the bank stores it: ``{module: ModuleUpdate}``."""

    name: str
    path: str
    rank: int
    modules: dict


def read_lora(name: str, path, shapes: dict, max_rank: int, base_fingerprint: str | None = None) -> LoraWeights:
    """Read and check the adapter in folder ``path`` against the base's module ``shapes``
    (``{module name: (out, in)}``) and the bank's rank limit: a LoRA (rsLoRA, patterns and DoRA
    included) or an (IA)^3, in HF PEFT's format. Other methods are refused with the reason."""
    hf, tensors, info = read_adapter(path)
    saved = info.get("base_fingerprint")
    if base_fingerprint and saved and saved != base_fingerprint:
        raise IncompatibleBaseError(f"adapter {name!r} ({path}) was saved for another base model "
                                    f"({info.get('base_model') or 'fingerprint ' + saved}); serve it with that base")
    peft_type = hf.get("peft_type")
    if peft_type == "IA3":
        modules = _read_ia3(name, hf, tensors, shapes)
    elif peft_type == "LORA":
        modules = _read_lora_modules(name, hf, tensors, shapes, max_rank)
    else:
        raise AdapterFormatError(f"adapter {name!r} ({path}) is a {peft_type!r} adapter; the server batches LoRA (with "
                                 "DoRA) and (IA)^3 adapters, whose updates are a low-rank product and per-feature "
                                 "scales; merge it into a base (peftlab merge) and serve that base instead")
    if not modules:
        raise AdapterFormatError(f"adapter {name!r} ({path}) holds no LoRA or (IA)^3 tensors")
    return LoraWeights(name, str(path), max(u.rank for u in modules.values()), modules)


def _read_lora_modules(name: str, hf: dict, tensors: dict, shapes: dict, max_rank: int) -> dict:
    per_module, others = hf_lora.split_keys(tensors)
    config = hf_lora.config_from_hf(hf, list(per_module))
    if others:
        raise AdapterFormatError(f"adapter {name!r} also saves full modules ({', '.join(sorted(others)[:3])}); rows "
                                 "of a shared batch cannot swap whole modules, so it cannot be served mixed")
    modules = {}
    for module, local in per_module.items():
        if "lora_B.bias" in local:
            raise AdapterFormatError(f"adapter {name!r} has a lora_B bias (lora_bias=true) at '{module}', which the "
                                     "server's low-rank kernels do not add; merge it into a base (peftlab merge) to serve it")
        if "lora_A.weight" not in local or "lora_B.weight" not in local:
            raise AdapterFormatError(f"adapter {name!r}: '{module}' has tensors {sorted(local)}; the server takes "
                                     "LoRA on linear layers (lora_A / lora_B) only")
        _check_module(name, module, shapes)
        A, B = local["lora_A.weight"].float(), local["lora_B.weight"].float()
        out_features, in_features = shapes[module]
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != in_features or B.shape[0] != out_features or A.shape[0] != B.shape[1]:
            raise IncompatibleBaseError(f"adapter {name!r}: '{module}' has A {tuple(A.shape)} and B {tuple(B.shape)}, "
                                        f"which do not fit this base's {out_features}x{in_features} layer")
        r = A.shape[0]
        if r > max_rank:
            raise ConfigError(f"adapter {name!r} has rank {r} at '{module}', above --max-lora-rank {max_rank}; "
                              "restart the server with a higher --max-lora-rank to serve it")
        magnitude = local.get("lora_magnitude_vector")
        if hf.get("use_dora") and magnitude is None:
            raise AdapterFormatError(f"adapter {name!r} is a DoRA adapter without a magnitude at '{module}'; the file "
                                     "is incomplete")
        if magnitude is not None and tuple(magnitude.flatten().shape) != (out_features,):
            raise IncompatibleBaseError(f"adapter {name!r}: '{module}' has a DoRA magnitude of {tuple(magnitude.shape)}, "
                                        f"which does not fit this base's {out_features} outputs")
        modules[module] = ModuleUpdate(A, B, scaling(config.alpha_for(module), config.rank_for(module), config.rslora),
                                       magnitude=None if magnitude is None else magnitude.float().flatten())
    return modules


def _read_ia3(name: str, hf: dict, tensors: dict, shapes: dict) -> dict:
    from ..formats.hf_ia3 import KEY, peft_feedforward

    modules = {}
    for key, value in tensors.items():
        if not key.startswith(hf_lora.PREFIX) or not key.endswith("." + KEY):
            raise AdapterFormatError(f"adapter {name!r}: unexpected tensor {key!r} in an (IA)^3 file; rows of a shared "
                                     "batch cannot swap whole modules, so it cannot be served mixed")
        module = key[len(hf_lora.PREFIX):-len(KEY) - 1]
        _check_module(name, module, shapes)
        ia3_input = bool(peft_feedforward(hf.get("feedforward_modules"), module))
        out_features, in_features = shapes[module]
        want = (1, in_features) if ia3_input else (out_features, 1)
        if tuple(value.shape) != want:
            raise IncompatibleBaseError(f"adapter {name!r}: '{module}.{KEY}' is {tuple(value.shape)}, but this base's "
                                        f"layer and feedforward_modules imply {want}")
        modules[module] = ModuleUpdate(ia3=value.float().flatten(), ia3_input=ia3_input)
    return modules


def _check_module(name: str, module: str, shapes: dict) -> None:
    if module not in shapes:
        raise IncompatibleBaseError(f"adapter {name!r} adapts '{module}', which is not a linear layer the server "
                                    f"can adapt on this base (it adapts {', '.join(sorted({m.rsplit('.', 1)[-1] for m in shapes}))})")


class StepRouting(Routing):
    """The batch rows' adapter slots, sorted and segmented once per step. With an adapter
    ``merged`` into the base, its rows need no delta (they count as base rows here) and every other
    row (``unmerged_rows``) takes the merged adapter's delta back off."""

    def __init__(self, slots: list, merged: int | None = None):
        self.unmerged_rows = None
        if merged is not None:
            others = [i for i, s in enumerate(slots) if s != merged]
            self.unmerged_rows = torch.tensor(others) if others else None
            slots = [BASE_SLOT if s == merged else s for s in slots]
        super().__init__([None if s == BASE_SLOT else s for s in slots])
        self.slots = torch.tensor(slots)
        self.used = {s for s in slots if s != BASE_SLOT}
        self.adapted_rows = torch.cat(list(self._segments_cpu.values())) if self.used else None
        self.uniform = slots[0] if len(set(slots)) == 1 else None


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, routing: StepRouting) -> torch.Tensor:
    """Each row's ``x @ A[slot] @ B[slot]`` (base rows: 0). ``x`` is (rows, tokens, in).

    One adapter for the whole batch: two plain matmuls. Otherwise the adapted rows (grouped by
    ``routing``) gather their slot's factors and run as one batched matmul pair, whatever the
    number of distinct adapters (Punica's gather-BMM, on the CPU). ``segmented_lora_delta`` is
    the per-segment reference this must match; a GPU kernel can replace this function."""
    if routing.uniform is not None:
        return x @ A[routing.uniform] @ B[routing.uniform]
    rows = routing.adapted_rows.to(x.device)
    slots = routing.slots.to(x.device)[rows]
    delta = torch.bmm(torch.bmm(x.index_select(0, rows), A.index_select(0, slots)), B.index_select(0, slots))
    return torch.zeros(x.shape[:-1] + (B.shape[-1],), dtype=x.dtype, device=x.device).index_copy_(0, rows, delta)


def segmented_lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, routing: StepRouting) -> torch.Tensor:
    """The reference: one matmul pair per adapter segment."""
    out = torch.zeros(x.shape[:-1] + (B.shape[-1],), dtype=x.dtype, device=x.device)
    for slot, rows in routing.segments(x.device).items():
        out.index_copy_(0, rows, x.index_select(0, rows) @ A[slot] @ B[slot])
    return out


def rows_of(table: torch.Tensor, routing: StepRouting, like: torch.Tensor) -> torch.Tensor:
    """Each row's vector of ``table`` (slots x features), shaped to broadcast over ``like`` (rows, ..., features)."""
    if routing.uniform is not None:
        return table[routing.uniform]
    picked = table.index_select(0, routing.slots.to(table.device))
    return picked.view(picked.shape[0], *([1] * (like.dim() - 2)), picked.shape[-1])


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The (out x in) weight of a served base layer, whatever stores it."""
    return base.weight.to_dense() if isinstance(base, PackedLinear) else base_weight(base)


class BankedLinear(nn.Module):
    """A base linear layer plus the bank's LoRA delta for the rows that have an adapter."""

    def __init__(self, base: nn.Linear, bank: "LoraBank", key: str):
        super().__init__()
        self.base_layer = base
        self.key = key
        object.__setattr__(self, "bank", bank)  # shared, not a submodule

    def forward(self, x):
        x = self.bank.scale_input(self.key, x)
        return self.bank.adapt_output(self.key, x, self.base_layer(x))


class LoraBank:
    def __init__(self, model: nn.Module, max_loras: int = 16, max_cpu_loras: int = 64, max_rank: int = 16,
                 targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                 base_fingerprint: str | None = None, merge_share: float = 0.6):
        if not isinstance(merge_share, (int, float)) or isinstance(merge_share, bool) or merge_share <= 0.5:
            raise ConfigError(f"--merge-share must be a number above 0.5 (above 1: never merge), got {merge_share!r}")
        for name, value in (("max_loras", max_loras), ("max_cpu_loras", max_cpu_loras), ("max_lora_rank", max_rank)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if max_cpu_loras < max_loras:
            raise ConfigError(f"--max-cpu-loras ({max_cpu_loras}) must be at least --max-loras ({max_loras})")
        self.max_loras, self.max_cpu_loras, self.max_rank = max_loras, max_cpu_loras, max_rank
        self.base_fingerprint = base_fingerprint
        self.lock = threading.RLock()
        self.paths = {}  # registered adapter name -> folder
        self.registrations, self.registered = {}, itertools.count()  # name -> its registration's number (see key)
        self.cpu = OrderedDict()  # name -> LoraWeights, least recently used first
        self.slot_names = [None] * (max_loras + 1)  # slot -> adapter name (slot 0: the base)
        self.slot_of, self.refs = {}, {}
        self.slot_order = OrderedDict()  # resident names, least recently used first
        self.stats = {"slot_hits": 0, "cpu_hits": 0, "disk_loads": 0, "slot_evictions": 0, "cpu_evictions": 0,
                      "merges": 0, "unmerges": 0}
        self.merge_share = merge_share
        self.merged, self.steps_since_switch = None, 0
        self.shapes, self.A, self.B, self.slots_with = {}, {}, {}, {}
        self.layers = {}  # module name -> its BankedLinear
        # per-slot feature scales, created for a module when a DoRA or (IA)^3 adapter first needs them
        self.out_scale, self.out_shift, self.in_scale = {}, {}, {}
        self.slots_scaling_out, self.slots_scaling_in = {}, {}
        self.routing = None
        self._wrap(model, targets)

    def _wrap(self, model: nn.Module, targets) -> None:
        if any(isinstance(m, BankedLinear) for m in model.modules()):
            raise ConfigError("this model is already served by a LoRA bank; give each server its own model")
        wrapped = []
        for name, module in list(model.named_modules()):
            linear = type(module) is nn.Linear or isinstance(module, PackedLinear) or is_quantized(module)
            if linear and name.rsplit(".", 1)[-1] in targets and ".layers." in f".{name}":
                parent, attr = get_submodule_parent(model, name)
                self.layers[name] = BankedLinear(module, self, name)
                setattr(parent, attr, self.layers[name])
                self.shapes[name] = (module.out_features, module.in_features)
                wrapped.append(name)
        if not wrapped:
            raise ConfigError(f"no linear layers named {', '.join(targets)} in the model's decoder layers to adapt")
        weight = next(model.parameters())
        self.dtype, self.device = weight.dtype, weight.device

    # ---- registry ------------------------------------------------------------------------

    def register(self, name: str, path) -> LoraWeights:
        """Add adapter ``name`` from folder ``path`` after reading and checking it (it stays in the
        CPU cache if there is room)."""
        weights = read_lora(name, Path(path), self.shapes, self.max_rank, self.base_fingerprint)
        with self.lock:
            if name in self.paths:
                raise ConfigError(f"an adapter named {name!r} is already loaded; unload it first or pick another name")
            self.paths[name] = str(path)
            self.registrations[name] = next(self.registered)
            self._cache(weights)
        return weights

    def key(self, name: str | None) -> str:
        """What an adapter's computed keys and values are filed under (the prefix cache): its name and
        its registration, so an adapter loaded again under an old name is a different key."""
        return "" if name is None else f"{name}#{self.registrations.get(name)}"

    def unregister(self, name: str) -> None:
        with self.lock:
            if name not in self.paths:
                raise KeyError(name)
            if self.refs.get(name):
                raise StateError(f"adapter {name!r} is in use by {self.refs[name]} running request(s); unload it when "
                                 "they finish")
            del self.paths[name]
            self.cpu.pop(name, None)
            if name in self.slot_of:
                slot = self.slot_of.pop(name)
                self.slot_names[slot] = None
                self.slot_order.pop(name, None)
                self._clear(slot)

    def names(self) -> list:
        with self.lock:
            return list(self.paths)

    # ---- slots ---------------------------------------------------------------------------

    def acquire(self, name: str | None) -> int | None:
        """The slot serving ``name`` for one more request (the base: slot 0), loading it if needed;
        None when every slot is held by running requests of other adapters (try again later)."""
        if name is None:
            return BASE_SLOT
        with self.lock:
            if name not in self.paths:
                raise KeyError(name)
            slot = self.slot_of.get(name)
            if slot is not None:
                self.stats["slot_hits"] += 1
            else:
                slot = self._free_slot()
                if slot is None:
                    return None
                self._fill(slot, self._weights(name))
            self.refs[name] = self.refs.get(name, 0) + 1
            self.slot_order.move_to_end(name)
            return slot

    def release(self, name: str | None) -> None:
        if name is None:
            return
        with self.lock:
            self.refs[name] -= 1

    def _free_slot(self) -> int | None:
        for slot in range(1, self.max_loras + 1):
            if self.slot_names[slot] is None:
                return slot
        for name in self.slot_order:  # least recently used resident adapter that no request holds
            if not self.refs.get(name):
                slot = self.slot_of.pop(name)
                del self.slot_order[name]
                self.slot_names[slot] = None
                self.stats["slot_evictions"] += 1
                return slot
        return None

    def _weights(self, name: str) -> LoraWeights:
        weights = self.cpu.get(name)
        if weights is not None:
            self.stats["cpu_hits"] += 1
            self.cpu.move_to_end(name)
            return weights
        self.stats["disk_loads"] += 1
        weights = read_lora(name, Path(self.paths[name]), self.shapes, self.max_rank, self.base_fingerprint)
        self._cache(weights)
        return weights

    def _cache(self, weights: LoraWeights) -> None:
        self.cpu[weights.name] = weights
        self.cpu.move_to_end(weights.name)
        while len(self.cpu) > self.max_cpu_loras:
            self.cpu.popitem(last=False)
            self.stats["cpu_evictions"] += 1

    @torch.no_grad()
    def _fill(self, slot: int, weights: LoraWeights) -> None:
        self._clear(slot)
        for module, update in weights.modules.items():
            out_features, in_features = self.shapes[module]
            if update.A is not None:
                if module not in self.A:
                    self.A[module] = self._zeros(in_features, self.max_rank)
                    self.B[module] = self._zeros(self.max_rank, out_features)
                    self.slots_with[module] = set()
                r = update.rank
                self.A[module][slot, :, :r] = update.A.t().to(self.dtype)
                self.B[module][slot, :r] = (update.B.t() * update.scale).to(self.dtype)
                self.slots_with[module].add(slot)
            gain = update.ia3 if update.ia3 is not None and not update.ia3_input else None
            if update.magnitude is not None:
                gain = update.magnitude / self._dora_norm(module, update)
            if gain is not None:
                if module not in self.out_scale:
                    self.out_scale[module] = self._zeros(out_features).add_(1)
                    self.out_shift[module] = self._zeros(out_features)
                    self.slots_scaling_out[module] = set()
                self.out_scale[module][slot] = gain.to(self.dtype)
                bias = getattr(self.layers[module].base_layer, "bias", None)
                if update.magnitude is not None and bias is not None:  # DoRA leaves the bias as it is
                    self.out_shift[module][slot] = ((1 - gain) * bias.float()).to(self.dtype)
                self.slots_scaling_out[module].add(slot)
            if update.ia3_input:
                if module not in self.in_scale:
                    self.in_scale[module] = self._zeros(in_features).add_(1)
                    self.slots_scaling_in[module] = set()
                self.in_scale[module][slot] = update.ia3.to(self.dtype)
                self.slots_scaling_in[module].add(slot)
        self.slot_names[slot] = weights.name
        self.slot_of[weights.name] = slot
        self.slot_order[weights.name] = None

    def _zeros(self, *shape) -> torch.Tensor:
        return torch.zeros(self.max_loras + 1, *shape, dtype=self.dtype, device=self.device)

    def _clear(self, slot: int) -> None:
        if slot == self.merged:
            self.unmerge()
        for module, slots in self.slots_with.items():
            if slot in slots:
                self.A[module][slot].zero_()
                self.B[module][slot].zero_()
                slots.discard(slot)
        for module, slots in self.slots_scaling_out.items():
            if slot in slots:
                self.out_scale[module][slot].fill_(1)
                self.out_shift[module][slot].zero_()
                slots.discard(slot)
        for module, slots in self.slots_scaling_in.items():
            if slot in slots:
                self.in_scale[module][slot].fill_(1)
                slots.discard(slot)

    def _dora_norm(self, module: str, update: ModuleUpdate) -> torch.Tensor:
        """``||W_i + s (B A)_i||`` for every output row ``i``, as DoRA (and PEFT) take it, against the
        served base's weight (read back from oneDNN's layout where packed, dequantized where quantized)."""
        W = dense_weight(self.layers[module].base_layer).float()
        if self.merged is not None and self.merged in self.slots_with.get(module, ()):  # the weight without it
            W = W - self._merged_delta(module, self.merged).float()
        return torch.linalg.vector_norm(W + (update.B.float() * update.scale) @ update.A.float(), dim=1)

    # ---- the forward pass ----------------------------------------------------------------

    def set_rows(self, slots: list) -> None:
        """The slot of each row of the next forward pass, grouped once for every layer."""
        self.routing = StepRouting(slots, self.merged)

    def delta(self, key: str, x: torch.Tensor):
        routing = self.routing
        if routing is None or key not in self.A:
            return None
        own = lora_delta(x, self.A[key], self.B[key], routing) if routing.used & self.slots_with[key] else None
        merged, rows = self.merged, routing.unmerged_rows
        if merged is None or rows is None or merged not in self.slots_with[key]:
            return own
        rows = rows.to(x.device)
        taken_back = x.index_select(0, rows) @ self.A[key][merged] @ self.B[key][merged]
        if own is None:
            own = torch.zeros(x.shape[:-1] + (taken_back.shape[-1],), dtype=x.dtype, device=x.device)
        return own.index_add_(0, rows, taken_back, alpha=-1)

    # ---- merged mode (dLoRA) ---------------------------------------------------------------

    def plan(self, slots: list) -> None:
        """dLoRA's switch (Wu et al., OSDI 2024), before a step whose rows have ``slots``: merge the
        adapter that holds at least ``merge_share`` of the rows into the base, so its rows skip the
        LoRA delta (the other rows take its delta back off), and unmerge when its share falls
        below ``1 - merge_share``. A switch rewrites every adapted weight, so at most one happens
        every ``SWITCH_STEPS`` steps. Only plain LoRA adapters on full-precision bases merge: a
        gain (DoRA, (IA)^3) is not a delta, and a quantized base would round the merge."""
        self.steps_since_switch += 1
        if not slots or self.steps_since_switch < SWITCH_STEPS or (self.merged is None and self.merge_share > 1):
            return
        counts = Counter(s for s in slots if s != BASE_SLOT)
        top, held = counts.most_common(1)[0] if counts else (None, 0)
        if self.merged is not None and counts.get(self.merged, 0) < (1 - self.merge_share) * len(slots):
            self.unmerge()
        if self.merged is None and top is not None and held >= self.merge_share * len(slots) and self._mergeable(top):
            self.merge(top)

    def _mergeable(self, slot: int) -> bool:
        if any(slot in slots for slots in (*self.slots_scaling_out.values(), *self.slots_scaling_in.values())):
            return False
        return all(type(self.layers[m].base_layer) in (nn.Linear, PackedLinear)
                   for m, slots in self.slots_with.items() if slot in slots)

    def merge(self, slot: int) -> None:
        """Fold the LoRA in ``slot`` into the base weights (rounded to fp32 like any merge)."""
        if self.merged == slot:
            return
        self.unmerge()
        self._add_to_bases(slot, 1.0)
        self.merged = slot
        self.stats["merges"] += 1

    def unmerge(self) -> None:
        """Take the merged LoRA back out: ``(W + d) - d``, within an fp32 rounding of ``W``."""
        if self.merged is None:
            return
        self._add_to_bases(self.merged, -1.0)
        self.merged = None
        self.stats["unmerges"] += 1

    def _merged_delta(self, module: str, slot: int) -> torch.Tensor:
        """The (out x in) update of ``slot``'s LoRA at ``module``: ``s B A``."""
        return (self.A[module][slot] @ self.B[module][slot]).t()

    @torch.no_grad()
    def _add_to_bases(self, slot: int, sign: float) -> None:
        self.steps_since_switch = 0
        for module, slots in self.slots_with.items():
            if slot in slots:
                base = self.layers[module].base_layer
                delta = self._merged_delta(module, slot).mul_(sign)
                if isinstance(base, PackedLinear):
                    base.add_to_weight(delta)
                else:
                    base.weight.add_(delta.to(base.weight.dtype))

    def scale_input(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """(IA)^3's feedforward scale on the input rows of the adapters that have one."""
        routing = self.routing
        if routing is None or key not in self.in_scale or not (routing.used & self.slots_scaling_in[key]):
            return x
        return x * rows_of(self.in_scale[key], routing, x)

    def adapt_output(self, key: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The base output ``out`` with each row's LoRA delta added, then DoRA's and (IA)^3's
        per-feature gains (and DoRA's bias correction) applied where the row's adapter has them."""
        delta = self.delta(key, x)
        if delta is not None:
            out = out + delta
        routing = self.routing
        if routing is None or key not in self.out_scale or not (routing.used & self.slots_scaling_out[key]):
            return out
        return out * rows_of(self.out_scale[key], routing, out) + rows_of(self.out_shift[key], routing, out)

    def residency(self) -> dict:
        with self.lock:
            return {"slots": sum(n is not None for n in self.slot_names), "cpu": len(self.cpu),
                    "in_use": sum(1 for v in self.refs.values() if v), "registered": len(self.paths)}
