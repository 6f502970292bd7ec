"""LST: Ladder Side-Tuning for Parameter and Memory Efficient Transfer Learning (Sung et al., 2022,
arXiv:2206.06522).

Why: adapters, LoRA and prompts train few parameters, but they sit *inside* the backbone, so
backpropagation still runs through every layer of it and keeps all of its activations: training
memory drops by a third at best. Ladder side tuning moves the trainable part *beside* the backbone:
a small side network reads the frozen backbone's hidden states through "ladder" connections and
produces the final hidden state. The gradient never enters the backbone, so the backbone runs
without building an autograd graph and keeps no activations for backward; the paper reports 69%
less training memory than full fine-tuning on T5 (2.7x less than adapters and LoRA) at a small
accuracy cost.

What (per backbone of L layers with hidden size d; side width d/reduction, ``reduction`` 8 by
default as in the paper): the backbone runs under ``torch.no_grad`` and returns its L+1 hidden
states ``h_0`` (embeddings) .. ``h_L`` (final); then, with ``D_i`` a down-projection (d -> d/r) of
the normalized ``h_i`` and ``mu_i = sigmoid(alpha_i / 0.1)`` a learned gate (``alpha_i`` starts at
0, as in the paper)::

    s_0 = D_0(h_0)
    s_i = block_i(mu_i * D_i(h_i) + (1 - mu_i) * s_{i-1})       i = 1..L
    output = h_L + U(norm(s_L))

``block_i`` is a pre-norm residual feed-forward block of width ``intermediate_size / reduction``,
and ``U`` up-projects to d; the head (LM head, or BERT's pooler and classifier) reads ``output``.

Decisions (differences from the paper):

- Identity at init: the paper initializes the side network from the backbone's weights (pruned
  to the side width) and lets the head read the side network alone. Here the last rung is the
  backbone's own final state, and ``U`` starts at zero, so the model is exactly the base model at
  step 0 (``IDENTITY_AT_INIT``) and training starts from the backbone's predictions, without a
  pruning pass over the backbone's weights.
- Token-wise side blocks: the paper's side blocks are transformer blocks (attention included); here
  they are feed-forward only, since every rung ``h_i`` already mixes the sequence through the
  backbone's attention. Each position's output then depends on that position's hidden states only,
  so the side network needs no KV cache of its own: ``generate`` with the backbone's cache gives
  exactly the outputs of full forwards, and nothing of the model's forward is copied.

It works with any transformers model that returns ``hidden_states`` (``output_hidden_states``):
decoders (Llama) and encoders (BERT, whose pooler is run again on the new final state). The
backbone gets no gradient at all, so nothing that acts through it trains alongside the ladder: an
active adapter with trainable parameters inside the backbone (``lora|ladder``) is a clear error,
and soft prompts or prefixes would get no gradient. Two ladders may be active together (their
outputs add up). Mergeable: no (a separate network, not a weight change).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import MethodConfig
from ..core.model_adapters import backbone
from ..errors import ConfigError, StateError, TargetError

CATEGORY = "additive"
PAPER = "Sung et al., 2022 (arXiv:2206.06522)"
MERGEABLE = False
DEFAULT_LR = 3e-3  # the paper's for T5 on GLUE
INVALID_SETTINGS = ("reduction=0", "reduction=half")
# The registry tests' tiny models with weights at a pretrained scale: the side network acts through the
# head, whose random 0.02-scale weights barely turn a change of the final state into a change of the loss.
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}
GATE_TEMPERATURE = 0.1  # the paper's: mu_i = sigmoid(alpha_i / T)
GRAD_MODES_ATTR = "_peftlab_ladder_grad_modes"  # on the backbone: grad modes to restore after its forward


@dataclass
class LadderConfig(MethodConfig):
    """reduction: the side network is ``reduction`` times narrower than the backbone (hidden size and
    feed-forward width)."""

    method: ClassVar[str] = "ladder"
    reduction: int = 8

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.reduction, int) or isinstance(self.reduction, bool) or self.reduction <= 0:
            raise ConfigError(f"{self.method}: reduction (how many times narrower the side network is) must be a "
                              f"positive integer, got {self.reduction!r}")


# ---- pure math -------------------------------------------------------------------------------

def gate(alpha: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(alpha / GATE_TEMPERATURE)


def rung(hidden: torch.Tensor) -> torch.Tensor:
    """A backbone hidden state as the side network reads it: normalized per token, so that the
    residual stream's growing scale across layers (a pre-norm decoder's) does not swamp the gates."""
    return F.layer_norm(hidden, hidden.shape[-1:])


# ---- modules ---------------------------------------------------------------------------------

class SideBlock(nn.Module):
    """``x + W2 gelu(W1 norm(x))``: the side network's layer."""

    def __init__(self, width: int, ffn: int, factory: dict):
        super().__init__()
        self.norm = nn.LayerNorm(width, **factory)
        self.up = nn.Linear(width, ffn, **factory)
        self.down = nn.Linear(ffn, width, **factory)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class LadderSide(nn.Module):
    """The side network of one adapter, fed by every hidden state of the backbone."""

    def __init__(self, stack: nn.Module, hidden: int, ffn: int, layers: int, reduction: int, factory: dict):
        super().__init__()
        width = hidden // reduction
        self.downs = nn.ModuleList(nn.Linear(hidden, width, bias=False, **factory) for _ in range(layers + 1))
        self.gates = nn.Parameter(torch.zeros(layers, **factory))
        self.blocks = nn.ModuleList(SideBlock(width, max(1, ffn // reduction), factory) for _ in range(layers))
        self.norm = nn.LayerNorm(width, **factory)
        self.up = nn.Linear(width, hidden, bias=False, **factory)
        nn.init.zeros_(self.up.weight)  # the base model at step 0
        self.__dict__["_backbone"] = stack  # a plain reference, not a submodule

    def side(self, states) -> torch.Tensor:
        """What the side network adds to the final hidden state, from the backbone's L+1 states."""
        s = self.downs[0](rung(states[0]))
        for down, block, mu, h in zip(self.downs[1:], self.blocks, gate(self.gates), states[1:]):
            s = block(mu * down(rung(h)) + (1 - mu) * s)
        return self.up(self.norm(s))

    def rewrite_inputs(self, kwargs: dict):
        if torch.is_grad_enabled():
            trainable = [n for n, p in self._backbone.named_parameters() if p.requires_grad]
            if trainable:
                raise StateError(f"ladder side tuning runs the backbone without gradients, but parameters inside it are "
                                 f"trainable ({', '.join(trainable[:3])}{' ...' if len(trainable) > 3 else ''}); attach "
                                 "the ladder as an adapter of its own and make only it active while training it")
        kwargs = dict(kwargs)
        asked = kwargs.get("output_hidden_states")
        kwargs["output_hidden_states"] = True
        run_without_grad(self._backbone)
        return kwargs, asked

    def rewrite_output(self, output, asked):
        if isinstance(output, tuple) or getattr(output, "hidden_states", None) is None:
            raise StateError("ladder side tuning reads the backbone's hidden_states; call the model with "
                             "return_dict=True (the default)")
        states = output.hidden_states
        final = output.last_hidden_state + self.side(states).to(output.last_hidden_state.dtype)
        output.last_hidden_state = final
        if getattr(output, "pooler_output", None) is not None and getattr(self._backbone, "pooler", None) is not None:
            output.pooler_output = self._backbone.pooler(final)  # BERT's head reads the pooled first token
        if not asked:
            output.hidden_states = None
        return output


def run_without_grad(stack: nn.Module) -> None:
    """Turn gradients off until ``stack``'s forward returns (or fails): a hook put on it once, run
    before any other forward hook and also on an exception, restores the mode."""
    modes = stack.__dict__.get(GRAD_MODES_ATTR)
    if modes is None:
        modes = []
        stack.__dict__[GRAD_MODES_ATTR] = modes
        stack.register_forward_hook(_restore_grad_mode, with_kwargs=True, always_call=True, prepend=True)
    modes.append(torch.is_grad_enabled())
    torch.set_grad_enabled(False)


def _restore_grad_mode(stack, args, kwargs, output) -> None:
    modes = stack.__dict__[GRAD_MODES_ATTR]  # one entry per active ladder of this call: the first is the caller's
    if modes:
        torch.set_grad_enabled(modes[0])
        modes.clear()


# ---- method protocol -------------------------------------------------------------------------

Config = LadderConfig


def make_model_adapter(model: nn.Module, config: LadderConfig) -> nn.Module:
    stack = backbone(model)
    settings = getattr(stack, "config", None)
    settings = settings.get_text_config() if hasattr(settings, "get_text_config") else settings
    if settings is None or not all(hasattr(settings, k) for k in ("hidden_size", "num_hidden_layers")):
        raise TargetError(f"ladder side tuning reads every layer's hidden states (output_hidden_states), so it needs a "
                          f"transformers model with hidden_size and num_hidden_layers in its config; "
                          f"{type(stack).__name__} has none")
    hidden = settings.hidden_size
    if hidden // config.reduction < 1:
        raise ConfigError(f"ladder: reduction={config.reduction} leaves no width of a hidden size of {hidden}; "
                          f"use reduction <= {hidden}")
    weight = next(stack.parameters())
    factory = {"device": weight.device, "dtype": weight.dtype if weight.dtype.is_floating_point else torch.float32}
    ffn = getattr(settings, "intermediate_size", None) or 4 * hidden
    return LadderSide(stack, hidden, ffn, settings.num_hidden_layers, config.reduction, factory)
