"""Gradient checkpointing (activation checkpointing) that works with every method.

A training step normally keeps every layer's activations from the forward pass until the backward
pass has used them: for a transformer, a dozen tensors of (tokens x hidden) or more per layer. With
checkpointing, each decoder/encoder layer keeps only its input; its activations are recomputed,
one layer at a time, during the backward pass. Memory falls from O(layers x activations per layer)
to O(layers x hidden + one layer's activations), for about one more forward pass of compute
(Chen et al., 2016, arXiv:1604.06174).

transformers checkpoints its layers itself (``activation_checkpointing_enable``, called
``gradient_checkpointing_enable`` before transformers 5); peftlab turns it on in the
*non-reentrant* form (``use_reentrant=False``), which

- follows gradients into any tensor the layer reads, not only its positional inputs, so a frozen
  embedding under a trainable adapter (LoRA, soft prompts) never meets "element 0 of tensors does
  not require grad", and the input embeddings need not require grad (transformers makes them, for
  the reentrant form; peftlab takes that hook off again, so no gradient is computed for them);
- replays the random streams, so dropout, DiffPruning's gate noise or DyLoRA's rank draw are the
  same in the recomputation as in the forward pass: the gradients equal those without
  checkpointing.

Adapters in the layers are recomputed with their layer, so module-wrapping methods need nothing
more. Prefixes (prefix tuning, P-tuning v2, MAM, UniPELT) reach the attention through the KV cache,
which checkpointed layers drop; ``methods/prompting.py`` passes them in a cache that the layers may
keep (``PrefixOnlyCache``). The training loop turns this on with ``TrainConfig(gradient_checkpointing=True)``
(CLI: ``--gradient-checkpointing``) for the run only.
"""
from __future__ import annotations

import contextlib
import warnings

from torch import nn

from ..errors import ConfigError

KWARGS = {"use_reentrant": False}


def checkpointable(model: nn.Module):
    """The transformers model inside ``model`` (the model itself, or the first one it wraps)
    whose layers can be checkpointed."""
    for module in model.modules():
        if getattr(module, "supports_gradient_checkpointing", False) and hasattr(module, "gradient_checkpointing_enable"):
            return module
    raise ConfigError(f"gradient checkpointing needs a transformers model whose layers support it "
                      f"(supports_gradient_checkpointing); {type(model).__name__} has none: train without "
                      "gradient_checkpointing")


def is_enabled(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in checkpointable(model).modules())


def enable(model: nn.Module) -> None:
    """Checkpoint every layer of ``model`` (non-reentrant) from now on."""
    target = checkpointable(model)
    had_input_grads = bool(getattr(target, "_require_grads_hooks", None) or getattr(target, "_require_grads_hook", None))
    with warnings.catch_warnings():  # transformers 5 renamed it and warns on the old name
        warnings.simplefilter("ignore", FutureWarning)
        if hasattr(target, "activation_checkpointing_enable"):
            target.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(KWARGS))
        else:
            target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(KWARGS))
    if not had_input_grads and hasattr(target, "disable_input_require_grads"):
        target.disable_input_require_grads()  # only the reentrant form needs inputs that require grad


def disable(model: nn.Module) -> None:
    target = checkpointable(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if hasattr(target, "activation_checkpointing_disable"):
            target.activation_checkpointing_disable()
        else:
            target.gradient_checkpointing_disable()


@contextlib.contextmanager
def gradient_checkpointing(model: nn.Module, on: bool = True):
    """Inside this block ``model`` checkpoints its layers (when ``on``); afterwards it is as before."""
    if not on or is_enabled(model):
        yield model
        return
    enable(model)
    try:
        yield model
    finally:
        disable(model)
