"""A gated mixture of frozen adapters: a small trained gate weighs K frozen LoRA experts per token.

Adapters trained on different tasks each know something; a static merge (``combine``, LoRAHub)
gives every token the same combination. A gated mixture chooses per token: at every adapted layer
the output is

    base(x) + Σ_k g_k · s_k B_k A_k x,        g = softmax(gate logits / temperature)

with the experts frozen and only the gate trained. Two definitions of the gate are here:

- ``gate="xlora"``: X-LoRA (Buehler & Buehler, 2024, "X-LoRA: Mixture of Low-Rank Adapter Experts",
  arXiv:2402.07148). A first forward pass with the experts off gives the final hidden state of each
  token; a classifier on it (a linear layer, or an MLP with ``hidden=``) gives per-token weights
  that every adapted layer uses in the second, real pass (``hidden=n``: Linear, ReLU, Linear, as
  X-LoRA's ``xlora_depth=2``, without its dropout). This is HF PEFT's ``XLoraModel`` with
  its defaults (softmax on, ``scaling_pass_value=0`` so the first pass is the base model, the same
  scalings broadcast to every layer, ``global_scaling_weight=1``); a test checks the two give the
  same logits. As there, generation needs ``use_cache=False``: each step's gate reads the whole
  sequence's base hidden states.
- ``gate="layer"``: the router of mixture-of-LoRA-experts layers (MoLE, Wu et al., 2024,
  arXiv:2404.13628; LoRAMoE, Dou et al., 2024, arXiv:2312.09979): each adapted layer has its own
  linear gate on that layer's input ``x``. One forward pass, and each layer can choose differently.

Scaling an expert's output by ``g_k`` is the same as X-LoRA's scaling of its input (the LoRA path
is linear), so any module-wrapping expert whose output the layer adds works (LoRA and its
variants, bottleneck adapters). The gates start at zero (every expert weighted 1/K) for ``layer``;
the X-LoRA classifier starts as ``nn.Linear`` does, as in HF PEFT.

The mixture is a plain ``nn.Module`` holding only the gate (``mixture.parameters()`` is what
trains); it works through hooks on the model's adapter layers, so it copies no forward and leaves
the experts' modules untouched. ``mixture.remove()`` takes the hooks off again. Routing rows to
adapters (``peftlab.routing``) does not combine with a mixture, which applies to every row.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..core.layer import main_input
from ..errors import ConfigError, StateError

GATES = ("xlora", "layer")
FILE = "mixture.json"
WEIGHTS = "gate.safetensors"
CACHE_KEYS = ("past_key_values", "cache")  # the KV cache argument, by its old and new names in transformers


class Mixture(nn.Module):
    """The gate of a mixture over ``experts`` (adapter names) on ``model``; see the module docstring."""

    def __init__(self, model: nn.Module, experts: list[str], gate: str = "xlora", hidden: int | None = None,
                 temperature: float = 1.0):
        super().__init__()
        from ..core.state import require_state

        check_arguments(model, experts, gate, hidden, temperature)
        self.__dict__["model"] = model  # references, not submodules: the gate's parameters are its own
        self.__dict__["state"] = require_state(model)
        self.experts, self.kind, self.hidden, self.temperature = list(experts), gate, hidden, temperature
        self.layers = expert_layers(model, self.experts)
        like = next(self.layers[0][1].base_layer.parameters())
        if gate == "xlora":
            width = _hidden_size(model)
            self.classifier = _classifier(width, len(experts), hidden, like)
        else:
            self.gates = nn.ModuleList([_zero_linear(_in_width(layer.base_layer), len(experts), like)
                                        for _, layer in self.layers])
        self._weights = {}  # layer index (or "all" for X-LoRA) -> the current forward's (..., K) weights
        self._handles = []
        self._previous = None
        self._in_scaling_pass = False
        self.install()

    # ---- on and off ------------------------------------------------------------------------

    def install(self) -> None:
        """Activate the experts (frozen) and put the gate's hooks on the model."""
        import peftlab
        from ..core.adapters import all_adapters
        from ..core.model_adapters import backbone

        if self._handles:
            return
        self._previous = list(self.state.active)
        peftlab.set_active(self.model, self.experts)
        for name in self.experts:
            for _, adapter in all_adapters(self.model, name):
                for p in adapter.parameters():
                    p.requires_grad_(False)
        for index, (_, layer) in enumerate(self.layers):
            # a hook on the base layer also keeps the layer off its fused one-adapter path, which would skip the experts' hooks
            self._handles.append(layer.base_layer.register_forward_pre_hook(self._layer_gate(index), with_kwargs=True))
            for k, name in enumerate(self.experts):
                if name in layer.adapters:
                    self._handles.append(layer.adapters[name].register_forward_hook(self._scale(index, k)))
        if self.kind == "xlora":
            self._handles.append(backbone(self.model).register_forward_pre_hook(self._scaling_pass, with_kwargs=True))

    def remove(self) -> None:
        """Take the hooks off; the previously active adapters are active again."""
        import peftlab

        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._weights.clear()
        if self._previous is not None:
            peftlab.set_active(self.model, self._previous)

    # ---- the gate --------------------------------------------------------------------------

    def gate_weights(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits / self.temperature, dim=-1)

    def latest_weights(self) -> torch.Tensor | None:
        """The last forward's per-token expert weights: (batch, seq, K) for X-LoRA; for ``layer``
        gates, stacked over the layers as (layers, batch, seq, K)."""
        if self.kind == "xlora":
            return self._weights.get("all")
        found = [self._weights[i] for i in range(len(self.layers)) if i in self._weights]
        return torch.stack(found) if found and all(w.shape == found[0].shape for w in found) else None

    def _layer_gate(self, index: int):
        def hook(module, args, kwargs):
            if self.kind == "layer" and not self._in_scaling_pass and not self.state.disabled:
                x = main_input(args, kwargs)
                self._weights[index] = self.gate_weights(self.gates[index](x.to(self.gates[index].weight.dtype)))
        return hook

    def _scale(self, index: int, k: int):
        def hook(module, args, out):
            if self.state.routing is not None:
                raise StateError("a mixture weighs its experts on every row; it cannot run inside peftlab.routing")
            weights = self._weights.get("all" if self.kind == "xlora" else index)
            if weights is None:
                raise StateError("the mixture's gate has not run for this forward; call the model itself "
                                 "(not a submodule) so the gate sees its inputs")
            if weights.shape[:-1] != out.shape[:-1]:
                raise StateError(f"the gate's weights cover {tuple(weights.shape[:-1])} tokens but the layer's output "
                                 f"{tuple(out.shape[:-1])}; call the model itself, once per batch")
            return out * weights[..., k:k + 1].to(out.dtype)
        return hook

    def _scaling_pass(self, module, args, kwargs):
        """X-LoRA's first pass: the base model's final hidden states -> per-token expert weights."""
        import peftlab

        if self._in_scaling_pass or self.state.disabled:
            return None
        caches = [key for key in CACHE_KEYS if kwargs.get(key) is not None]
        if any(getattr(kwargs[key], "get_seq_length", lambda: 0)() > 0 for key in caches):
            raise StateError("an X-LoRA gate reads the whole sequence's base hidden states at every step; "
                             "generate with use_cache=False")
        self._in_scaling_pass = True
        try:
            with torch.no_grad(), peftlab.disabled(self.model):
                scaling_kwargs = {**kwargs, **{key: None for key in caches}, "use_cache": False}
                hidden = module(*args, **scaling_kwargs)[0]
        finally:
            self._in_scaling_pass = False
        self._weights["all"] = self.gate_weights(self.classifier(hidden.to(self.classifier[0].weight.dtype)))
        return None

    # ---- training and files ----------------------------------------------------------------

    def fit(self, batches, steps: int = 100, lr: float = 1e-2, loss_fn=None) -> list[float]:
        """Train the gate alone (AdamW) on ``batches`` (dicts with labels), cycling through them;
        returns the loss of every step."""
        if not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"steps must be a positive integer, got {steps!r}")
        batches = list(batches)
        if not batches:
            raise ConfigError("fit needs at least one batch (a dict of model inputs with labels)")
        loss_fn = loss_fn or (lambda model, batch: model(**batch).loss)
        optimizer = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=0.0)
        device = next(self.parameters()).device
        losses = []
        for step in range(steps):
            batch = {k: torch.as_tensor(v).to(device) for k, v in batches[step % len(batches)].items()}
            loss = loss_fn(self.model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        return losses

    def save(self, out_dir) -> Path:
        """Write the gate (``gate.safetensors``) and what it mixes (``mixture.json``); the experts are
        saved on their own (``peftlab.save``)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(out / WEIGHTS))
        info = {"experts": self.experts, "gate": self.kind, "hidden": self.hidden, "temperature": self.temperature,
                "layers": [name for name, _ in self.layers]}
        (out / FILE).write_text(json.dumps(info, indent=2) + "\n")
        return out


def mixture(model: nn.Module, experts: list[str], gate: str = "xlora", hidden: int | None = None,
            temperature: float = 1.0) -> Mixture:
    """A gated mixture over the attached adapters ``experts`` (at least two), installed on ``model``:
    from now on every forward weighs the experts per token. Train it with ``mixture.fit(batches)`` or
    any loop over ``mixture.parameters()``."""
    return Mixture(model, experts, gate, hidden, temperature)


def load_mixture(model: nn.Module, folder) -> Mixture:
    """The mixture saved in ``folder`` installed on ``model``, whose experts must be attached (or
    loaded) under the names it was saved with."""
    from safetensors.torch import load_file

    path = Path(folder) / FILE
    if not path.is_file():
        raise ConfigError(f"{folder} holds no {FILE}; save a mixture there with mixture.save(folder)")
    info = json.loads(path.read_text())
    mix = Mixture(model, info["experts"], info["gate"], info.get("hidden"), info.get("temperature", 1.0))
    layers = [name for name, _ in mix.layers]
    if layers != info.get("layers", layers):
        mix.remove()
        raise ConfigError(f"the mixture in {folder} has gates for {len(info['layers'])} layers, but its experts sit at "
                          f"{len(layers)} here; load the same expert adapters it was trained with")
    mix.load_state_dict(load_file(str(Path(folder) / WEIGHTS)))
    return mix


# ---- checks and parts ----------------------------------------------------------------------------

def check_arguments(model, experts, gate, hidden, temperature) -> None:
    from ..core.state import require_state

    if gate not in GATES:
        raise ConfigError(f"gate must be 'xlora' (a classifier on the base model's hidden states, as X-LoRA) or 'layer' "
                          f"(a gate per adapted layer on its input), got {gate!r}")
    if isinstance(experts, str) or len(experts) < 2:
        raise ConfigError(f"a mixture weighs at least two expert adapters, given as a list of names; got {experts!r}")
    if len(set(experts)) != len(experts):
        raise ConfigError(f"the experts list an adapter twice: {experts}")
    if hidden is not None and (not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1):
        raise ConfigError(f"hidden (the width of the gate's MLP; None for a linear gate) must be a positive integer, "
                          f"got {hidden!r}")
    if gate == "layer" and hidden is not None:
        raise ConfigError("hidden sets the X-LoRA classifier's MLP width; the per-layer gates are linear: leave hidden unset")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ConfigError(f"temperature must be a positive number, got {temperature!r}")
    state = require_state(model)
    state.check_known(experts)
    merged = [n for n in experts if n in state.merged]
    if merged:
        raise StateError(f"experts {merged} are merged into the base weights; unmerge them before mixing them")


def expert_layers(model: nn.Module, experts: list[str]) -> list:
    """``(module name, AdapterLayer)`` of every layer where an expert sits, in module order."""
    from ..core import model_adapters
    from ..core.adapters import adapter_layers

    for name in experts:
        if any(True for _ in model_adapters.model_adapters(model, name)):
            raise ConfigError(f"expert {name!r} has a soft prompt or prefix, which acts on the whole input and cannot be "
                              "weighed per layer output; mix module-wrapping adapters (LoRA, its variants, bottleneck adapters)")
    layers = [(module_name, layer) for module_name, layer in adapter_layers(model)
              if any(name in layer.adapters for name in experts)]
    if not layers:
        raise ConfigError(f"the experts {experts} wrap no module; mix module-wrapping adapters (LoRA, bottleneck adapters)")
    for module_name, layer in layers:
        for name in experts:
            adapter = layer.adapters[name] if name in layer.adapters else None
            if adapter is not None and (getattr(adapter, "alters_base", False) or getattr(adapter, "wants_call", False)):
                raise ConfigError(f"expert {name!r} at {module_name} ({type(adapter).__name__}) changes the base layer or reads "
                                  "its other inputs, so its output cannot simply be weighed; save it as a plain LoRA "
                                  "(PiSSA is saved so) and load that")
    return layers


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(config, "hidden_size", None)
    if not isinstance(size, int):
        raise ConfigError("gate='xlora' reads the model's final hidden states and needs config.hidden_size; "
                          "use gate='layer' for a model without one")
    return size


def _in_width(base: nn.Module) -> int:
    from ..methods.lora import base_weight

    if isinstance(base, nn.Embedding):
        raise ConfigError("a per-layer gate reads the layer's input vectors, but an embedding's input is token ids; "
                          "leave embeddings out of the experts' targets or use gate='xlora'")
    try:
        return base_weight(base).shape[1]
    except AttributeError:
        raise ConfigError(f"a per-layer gate needs the input width of {type(base).__name__}; "
                          "use gate='xlora' for experts on such modules") from None


def _zero_linear(width: int, count: int, like: torch.Tensor) -> nn.Linear:
    dtype = like.dtype if like.dtype.is_floating_point else torch.float32
    gate = nn.Linear(width, count, device=like.device, dtype=dtype)
    nn.init.zeros_(gate.weight)
    nn.init.zeros_(gate.bias)
    return gate


def _classifier(width: int, count: int, hidden: int | None, like: torch.Tensor) -> nn.Sequential:
    dtype = like.dtype if like.dtype.is_floating_point else torch.float32
    factory = {"device": like.device, "dtype": dtype}
    if hidden is None:
        return nn.Sequential(nn.Linear(width, count, **factory))
    return nn.Sequential(nn.Linear(width, hidden, **factory), nn.ReLU(), nn.Linear(hidden, count, **factory))
