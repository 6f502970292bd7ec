"""MerA: merging pretrained adapters for few-shot learning (He et al., 2023, "MerA: Merging
Pretrained Adapters For Few-Shot Learning", arXiv:2308.15982).

Why: with a few examples, one fresh adapter learns little, and an ensemble of adapters trained on
other tasks costs one adapter per member at inference. MerA fuses several trained adapters into a
single one before the few-shot tuning: same cost as one adapter, knowledge of all. Averaging the
adapters naively fails because two trained networks' hidden units are an arbitrary permutation of
each other; MerA first *aligns* the units (as model fusion does, Singh & Jaggi 2020; Ainsworth et
al. 2023), then averages.

What: the sources are bottleneck adapters of one kind and shape (``houlsby`` or ``pfeiffer``) at the
same modules. A hidden unit ``k`` of an adapter is the row ``D[k]``, bias ``d[k]`` of its
down-projection and the column ``U[:, k]`` of its up-projection; permuting the units (rows of ``D``
and ``d``, columns of ``U``) does not change the adapter's output. The paper aligns the units by
optimal transport (Singh & Jaggi's OT fusion) on weights or on activations. Two adapters of one
width have as many units, each of weight 1/b, and exact optimal transport between two such uniform
sets is a permutation; with the squared Euclidean ground cost it is the permutation maximising the
summed dot products of matched units (the squared norms add up to the same total whatever the
matching). So per module each source ``s`` is aligned to the first one by that permutation
``pi_s``, found as an assignment problem (``scipy.optimize.linear_sum_assignment`` when scipy is
installed, else the Hungarian algorithm here):

- ``align=weight`` (default): units are compared by their weights ``[D[k], d[k], U[:, k]]``
  (needs no data);
- ``align=activation``: units are compared by their activations ``act(D h + d)`` over the tokens
  of the first training batches (``h``: the base model's output of the wrapped module). The trainer's
  ``calibrate`` hook realigns with those batches before the first step; until then (and without
  the trainer) the weight alignment stands. It runs once (``calibrated`` records it), so it never
  overwrites an adapter that has been trained or loaded.

The merged adapter is the mean of the aligned sources, ``D = mean_s P_s D_s`` (and so on for ``d``
and ``U``), and is then trained like any bottleneck adapter; the sources are only read.

``sources=[...]``: each is the name of an adapter attached to the model (``peftlab.load(model,
folder, name)``) or a folder written by ``peftlab.save`` holding one houlsby or pfeiffer adapter.
The merged adapter sits at the sources' modules (``targets`` can narrow them) with their bottleneck
width and activation, recorded in the config (``bottleneck``, ``activation``, ``merged=true``), so a
saved MerA adapter loads without its sources.

Differences from the paper: the paper merges pairs of adapters; peftlab aligns any number of
sources to the first and averages them all. Activations are those of the base model at each
position (the sources' own upstream adapters are off), one batch set for all sources. HF PEFT has
no MerA, so it is saved in peftlab's own format. Not mergeable into the base weights (a
bottleneck adapter has a nonlinearity).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..core import adapters as core
from ..core.state import get_state
from ..core.targets import find_targets as find_targets_by_name
from ..core.targets import is_linear
from ..errors import AdapterFormatError, ConfigError, IncompatibleBaseError, TargetError
from .bottleneck import ACTIVATIONS, BottleneckAdapter, BottleneckConfig, linear_pair, out_width
from .bottleneck import EXAMPLE_MODEL_SETTINGS  # noqa: F401  (the registry tests' model)

CATEGORY = "hybrid"
PAPER = "He et al., 2023 (arXiv:2308.15982)"
MERGEABLE = False
IDENTITY_AT_INIT = False  # the merged adapter is trained already
# peftlab's Pfeiffer / Houlsby rate (AdamW): the merged adapter is one of theirs, tuned further. Not yet measured
DEFAULT_LR = 5e-3
INVALID_SETTINGS = ("sources=[a]", "sources=5", "align=optimal", "merged=1")
EXAMPLE_PREREQUISITES = {"task_a": "pfeiffer", "task_b": "pfeiffer"}
EXAMPLE_SETTINGS = "sources=[task_a,task_b]"
SOURCE_METHODS = ("houlsby", "pfeiffer")
ALIGNS = ("weight", "activation")
TARGETS = "sources"  # the default: the modules the sources sit at
CALIBRATION_ROWS = 4096  # tokens per module used for activation alignment


@dataclass
class MeraConfig(BottleneckConfig):
    """sources: at least two houlsby or pfeiffer adapters of one shape (attached names or saved folders);
    align: weight or activation; bottleneck / activation / merged are recorded from the sources."""

    method: ClassVar[str] = "mera"
    targets: Any = TARGETS
    sources: list | None = None
    align: str = "weight"
    merged: bool = False
    calibrated: bool = False  # recorded once activation alignment has run, so it never runs over a trained adapter

    def validate(self) -> None:
        super().validate()
        if self.align not in ALIGNS:
            raise ConfigError(f"{self.method}: align must be one of {', '.join(ALIGNS)}, got {self.align!r}")
        if not isinstance(self.merged, bool):
            raise ConfigError(f"{self.method}: merged (recorded once the sources are merged) must be true or false, "
                              f"got {self.merged!r}")
        if isinstance(self.sources, str):
            self.sources = [self.sources]
        if not self.merged and (not isinstance(self.sources, list) or len(self.sources) < 2
                                or not all(isinstance(s, str) and s for s in self.sources)):
            raise ConfigError(f"{self.method}: sources must list at least two trained houlsby or pfeiffer adapters (names "
                              f"attached to the model, or folders saved by peftlab.save), got {self.sources!r}")


# ---- pure math -----------------------------------------------------------------------------------

def unit_features(down_w: torch.Tensor, down_b: torch.Tensor, up_w: torch.Tensor) -> torch.Tensor:
    """One row per hidden unit: ``[D[k], d[k], U[:, k]]``, (bottleneck x 2*width+1)."""
    return torch.cat([down_w, down_b[:, None], up_w.T], dim=1)


def hungarian(cost: np.ndarray) -> np.ndarray:
    """The column assigned to each row minimising the summed cost of a square matrix (potentials form
    of the Hungarian algorithm, O(n^3))."""
    n = cost.shape[0]
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    owner, way = np.zeros(n + 1, dtype=int), np.zeros(n + 1, dtype=int)  # owner[j]: the row holding column j (1-based)
    for row in range(1, n + 1):
        owner[0], col = row, 0
        slack, used = np.full(n + 1, np.inf), np.zeros(n + 1, dtype=bool)
        while owner[col]:
            used[col] = True
            i = owner[col]
            free = ~used[1:]
            reduced = cost[i - 1] - u[i] - v[1:]
            better = free & (reduced < slack[1:])
            slack[1:][better], way[1:][better] = reduced[better], col
            candidates = np.where(free, slack[1:], np.inf)
            nxt = int(np.argmin(candidates)) + 1
            delta = candidates[nxt - 1]
            u[owner[used]] += delta
            v[used] -= delta
            slack[~used] -= delta
            col = nxt
        while col:
            prev = way[col]
            owner[col], col = owner[prev], prev
    assigned = np.empty(n, dtype=int)
    assigned[owner[1:] - 1] = np.arange(n)
    return assigned


def match_units(similarity: torch.Tensor) -> torch.Tensor:
    """``perm`` with ``perm[k]`` the other adapter's unit matched to unit ``k``, maximising the summed similarity."""
    if similarity.is_meta:  # shapes only (peftlab methods counts parameters on the meta device): nothing to match
        return torch.arange(similarity.shape[0])
    scores = similarity.detach().double().cpu().numpy()
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        return torch.as_tensor(hungarian(-scores))
    rows, cols = linear_sum_assignment(scores, maximize=True)
    return torch.as_tensor(cols[np.argsort(rows)])


def permute_units(weights: tuple, perm: torch.Tensor) -> tuple:
    """(D, d, U, u) with the hidden units reordered: unit ``k`` becomes unit ``perm[k]``."""
    down_w, down_b, up_w, up_b = weights
    return down_w[perm], down_b[perm], up_w[:, perm], up_b


def merge_aligned(sources: list, similarities: list | None = None) -> tuple:
    """The mean of the sources (each (D, d, U, u)) after aligning sources 1.. to source 0; ``similarities``
    gives each source's unit similarity to source 0 (default: weight matching)."""
    reference = sources[0]
    aligned = [reference]
    for index, other in enumerate(sources[1:]):
        similarity = (similarities[index] if similarities is not None
                      else unit_features(*reference[:3]) @ unit_features(*other[:3]).T)
        aligned.append(permute_units(other, match_units(similarity)))
    return tuple(torch.stack(parts).mean(0) for parts in zip(*aligned))


# ---- reading the sources --------------------------------------------------------------------------

def _adapter_weights(adapter: nn.Module) -> tuple:
    return tuple(t.detach() for t in (adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias))


def attached_source(model: nn.Module, name: str) -> tuple[BottleneckConfig, dict]:
    state = get_state(model)
    configs = state.configs.get(name) if state is not None else None
    if configs is None:
        raise ConfigError(f"mera: source {name!r} is neither an adapter attached to this model (it has "
                          f"{sorted(state.configs) if state else 'none'}) nor a saved adapter folder")
    kinds = [c for c in configs if c.method in SOURCE_METHODS]
    if len(kinds) != 1 or len(configs) != 1:
        raise ConfigError(f"mera: source {name!r} is a {'|'.join(c.method for c in configs)} adapter; MerA merges plain "
                          f"bottleneck adapters ({', '.join(SOURCE_METHODS)})")
    return kinds[0], {m: _adapter_weights(layer.adapters[name]) for m, layer in core.adapter_layers(model, name)}


def saved_source(folder: str) -> tuple[BottleneckConfig, dict]:
    from ..formats.hf_common import PREFIX
    from ..formats.io import read_adapter
    from . import get_method

    hf, tensors, _ = read_adapter(folder)
    entries = hf.get("methods") if hf.get("peft_type") == "PEFTLAB" else None
    if not entries or len(entries) != 1 or entries[0].get("method") not in SOURCE_METHODS:
        found = [e.get("method") for e in entries or []] or hf.get("peft_type")
        raise AdapterFormatError(f"{folder}: a MerA source holds one houlsby or pfeiffer adapter saved by peftlab; found {found}")
    entry = dict(entries[0])
    modules = entry.pop("modules", [])
    config = get_method(entry["method"]).Config.from_dict(entry, strict=False)
    weights = {}
    for module in modules:
        keys = [f"{PREFIX}{module}.{part}" for part in ("down.weight", "down.bias", "up.weight", "up.bias")]
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise AdapterFormatError(f"{folder}: {missing[0]} is missing; the file is not a plain {config.method} adapter")
        weights[module] = tuple(tensors[k] for k in keys)
    return config, weights


def read_sources(model: nn.Module, config: MeraConfig) -> tuple[BottleneckConfig, dict]:
    """(the first source's config, {module: [each source's (D, d, U, u)]}), checked to agree."""
    found = []
    for source in config.sources:
        attached = get_state(model) is not None and source in get_state(model).configs
        found.append(attached_source(model, source) if attached or not Path(source).is_dir() else saved_source(source))
    first, reference = found[0]
    for source, (other, weights) in zip(config.sources[1:], found[1:]):
        if other.method != first.method or other.activation != first.activation:
            raise ConfigError(f"mera: source {source!r} is a {other.method} adapter with activation {other.activation}, but "
                              f"{config.sources[0]!r} is {first.method} with {first.activation}; merge adapters of one kind")
        shapes = {m: tuple(t.shape for t in w) for m, w in weights.items()}
        if shapes != {m: tuple(t.shape for t in w) for m, w in reference.items()}:
            raise IncompatibleBaseError(f"mera: source {source!r} sits at other modules or has other shapes than "
                                        f"{config.sources[0]!r}; the sources must share the base model and bottleneck width")
    return first, {m: [w[m] for _, w in found] for m in reference}


# ---- method protocol ---------------------------------------------------------------------------

Config = MeraConfig
can_wrap = is_linear


def find_targets(model: nn.Module, config: MeraConfig) -> list[str]:
    """The sources' modules (narrowed by ``targets``), their weights merged and kept on the config for
    ``make_adapter``; a saved MerA adapter (``merged``) is rebuilt at its recorded modules instead."""
    if config.merged:
        return find_targets_by_name(model, config, can_wrap)
    kind, weights = read_sources(model, config)
    positions = list(weights)
    asked = config if config.targets != TARGETS else replace(config, targets=["re:" + re.escape(n) for n in positions])
    chosen = [n for n in find_targets_by_name(model, asked, lambda module: True) if n in positions]
    if not chosen:
        raise TargetError(f"mera: targets {config.targets} select none of the sources' modules ({positions[:4]}...)")
    config.bottleneck, config.reduction, config.activation = weights[chosen[0]][0][0].shape[0], None, kind.activation
    config.__dict__["_merged"] = {m: merge_aligned(weights[m]) for m in chosen}
    config.merged = True
    return chosen


def make_adapter(module: nn.Module, config: MeraConfig, module_name: str) -> BottleneckAdapter:
    width = out_width(module)
    down, up = linear_pair(width, config.bottleneck_for(width), width, module.weight)
    merged = config.__dict__.get("_merged", {}).get(module_name)
    if merged is not None:
        load_merged(down, up, merged)
    return BottleneckAdapter(down, up, config, module_name)


def load_merged(down: nn.Linear, up: nn.Linear, merged: tuple) -> None:
    with torch.no_grad():
        for target, value in zip((down.weight, down.bias, up.weight, up.bias), merged):
            if target.shape != value.shape:
                raise IncompatibleBaseError(f"mera: a merged tensor is {tuple(value.shape)} where the module needs "
                                            f"{tuple(target.shape)}; the sources were trained on another base model")
            target.copy_(value)


def after_attach(model: nn.Module, name: str, config: MeraConfig) -> None:
    config.__dict__.pop("_merged", None)  # the merged weights now live in the adapters


def uses_hook(config: MeraConfig, hook: str) -> bool:
    return hook == "calibrate" and config.align == "activation" and not config.calibrated


def calibrate(model: nn.Module, name: str, config: MeraConfig, batches, loss_fn) -> None:
    """Activation alignment: realign and re-merge the sources from their hidden units' activations on
    ``batches`` (the base model's outputs at each module), and write the result into the adapters."""
    _, weights = read_sources(model, config)
    layers = {m: layer for m, layer in core.adapter_layers(model, name) if m in weights}
    seen = {m: [] for m in layers}
    hooks = [layer.base_layer.register_forward_hook(
        lambda mod, args, out, m=m: seen[m].append(out.detach().reshape(-1, out.shape[-1]))) for m, layer in layers.items()]
    try:
        with torch.no_grad(), core.disabled(model):
            for batch in batches:
                model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for hook in hooks:
            hook.remove()
    act = ACTIVATIONS[config.activation]()
    for module_name, layer in layers.items():
        h = torch.cat(seen[module_name])[:CALIBRATION_ROWS].float()
        sources = weights[module_name]
        units = [act(h @ w[0].float().T + w[1].float()) for w in sources]
        merged = merge_aligned(sources, [units[0].T @ other for other in units[1:]])
        adapter = layer.adapters[name]
        load_merged(adapter.down, adapter.up, tuple(t.to(adapter.down.weight.dtype) for t in merged))
    config.calibrated = True
