"""LoRA on raw parameters (``lora[target_parameters=[...]]``, HF PEFT's ``target_parameters``).

Some weights are no module's ``weight``: a mixture-of-experts layer keeps all its experts in one 3D
parameter, ``experts.gate_up_proj`` of shape (experts, d1, d2), and multiplies with slices of it in
its own forward. LoRA then adapts the parameter itself: each expert ``e`` gets its own rank-r pair and
the parameter becomes ``W[e] + s B_e A_e`` while the owning module runs. A 2D parameter (out x in) is
one such pair, like a linear layer's weight.

The factors are stored as HF PEFT stores them, so files move both ways: ``lora_A`` is (r E x in) with
expert ``e``'s rows at ``e r ... e r + r - 1``, ``lora_B`` is (out x r E) with expert ``e``'s columns at
``e, E + e, 2E + e, ...``; "in" is the last axis of a (E, d1, d2) parameter and "out" the middle one,
unless the owning module says ``is_transposed = True`` (transformers' experts stored as (E, in, out),
e.g. GPT-OSS), where ``W[e] + s (B_e A_e)^T``. Several parameters of one module are nested in PEFT
(a wrapper per parameter, the first registered innermost), so their tensors sit under
``<module>.base_layer...base_layer.lora_A.weight``; ``hf_state`` writes those names.

Deliberate differences from HF PEFT, and why: PEFT swaps the updated tensor in through
``torch.nn.utils.parametrize`` while the module runs. peftlab's adapters return what to add to a
module's output (``core/layer.py``), so this adapter runs the owning module a second time with the
updated parameters (``torch.func.functional_call``) and returns the difference: the same outputs and
gradients, for one more forward of that module (the price of not special-casing the wrapper). With two
such adapters active on one module each adds its own effect on the base; PEFT adds their updates to the
weight first (the same for a linear use of the weight, not for a nonlinear one). As in PEFT: no dropout
(x cannot be factored out of the module's forward), no lora_bias, no DoRA, no per-row routing.
"""
from __future__ import annotations

import difflib
import math

import torch
from torch import nn

from ..core.targets import layer_index, matches, named_base_modules
from ..errors import AdapterFormatError, ConfigError, TargetError


def matched_parameters(model: nn.Module, config) -> dict:
    """``{module name: [parameter names, in registration order]}`` the config's ``target_parameters`` select
    (a name matches as a whole or as a dotted suffix of ``<module>.<parameter>``); refuses an entry that
    matches nothing, naming the closest parameters."""
    found, used = {}, set()
    everything = []
    for module_name, module in named_base_modules(model):
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            everything.append(full)
            hits = [t for t in config.target_parameters if full == t or full.endswith("." + t)]
            if hits:
                used.update(hits)
                found.setdefault(module_name, []).append(pname)
    for missing in [t for t in config.target_parameters if t not in used]:
        hints = difflib.get_close_matches(missing, everything, n=3, cutoff=0.4) or difflib.get_close_matches(
            missing.split(".")[-1], [n.split(".")[-1] for n in everything], n=3, cutoff=0.4)
        raise TargetError(f"lora: target_parameters entry {missing!r} matched no parameter of this model"
                          + (f"; closest: {', '.join(dict.fromkeys(hints))}" if hints else "")
                          + ". Name a parameter as '<module path>.<parameter>' or a dotted suffix of it, e.g. "
                            "'experts.gate_up_proj'")
    layers = config.block_indices(1 + max((layer_index(n) or 0 for n in found), default=0))
    return {m: p for m, p in found.items()
            if (layers is None or layer_index(m) in set(layers)) and not any(matches(m, e) for e in config.exclude)}


def factor_shapes(param: torch.Tensor, transposed: bool) -> tuple[int, int, int]:
    """``(experts, in, out)`` of the LoRA pair for a 2D (out x in) or 3D (E x d1 x d2) parameter."""
    if param.dim() == 2:
        return 1, param.shape[1], param.shape[0]
    if param.dim() == 3:
        experts, d1, d2 = param.shape
        return (experts, d1, d2) if transposed else (experts, d2, d1)
    raise ConfigError(f"lora: target_parameters takes 2D (out x in) or 3D (experts x ...) parameters, got one of shape "
                      f"{tuple(param.shape)}")


def param_delta(A: torch.Tensor, B: torch.Tensor, scale: float, experts: int, param_dim: int, transposed: bool) -> torch.Tensor:
    """The update in the parameter's own layout from PEFT-layout factors A (rE x in), B (out x rE)."""
    if param_dim == 2:
        return (B @ A) * scale
    A = A.reshape(experts, -1, A.shape[-1])  # (E, r, in): expert-major rows
    B = B.reshape(B.shape[0], -1, experts).permute(2, 0, 1)  # (E, out, r): expert-minor columns
    delta = torch.bmm(B, A) * scale  # (E, out, in)
    return delta.transpose(1, 2) if transposed else delta


class LoraParams(nn.Module):
    """LoRA on some parameters of one module: a pair per parameter (ModuleDicts keyed by parameter name)."""

    wants_call = True  # it re-runs the module on the same call; refused by per-row routing (rows are not its inputs)

    def __init__(self, base: nn.Module, names: list, ranks: dict, alphas: dict, rslora: bool = False, init: str = "default"):
        super().__init__()
        self.names, self.rslora, self.init = list(names), rslora, init
        self.transposed = bool(getattr(base, "is_transposed", False))
        self.r, self.alpha, self.scaling, self.experts, self.dims = {}, {}, {}, {}, {}
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        for name in self.names:
            param = getattr(base, name)
            experts, fan_in, fan_out = factor_shapes(param, self.transposed and param.dim() == 3)
            r, alpha = ranks[name], alphas[name]
            dtype = param.dtype if param.dtype.is_floating_point else torch.float32
            self.lora_A[name] = nn.Linear(fan_in, r * experts, bias=False, device=param.device, dtype=dtype)
            self.lora_B[name] = nn.Linear(r * experts, fan_out, bias=False, device=param.device, dtype=dtype)
            with torch.no_grad():
                if init == "gaussian":
                    nn.init.normal_(self.lora_A[name].weight, std=1 / r)
                else:
                    nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B[name].weight)
            self.r[name], self.alpha[name], self.experts[name], self.dims[name] = r, alpha, experts, param.dim()
            self.scaling[name] = alpha / (math.sqrt(r) if rslora else r)

    def delta(self, name: str) -> torch.Tensor:
        return param_delta(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], self.experts[name],
                           self.dims[name], self.transposed and self.dims[name] == 3)

    def forward(self, x, base_out, args, kwargs):
        base = self.__dict__["_base_ref"]
        params = {name: getattr(base, name) + self.delta(name) for name in self.names}
        out = torch.func.functional_call(base, params, args, kwargs)
        if isinstance(out, tuple):
            return out[0] - base_out[0]
        return out - base_out

    def merge(self, base: nn.Module) -> None:
        with torch.no_grad():
            for name in self.names:
                getattr(base, name).data += self.delta(name).to(getattr(base, name).dtype)

    def unmerge(self, base: nn.Module) -> None:
        with torch.no_grad():
            for name in self.names:
                getattr(base, name).data -= self.delta(name).to(getattr(base, name).dtype)

    def detach_from(self, base: nn.Module) -> None:
        """Nothing to give back: the adapter never changed the base."""

    def hf_params(self):
        """``(parameter name, {HF local key: tensor}, r, alpha)`` per parameter, with PEFT's nesting:
        the first registered parameter innermost, under one ``base_layer.`` per wrapper around it."""
        for depth, name in zip(range(len(self.names) - 1, -1, -1), self.names):
            prefix = "base_layer." * depth
            yield name, {f"{prefix}lora_A.weight": self.lora_A[name].weight.detach(),
                         f"{prefix}lora_B.weight": self.lora_B[name].weight.detach()}, self.r[name], self.alpha[name]

    def load_hf(self, local: dict, source, module_name: str) -> None:
        """Load PEFT's nested tensors of this module (keys as ``hf_params`` writes them)."""
        state = {}
        for name, expected, _, _ in self.hf_params():
            for key, tensor in expected.items():
                if key not in local:
                    raise AdapterFormatError(f"{source}: '{module_name}' lacks {key} for parameter {name!r}; the file does not hold "
                                     "the parameters its target_parameters name")
                if tuple(local[key].shape) != tuple(tensor.shape):
                    raise AdapterFormatError(f"{source}: '{module_name}.{key}' is {tuple(local[key].shape)}, but parameter {name!r} "
                                     f"with this config needs {tuple(tensor.shape)}; the config and weights do not belong together")
                state[f"{key.rsplit('.', 2)[-2]}.{name}.weight"] = local[key]
        extra = sorted(set(local) - {k for _, e, _, _ in self.hf_params() for k in e})
        if extra:
            raise AdapterFormatError(f"{source}: unexpected tensors for '{module_name}': {extra}")
        self.load_state_dict(state)


def make_param_adapter(module: nn.Module, names: list, config, module_name: str) -> LoraParams:
    prefix = f"{module_name}." if module_name else ""
    ranks = {n: config.rank_for(prefix + n) for n in names}
    alphas = {n: config.alpha_for(prefix + n) for n in names}
    adapter = LoraParams(module, names, ranks, alphas, config.rslora, config.init)
    adapter.__dict__["_base_ref"] = module  # a plain reference, not a submodule
    return adapter
