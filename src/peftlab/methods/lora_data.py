"""LoRA inits chosen from data: EVA, CorDA and LoRA-GA (``lora[init=eva|corda|lora_ga]``).

All three look at a few batches before training. They run as LoRA's ``calibrate`` hook, the same way
FishMask picks its mask: ``peftlab.train`` calls it once with the first training batches (eval mode,
random streams untouched) before it builds the optimizer, which matters here because EVA changes the
adapters' ranks; a hand-written loop calls ``initialize(model, batches)`` (or
``peftlab.core.adapters.calibrate(model, batches, loss_fn)``). Until then an adapter is a plain
LoRA with B = 0 that refuses to be saved (it is not yet what its init promises); an adapter whose
tensors were loaded (a file, a checkpoint) is never re-initialised.

- EVA (Paszke et al., 2024, arXiv:2410.07170): each adapted layer's ``A`` is the top right singular
  vectors of its (centred) inputs, i.e. their principal directions, and ``B = 0``, so the model starts
  as the base. The rank budget (the sum of the layers' r) is then shared out by explained variance:
  every layer offers its first ``round(r * eva_rho)`` components' explained-variance ratios, the
  budget's largest win, and a layer gets as many ranks as it won (a layer that wins none loses its
  adapter). The new ranks go into ``rank_pattern`` (alpha unchanged, as in PEFT's default
  ``adjust_scaling_factors=False``), so the file is a plain LoRA, ``init_lora_weights: "eva"``.
  Tokens counted: those with attention mask 1 and, where ``labels`` has the tokens' shape, a label
  other than -100 (PEFT's ``use_label_mask``). Deliberate difference: peftlab does an exact PCA of all
  the given batches (one eigendecomposition of each layer's input covariance), where PEFT runs a
  randomized incremental PCA over its data loader until the components stop moving (``tau``); with
  enough tokens both find the same directions, and the exact one does not depend on a seed or on the
  order of the batches. Layers fed the same input (q, k, v) offer equal ratios; their ties go to the earlier
  layer, where PEFT computes such a group once and breaks its ties its own way, so ranks can be spread
  differently inside the group (the group's total is the same). ``whiten`` is not offered (PEFT's default,
  off), nor ``adjust_scaling_factors``. The input statistics are (in x in) per layer, in float32.
- CorDA (Yang et al., NeurIPS 2024, arXiv:2406.05223): ``C`` is the inputs' covariance (per example
  ``X^T X`` of its tokens scaled by ``1/|max X|``, averaged over examples, damped by a multiple of its
  mean diagonal until it inverts well, as PEFT does); ``W C = U S V^T``; with ``V' = C^{-1} V``,
  ``W = U S V'^T`` exactly. The adapter takes r components, the largest (``corda_method=ipm``,
  instruction-previewed) or the smallest (``kpm``, knowledge-preserved): ``B = U_r sqrt(S_r / s)``,
  ``A = sqrt(S_r / s) V'_r^T``, and the base keeps ``W - s B A``. Saved like PiSSA: the plain LoRA of
  rank 2r on the original base that PEFT writes with ``path_initial_model_for_weight_conversion``.
- LoRA-GA (Wang et al., NeurIPS 2024, arXiv:2407.05000): ``G`` is the weight's loss gradient averaged
  over the batches; ``G = U S V^T``; with PEFT's defaults (``direction=ArB2r``, ``scale=stable``,
  ``stable_gamma=16``) ``A = V^T[:r]``, ``B = U[:, r:2r] S[r:2r] * out^(1/4) / 4`` and the base keeps
  ``W - s B A``, so the model starts as the base while the first step's update approximates full
  fine-tuning's. Saved like PiSSA (plain LoRA of rank 2r). Deliberate differences: the gradient is
  taken in eval mode (no dropout: what the trainer's calibration gives every method) and the SVD is
  exact (PEFT: ``torch.svd_lowrank``, randomized); the other directions/scales are not offered.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..core.adapters import adapter_layers
from ..errors import ConfigError, StateError
from .lora import LoraLinear, base_weight

LABEL_MASK = -100  # PEFT's EvaConfig.label_mask_value
GA_GAMMA = 16  # PEFT's LoraGAConfig.stable_gamma


def initialize(model: nn.Module, batches, name: str = "default", loss_fn=None) -> None:
    """Initialise adapter ``name``'s init=eva / corda / lora_ga layers from ``batches`` (dicts of model
    inputs; LoRA-GA needs labels). ``loss_fn(model, batch)`` defaults to the trainer's loss."""
    from ..core.state import require_state

    if loss_fn is None:
        from ..train.loss import training_loss

        def loss_fn(m, batch):
            return training_loss(m, batch, False)

    was_training = model.training
    model.eval()
    try:
        for config in require_state(model).configs.get(name, []):
            if getattr(config, "init", None) in ("eva", "corda", "lora_ga"):
                initialize_adapter(model, name, config, batches, loss_fn)
    finally:
        model.train(was_training)


def initialize_adapter(model: nn.Module, name: str, config, batches, loss_fn) -> None:
    """The calibrate hook's work for one adapter (see the module notes)."""
    layers = {module_name: layer for module_name, layer in adapter_layers(model, name)
              if isinstance(layer.adapters[name], LoraLinear) and getattr(layer.adapters[name], "awaiting_data", False)}
    if not layers:
        return  # trained or loaded already
    batches = list(batches or [])
    if not batches:
        raise StateError(f"lora: init={config.init} chooses its start from data and was given no batches; train with "
                         "peftlab.train (it uses the first training batches) or call "
                         "peftlab.methods.lora_data.initialize(model, batches) with a few batches of model inputs")
    if config.init == "lora_ga":
        grads = weight_gradients(model, [layer.base_layer for layer in layers.values()], batches, loss_fn)
        for (module_name, layer), grad in zip(layers.items(), grads):
            adapter = layer.adapters[name]
            A, B = lora_ga_factors(grad, adapter.r)
            adapter.take_from_base(layer.base_layer, A.to(adapter.lora_A.weight.dtype), B.to(adapter.lora_B.weight.dtype))
        return
    stats = input_statistics(model, {n: layer.base_layer for n, layer in layers.items()}, batches, loss_fn,
                             per_example=config.init == "corda")
    if config.init == "corda":
        for module_name, layer in layers.items():
            adapter = layer.adapters[name]
            A, B = corda_factors(base_weight(layer.base_layer), stats[module_name], adapter.r, adapter.scaling,
                                 config.corda_method)
            adapter.take_from_base(layer.base_layer, A.to(adapter.lora_A.weight.dtype), B.to(adapter.lora_B.weight.dtype))
        return
    _apply_eva(model, name, config, layers, stats)


# ---- statistics from batches -----------------------------------------------------------------

def token_mask(batch: dict):
    """(rows x tokens) bool mask of the tokens to use: attention mask 1 and label not -100 (where the
    labels are per token); None when the batch has neither input_ids nor an attention mask."""
    mask = batch.get("attention_mask")
    ids = batch.get("input_ids")
    if mask is None and ids is None:
        return None
    mask = mask.bool() if mask is not None else torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    labels = batch.get("labels")
    if torch.is_tensor(labels) and labels.shape == mask.shape:
        mask = mask & (labels != LABEL_MASK)
    return mask


def input_statistics(model: nn.Module, bases: dict, batches, loss_fn, per_example: bool) -> dict:
    """Per module name: ``(count, sum, X^T X)`` of its input rows over the batches' masked tokens, or
    with ``per_example`` the mean over examples of ``X^T X / max(X)^2`` (CorDA's covariance)."""
    stats, current, handles = {}, {}, []

    def hook(module_name):
        def record(module, args, output):
            x = args[0].detach().float()
            mask = current["mask"]
            rows = ([x[i][mask[i]] for i in range(x.shape[0])] if mask is not None and x.shape[:-1] == mask.shape
                    else [x.reshape(-1, x.shape[-1])])
            if not per_example:
                rows = [torch.cat(rows)]
            for X in rows:
                if not len(X):
                    continue
                n, total, scatter = stats.get(module_name, (0, 0.0, 0.0))
                if per_example:
                    X = X / X.max().abs()
                    stats[module_name] = (n + 1, total, scatter + X.t() @ X)
                else:
                    stats[module_name] = (n + len(X), total + X.sum(0), scatter + X.t() @ X)
        return record

    try:
        for module_name, base in bases.items():
            handles.append(base.register_forward_hook(hook(module_name)))
        with torch.no_grad():
            for batch in batches:
                current["mask"] = token_mask(batch)
                loss_fn(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in bases if n not in stats]
    if missing:
        raise StateError(f"lora: the calibration batches never reached '{missing[0]}' (or had no unmasked token); give "
                         "batches of model inputs with at least one token that is not padding / label -100")
    return stats


def weight_gradients(model: nn.Module, bases: list, batches, loss_fn) -> list:
    """Each base weight's loss gradient (out x in), averaged over the batches."""
    weights = [b.weight for b in bases]
    flags = [w.requires_grad for w in weights]
    totals = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in weights]
    count = 0
    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            for batch in batches:
                loss = loss_fn(model, batch)
                if loss is None or not torch.isfinite(loss):
                    continue
                for total, grad in zip(totals, torch.autograd.grad(loss, weights, allow_unused=True)):
                    if grad is not None:
                        total += grad.float()
                count += 1
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
    if not count:
        raise StateError("lora: init=lora_ga needs a loss gradient and found no batch with a finite loss; give it "
                         "batches with labels")
    return [(t / count).t() if type(b).__name__ == "Conv1D" else t / count for t, b in zip(totals, bases)]


# ---- pure math -------------------------------------------------------------------------------

def eva_components(count: int, total: torch.Tensor, scatter: torch.Tensor, k: int):
    """The first k principal directions (rows, unit norm, each one's largest entry positive) of the
    inputs summarised by (count, sum, X^T X), and every component's explained-variance ratio."""
    mean = total.double() / count
    centred = scatter.double() - count * torch.outer(mean, mean)
    values, vectors = torch.linalg.eigh(centred)
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    components = vectors[:, :k].t()
    rows = torch.arange(len(components))
    components = components * components[rows, components.abs().argmax(1)].sign()[:, None]
    return components.float(), (values / values.sum()).float()


def eva_ranks(ratios: dict, ranks: dict, rho: float) -> dict:
    """EVA's redistribution: each layer offers its first ``round(r * rho)`` explained-variance ratios;
    the ``sum(r)`` largest of all offers win; a layer's new rank is how many of its offers won."""
    offers = [(float(v), i, n) for i, (n, values) in enumerate(ratios.items())
              for v in values[:round(ranks[n] * rho)]]
    offers.sort(key=lambda o: (-o[0], o[1]))
    won = {n: 0 for n in ratios}
    for _, _, n in offers[:sum(ranks.values())]:
        won[n] += 1
    return won


def corda_factors(weight: torch.Tensor, stats: tuple, r: int, scale: float, mode: str):
    """CorDA's ``(A, B)``: r components of ``W C = U S V^T`` (ipm: largest, kpm: smallest), with
    ``A = sqrt(S/s) (C^{-1} V)^T`` and ``B = U sqrt(S/s)``."""
    count, _, scatter = stats
    C = scatter.double() / count
    eye = torch.eye(len(C), dtype=C.dtype, device=C.device)
    damp = 0.01
    while True:  # damp until the inverse is good (PEFT: error below 0.05)
        fixed = C + eye * C.diagonal().mean() * damp
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye) < 0.05:
            break
        damp *= 2
    U, S, Vh = torch.linalg.svd(weight.double() @ fixed, full_matrices=False)
    Vh = Vh @ inverse
    keep = slice(0, r) if mode == "ipm" else slice(len(S) - r, len(S))
    if r > len(S):
        raise ConfigError(f"lora: init=corda with r={r} on a weight of rank at most {len(S)}; use r <= {len(S)}")
    root = (S[keep] / scale).sqrt()
    return (root[:, None] * Vh[keep]).float(), (U[:, keep] * root[None, :]).float()


def lora_ga_factors(grad: torch.Tensor, r: int):
    """LoRA-GA's ``(A, B)`` from the gradient (out x in) with PEFT's defaults (ArB2r, stable, gamma 16)."""
    if 2 * r > min(grad.shape):
        raise ConfigError(f"lora: init=lora_ga takes 2r singular vectors of the gradient, but r={r} exceeds half the "
                          f"smaller side of a {grad.shape[0]}x{grad.shape[1]} weight; use r <= {min(grad.shape) // 2}")
    U, S, Vh = torch.linalg.svd(grad.double(), full_matrices=False)
    A = Vh[:r]
    B = U[:, r:2 * r] * S[r:2 * r][None, :] * (grad.shape[0] ** 0.25 / math.sqrt(GA_GAMMA))
    return A.float(), B.float()


# ---- EVA: new ranks --------------------------------------------------------------------------

def _apply_eva(model: nn.Module, name: str, config, layers: dict, stats: dict) -> None:
    from ..core.targets import get_submodule_parent

    ranks = {n: layer.adapters[name].r for n, layer in layers.items()}
    comps, ratios = {}, {}
    for module_name, (count, total, scatter) in stats.items():
        k = min(round(ranks[module_name] * config.eva_rho), len(scatter))
        comps[module_name], ratios[module_name] = eva_components(count, total, scatter, k)
        ratios[module_name] = ratios[module_name][:k]
    won = eva_ranks(ratios, ranks, config.eva_rho)
    pattern, dropped = {}, []
    for module_name, layer in layers.items():
        old, k = layer.adapters[name], won[module_name]
        if k == 0:
            del layer.adapters[name]
            if not len(layer.adapters):
                parent, child = get_submodule_parent(model, module_name)
                setattr(parent, child, layer.base_layer)
            dropped.append(module_name)
            continue
        adapter = old
        if k != old.r:
            adapter = LoraLinear(layer.base_layer, k, old.alpha, config.dropout, config.rslora, "eva")
            adapter.train(old.training)
            layer.adapters[name] = adapter
            pattern[re.escape(module_name)] = k
        with torch.no_grad():
            adapter.lora_A.weight.copy_(comps[module_name][:k])
            adapter.lora_B.weight.zero_()
        adapter.awaiting_data = False
    config.rank_pattern = {**pattern, **config.rank_pattern}
    config.exclude = list(config.exclude) + ["re:" + re.escape(n) for n in dropped]
