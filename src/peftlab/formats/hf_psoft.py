"""Hugging Face PEFT's PSOFT format (``peft_type: PSOFT``), read and written exactly.

``adapter_config.json`` is a ``PsoftConfig`` as PEFT writes it (``r``, ``psoft_alpha``,
``psoft_dropout``, ``ab_svd_init``, ``psoft_svd``, ``psoft_svd_lowrank_niter``, ``random_seed``,
``psoft_orth``, ``psoft_mag_a``, ``psoft_mag_b``, ``use_cayley_neumann``,
``num_cayley_neumann_terms``, ``cayley_neumann_eps``, ``init_weights``).
``adapter_model.safetensors`` holds per layer ``base_model.model.<module path>.psoft_R.weight``
(r(r-1)/2 with ``psoft_orth``, else r x r) and, where enabled, ``.psoft_R.vector_b`` and
``.psoft_R.vector_a`` (r): the peftlab module's own state dict. The frozen principal pair is
recomputed from the base weight on load, so it is never saved. An adapter whose layers' r differ
(layers narrower than ``r`` use their width) is written in peftlab's own format, with a warning.
Linear layers only; files that target Conv1D layers are refused clearly.
"""
from __future__ import annotations

import re

from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import named_base_modules
from ..errors import AdapterFormatError, ConfigError
from ..methods.psoft import PsoftConfig, narrowed_warning
from . import native
from .hf_common import PREFIX, linear_modules, module_tensors, present_modules_to_save, refuse_base_training, target_names

PEFT_TYPES = ("PSOFT",)
LOCAL = re.compile(r"\.(psoft_R\.(?:weight|vector_a|vector_b))$")


# ---- save ------------------------------------------------------------------------------------

def writes(configs) -> bool:
    return len(configs) == 1 and configs[0].method == "psoft"


def to_hf(model: nn.Module, name: str, config: PsoftConfig) -> tuple[dict, dict]:
    """(adapter_config.json, tensors) of adapter ``name`` as PEFT writes a PSOFT (peftlab's format where
    the layers' r differ, which PEFT's file cannot say)."""
    state = require_state(model)
    tensors, ranks = {}, {}
    for module_name, layer in core.adapter_layers(model, name):
        adapter = layer.adapters[name]
        for key, value in adapter.state_dict().items():
            tensors[f"{PREFIX}{module_name}.{key}"] = value.detach()
        ranks[module_name] = adapter.r
    if len(set(ranks.values())) > 1:
        narrowed_warning(ranks, config.r)
        return native.to_native(model, name, [config])
    hf = {
        "peft_type": "PSOFT",
        "base_model_name_or_path": state.base_name,
        "r": next(iter(ranks.values()), config.r),
        "target_modules": target_names(list(ranks), dict(named_base_modules(model))),
        "exclude_modules": None,
        "psoft_alpha": config.alpha,
        "psoft_dropout": config.dropout,
        "fan_in_fan_out": False,
        "ab_svd_init": f"{config.init}_init",
        "psoft_svd": config.svd,
        "psoft_svd_lowrank_niter": config.svd_niter,
        "random_seed": config.random_seed,
        "psoft_orth": config.orth,
        "psoft_mag_b": config.mag_b,
        "psoft_mag_a": config.mag_a,
        "use_cayley_neumann": config.use_cayley_neumann,
        "num_cayley_neumann_terms": config.num_cayley_neumann_terms,
        "cayley_neumann_eps": config.cayley_neumann_eps,
        "modules_to_save": list(config.modules_to_save) or None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "auto_mapping": None,
    }
    return hf, tensors


# ---- load ------------------------------------------------------------------------------------

def config_from_hf(hf: dict, modules: list) -> PsoftConfig:
    refuse_base_training(hf, "PSOFT")
    init = hf.get("ab_svd_init", "psoft_init")
    if init not in ("psoft_init", "pissa_init"):
        raise AdapterFormatError(f"adapter_config.json has ab_svd_init={init!r}; PEFT's PSOFT knows psoft_init and "
                                 "pissa_init")
    try:
        config = PsoftConfig(targets=sorted(modules), r=hf.get("r", 32), alpha=hf.get("psoft_alpha", 32),
                             dropout=hf.get("psoft_dropout", 0.0), init=init.removesuffix("_init"),
                             svd=hf.get("psoft_svd", "full"), svd_niter=hf.get("psoft_svd_lowrank_niter", 10),
                             random_seed=hf.get("random_seed", 0), orth=hf.get("psoft_orth", True),
                             mag_a=hf.get("psoft_mag_a", True), mag_b=hf.get("psoft_mag_b", True),
                             use_cayley_neumann=hf.get("use_cayley_neumann", False),
                             num_cayley_neumann_terms=hf.get("num_cayley_neumann_terms", 5),
                             cayley_neumann_eps=hf.get("cayley_neumann_eps"),
                             modules_to_save=list(hf.get("modules_to_save") or []))
        config.validate()
    except (TypeError, ValueError, ConfigError) as error:
        raise AdapterFormatError(f"adapter_config.json has invalid values: {error}") from None
    return config



def from_hf(model: nn.Module, hf: dict, tensors: dict, name: str, source) -> None:
    """Attach the PSOFT in (``hf``, ``tensors``) to ``model`` as ``name``; ``io.load`` undoes it on error."""
    per_module = module_tensors(tensors, ("psoft_R.weight", "psoft_R.vector_a", "psoft_R.vector_b"), source, "PSOFT",
                                local=LOCAL)
    config = config_from_hf(hf, list(per_module))
    modules = linear_modules(model, per_module, source, "PSOFT")
    config.modules_to_save = present_modules_to_save(config.modules_to_save, modules)
    core.attach(model, config, name=name)
    for module_name, layer in core.adapter_layers(model, name):
        values, adapter = per_module[module_name], layer.adapters[name]
        expected = adapter.state_dict()
        if set(values) != set(expected):
            raise AdapterFormatError(f"{source}: '{module_name}' has tensors {sorted(values)}, but the config (psoft_mag_a="
                                     f"{config.mag_a}, psoft_mag_b={config.mag_b}) implies {sorted(expected)}; the config "
                                     "and weights do not belong together")
        for key, value in values.items():
            if tuple(value.shape) != tuple(expected[key].shape):
                raise AdapterFormatError(f"{source}: '{module_name}.{key}' is {tuple(value.shape)}, but r={config.r}, "
                                         f"psoft_orth={config.orth} and the layer's shape imply "
                                         f"{tuple(expected[key].shape)}; the config and weights do not belong together "
                                         "(or the base is another model)")
        adapter.load_state_dict(values)
