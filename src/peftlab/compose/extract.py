"""``peftlab extract-lora``: a LoRA from a fully fine-tuned model, by truncated SVD of the difference.

A fully fine-tuned model is a whole copy of the base; most of what fine-tuning changed in a linear
layer often lies in a few directions. For each linear layer whose weight differs, the update
``ΔW = W_ft - W_base`` is factorized by a full ``torch.linalg.svd`` (exact, not a randomized
estimate: the layers of the models this targets are at most a few thousand wide, where the exact
SVD takes well under a second) and cut at ``max_rank``. By Eckart-Young (1936) the cut is the best
approximation of that rank in the Frobenius norm, and the share of ``ΔW``'s energy (squared
Frobenius norm, ``Σ σ_k²``) it keeps is reported per layer. ``energy`` (e.g. 0.99) instead keeps
the fewest directions reaching that share, never more than ``max_rank``. This is what mergekit's
and Kohya's LoRA extraction do, written for peftlab.

The result is attached to the base as a plain LoRA of scale 1 (``combining.attach_lowrank``), so
``peftlab.save`` writes an ordinary HF PEFT LoRA. What a LoRA cannot carry is reported, not lost
silently: changed biases, norms, embeddings, and linear layers that ``targets`` leaves out.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from .algebra import LowRank


@dataclass
class Extracted:
    """What ``extract_lora`` made: the adapter's ``name``, its rank and the share of ``ΔW``'s energy
    kept per layer, and the changed parameters a LoRA cannot carry (biases, norms, embeddings, and
    linear layers left out by ``targets``)."""

    name: str
    ranks: dict = field(default_factory=dict)
    energy_kept: dict = field(default_factory=dict)
    not_carried: list = field(default_factory=list)

    @property
    def min_energy_kept(self) -> float:
        return min(self.energy_kept.values(), default=1.0)


def extract_lora(finetuned: nn.Module, base: nn.Module, max_rank: int = 64, targets: list | None = None,
                 energy: float | None = None, name: str = "extracted") -> Extracted:
    """Attach to ``base`` a LoRA ``name`` approximating ``finetuned - base`` in each linear layer
    that differs (those matching ``targets`` if given: names or suffixes, ``re:`` for a regex), at
    rank at most ``max_rank``; ``energy`` stops each layer at the fewest directions keeping that
    share of its update's energy."""
    from ..core.targets import is_linear, matches, named_base_modules
    from .combining import attach_lowrank

    check_options(max_rank, energy)
    ft_modules, base_modules = dict(named_base_modules(finetuned)), dict(named_base_modules(base))
    check_same_architecture(ft_modules, base_modules)
    linear = [n for n, m in base_modules.items() if is_linear(m)]
    if targets:
        linear = [n for n in linear if any(matches(n, t) for t in targets)]
        if not linear:
            raise ConfigError(f"the targets {list(targets)} match no linear layer of the base; give module names or suffixes "
                              "such as q_proj,v_proj (or re:<regex>)")
    result = Extracted(name)
    factors = {}
    with torch.no_grad():
        for module_name in linear:
            tuned, original = ft_modules[module_name], base_modules[module_name]
            delta = _weight(tuned).to(torch.float32) - _weight(original).to(torch.float32)
            if not bool(delta.any()):
                continue
            factors[module_name], result.energy_kept[module_name] = truncate(delta, max_rank, energy)
        result.not_carried = not_carried(ft_modules, base_modules, set(factors))
    if not factors:
        where = f" among the targets {list(targets)}" if targets else ""
        raise ConfigError(f"no linear layer{where} differs between the fine-tuned model and the base: there is nothing to "
                          "extract (is --model the fine-tuned model and --base its base?)")
    dtype = next(base.parameters()).dtype
    factors = {k: LowRank(v.B.to(dtype), v.A.to(dtype)) for k, v in factors.items()}
    result.ranks = attach_lowrank(base, factors, name)
    return result


def check_options(max_rank, energy) -> None:
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise ConfigError(f"max-rank must be a positive integer (the largest LoRA rank per layer), got {max_rank!r}")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1):
        raise ConfigError(f"min-energy must be in (0, 1] (the share of each layer's update energy to keep), got {energy!r}")


def truncate(delta: torch.Tensor, max_rank: int, energy: float | None) -> tuple[LowRank, float]:
    """``delta``'s best approximation of rank at most ``max_rank`` (fewer where ``delta`` has fewer
    numerically nonzero directions, or where ``energy`` is reached sooner), factors sharing the
    singular values evenly; and the share of the energy kept."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    total = S.square().sum()
    numerical = int((S > S[0] * torch.finfo(S.dtype).eps * max(delta.shape)).sum())  # as matrix_rank counts
    keep = max(1, min(max_rank, numerical))
    if energy is not None:
        reached = int((S.square().cumsum(0) / total < energy - 1e-7).sum()) + 1  # fewest directions reaching it
        keep = max(1, min(keep, reached))
    root = S[:keep].sqrt()
    kept = float(S[:keep].square().sum() / total)
    return LowRank(U[:, :keep] * root, root[:, None] * Vh[:keep]), min(kept, 1.0)


def check_same_architecture(ft_modules: dict, base_modules: dict) -> None:
    missing = sorted(set(base_modules) ^ set(ft_modules))
    if missing:
        raise ConfigError(f"the fine-tuned model and the base have different modules (e.g. {missing[0]}): extract-lora needs "
                          "the base the model was fine-tuned from")
    for module_name, module in base_modules.items():
        ours, theirs = _shapes(module), _shapes(ft_modules[module_name])
        if ours != theirs:
            raise ConfigError(f"{module_name} has shapes {theirs} in the fine-tuned model but {ours} in the base: extract-lora "
                              "needs the base the model was fine-tuned from")


def not_carried(ft_modules: dict, base_modules: dict, extracted: set) -> list:
    """Parameters that differ, other than the weights of the layers extracted."""
    changed = []
    for module_name, module in ft_modules.items():
        for param_name, value in module.named_parameters(recurse=False):
            if param_name == "weight" and module_name in extracted:
                continue
            if not torch.equal(value, getattr(base_modules[module_name], param_name)):
                changed.append(f"{module_name}.{param_name}" if module_name else param_name)
    return changed


def _weight(module: nn.Module) -> torch.Tensor:
    """The (out x in) weight (GPT-2's Conv1D stores it transposed)."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def _shapes(module: nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in module.named_parameters(recurse=False)}


def extract_to_folder(model: str, base: str, out, max_rank: int = 64, targets: list | None = None,
                      energy: float | None = None, say=print) -> Extracted:
    """``peftlab extract-lora``: load both models (``models.load_model``: built-in names, folders, hub
    names), extract, and write the LoRA to ``out`` with ``extract.json`` (rank and energy kept per
    layer, what was not carried)."""
    from pathlib import Path

    import peftlab
    from ..formats.files import write_json
    from ..models import load_model

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} already holds files; give a new folder")
    check_options(max_rank, energy)  # before minutes of loading
    say(f"loading {model} (fine-tuned) and {base} (base)")
    tuned, _ = load_model(model, device="cpu")
    original, _ = load_model(base, device="cpu")
    result = extract_lora(tuned, original, max_rank=max_rank, targets=targets, energy=energy)
    del tuned
    adapter = peftlab.save(original, out, name=result.name)
    write_json(out / "extract.json", {"model": model, "base": base, "max_rank": max_rank, "targets": targets,
                                      "min_energy": energy, "ranks": result.ranks, "energy_kept": result.energy_kept,
                                      "not_carried": result.not_carried})
    ranks = sorted(set(result.ranks.values()))
    say(f"{len(result.ranks)} layers, rank {ranks[0] if len(ranks) == 1 else f'{ranks[0]}-{ranks[-1]}'}, at least "
        f"{100 * result.min_energy_kept:.2f}% of each layer's update energy kept")
    if result.not_carried:
        say(f"not carried by a LoRA ({len(result.not_carried)} changed parameters, listed in extract.json): "
            f"{', '.join(result.not_carried[:3])}{' ...' if len(result.not_carried) > 3 else ''}")
    say(f"saved {adapter} (a plain Hugging Face PEFT LoRA) and {out / 'extract.json'}")
    return result
