"""Composition blocks: how the input flows through several adapters, in AdapterHub's sense.

AdapterHub (Pfeiffer et al., 2020, "AdapterHub: A Framework for Adapting Transformers",
arXiv:2007.07779; its "Adapter Activation and Composition" documentation) activates adapters
through composition blocks; the ones for module-wrapping adapters are here, with its semantics,
at every layer that holds any of the named adapters:

- ``Stack("a", "b", "c")``: the layer's output goes through ``a``, ``a``'s output into ``b``, and
  ``b``'s into ``c`` (MAD-X's language adapter under a task adapter, Pfeiffer et al., 2020,
  arXiv:2005.00052). A serial bottleneck adapter reads the running output; a LoRA reads the layer's
  input, so stacked LoRAs add up.
- ``Average("a", "b", weights=[0.2, 0.8])``: the weighted average of the layer's outputs with each
  child alone (Wang et al., 2021, arXiv:2109.04877); weights are normalized to sum to 1 unless
  ``normalize=False``, and default to uniform. Where the weights sum to 1 this is the base output
  plus ``Σ w_i δ_i``. (AdapterHub's own bottleneck layer takes ``torch.mean`` of the weighted
  stack, which divides by the number of adapters once more; this follows its documentation.)
- ``BatchSplit("a", "b", batch_sizes=[2, 1])``: the first two rows of the batch through ``a``, the
  next one through ``b``; an int gives every child that many rows. For plain adapter names this is
  what ``peftlab.routing`` does (a test checks they agree); here the children may be blocks.
- ``Parallel("a", "b")``: the batch is replicated once per child and each copy runs through its own
  child (AdapterDrop's parallel inference, Rücklé et al., 2021, arXiv:2010.11918), so the model's
  outputs have ``n x batch`` rows, child ``k``'s being rows ``k*batch`` to ``(k+1)*batch``.
  AdapterHub replicates at the first adapted layer; here the model's tensor inputs are replicated
  as it is called (the layers below the first adapter compute the same either way), so attention
  masks, positions and labels stay aligned without copying any forward. ``Parallel`` is the
  outermost block, and does not combine with ``generate``.

Blocks nest (``Stack("lang", Average("t1", "t2"))``). An adapter that does not sit at a layer leaves
that layer's output as it is there; an adapter that AdapterDrop skips does too. ``activate(model,
block, train=[...])`` installs a composition (hooks on the adapter layers; no forward is copied);
the named adapters in ``train`` train, every other adapter is frozen; ``remove()`` (or leaving the
``with`` block) restores the previously active adapters.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.layer import main_input
from ..errors import ConfigError, StateError


class Block:
    """A composition of adapter names and nested blocks."""

    def __init__(self, *children):
        if len(children) == 1 and isinstance(children[0], (list, tuple)):
            children = tuple(children[0])
        if not children:
            raise ConfigError(f"{type(self).__name__} needs at least one adapter name or block")
        for child in children:
            if not (isinstance(child, Block) or (isinstance(child, str) and child)):
                raise ConfigError(f"{type(self).__name__} takes adapter names and blocks, got {child!r}")
            if isinstance(child, Parallel):
                raise ConfigError("Parallel replicates the whole batch, so it must be the outermost block; "
                                  f"put it around the others, e.g. Parallel(Stack(...), ...), not inside {type(self).__name__}")
        self.children = list(children)

    def names(self) -> list[str]:
        """Every adapter name in this block, depth first."""
        out = []
        for child in self.children:
            out += [child] if isinstance(child, str) else child.names()
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.children))})"


class Stack(Block):
    """Each child's output is the next child's input."""


class Average(Block):
    """The weighted average of the outputs of the children, each applied to the same input."""

    def __init__(self, *children, weights=None, normalize: bool = True):
        super().__init__(*children)
        count = len(self.children)
        if weights is None:
            weights = [1.0 / count] * count
        if not isinstance(weights, (list, tuple)) or len(weights) != count or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
            raise ConfigError(f"Average needs one number per child ({count}) as weights, got {weights!r}")
        if normalize:
            total = float(sum(weights))
            if total == 0:
                raise ConfigError(f"Average's weights {list(weights)} sum to 0 and cannot be normalized; "
                                  "pass normalize=False to use them as they are")
            weights = [w / total for w in weights]
        self.weights = [float(w) for w in weights]


class BatchSplit(Block):
    """Consecutive slices of the batch, one per child (``batch_sizes``: a list, or one int for all)."""

    def __init__(self, *children, batch_sizes):
        super().__init__(*children)
        sizes = [batch_sizes] * len(self.children) if isinstance(batch_sizes, int) else batch_sizes
        if (not isinstance(sizes, (list, tuple)) or len(sizes) != len(self.children)
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sizes)):
            raise ConfigError(f"BatchSplit needs batch_sizes: one row count (an int >= 0) per child "
                              f"({len(self.children)}), or one int for all; got {batch_sizes!r}")
        self.batch_sizes = list(sizes)


class Parallel(Block):
    """The batch replicated once per child, each copy through its own child (outermost block only)."""


# ---- installing a composition ------------------------------------------------------------------

CACHE_KEYS = ("past_key_values", "cache")


class Composition:
    """An installed block; ``remove()`` (or the end of a ``with`` block) takes it off."""

    def __init__(self, model: nn.Module, block: Block, train=()):
        from ..core.state import require_state

        if isinstance(block, str):
            block = Stack(block)
        if not isinstance(block, Block):
            raise ConfigError(f"activate takes a composition block (Stack, Average, BatchSplit, Parallel), got {block!r}")
        self.model, self.block, self.state = model, block, require_state(model)
        names = block.names()
        train = [train] if isinstance(train, str) else list(train)
        check_members(model, names, self.state)
        strays = [n for n in train if n not in names]
        if strays:
            raise ConfigError(f"train names {strays}, which are not in the block {block!r}; train adapters of the block")
        if self.state.composition is not None:
            raise StateError(f"{self.state.composition.block!r} is already active on this model; remove() it first")
        self.previous = list(self.state.active)
        self.handles = []
        self._install(names, train)
        self.state.composition = self  # set_active refuses until remove()

    def _install(self, names: list[str], train: list[str]) -> None:
        import peftlab
        from ..core.adapters import adapter_layers, all_adapters

        peftlab.set_active(self.model, [])  # the layers compute the base output; the hooks compose the rest
        for name in train:
            for _, adapter in all_adapters(self.model, name):
                for p in adapter.parameters():
                    p.requires_grad_(getattr(p, "peftlab_trainable", True))
        for _, layer in adapter_layers(self.model):
            if any(name in layer.adapters for name in names):
                self.handles.append(layer.register_forward_hook(self._compose, with_kwargs=True))
        if isinstance(self.block, Parallel):
            self.handles.append(self.model.register_forward_pre_hook(self._replicate, with_kwargs=True))

    def remove(self) -> None:
        import peftlab

        for handle in self.handles:
            handle.remove()
        if self.handles:
            self.handles.clear()
            self.state.composition = None
            peftlab.set_active(self.model, self.previous)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def _compose(self, layer, args, kwargs, output):
        if self.state.disabled:
            return None
        if self.state.routing is not None:
            raise StateError(f"a composition block ({self.block!r}) decides which adapter each row gets; "
                             "it does not combine with peftlab.routing: remove() it first, or use BatchSplit")
        x = main_input(args, kwargs)
        h = output[0] if isinstance(output, tuple) else output
        h = apply(self.block, layer, x, h)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    def _replicate(self, module, args, kwargs):
        if any(getattr(kwargs.get(k), "get_seq_length", lambda: 0)() > 0 for k in CACHE_KEYS):
            raise StateError("Parallel replicates the batch at every call and cannot continue a cached generation; "
                             "run one forward per step (use_cache=False) or use BatchSplit on a batch you replicated")
        first = next((v for v in (*args, *kwargs.values()) if torch.is_tensor(v) and v.dim() > 1), None)
        if first is None:
            return None
        rows, copies = first.shape[0], len(self.block.children)

        def repeat(value, key=None):
            # per-row tensors: (batch, ...) of 2 or more dimensions, and a classifier's (batch,) labels;
            # not 1-D per-position ones such as cache_position, whose length may equal the batch's by chance
            per_row = torch.is_tensor(value) and (value.dim() > 1 or key == "labels") and value.shape[0] == rows
            return value.repeat(copies, *([1] * (value.dim() - 1))) if per_row else value

        return tuple(repeat(a) for a in args), {k: repeat(v, k) for k, v in kwargs.items()}


def activate(model: nn.Module, block, train=()) -> Composition:
    """Route every forward of ``model`` through ``block`` (see the module docstring) until the
    returned composition is removed; the adapters named in ``train`` train, the others are frozen."""
    return Composition(model, block, train)


def apply(block, layer, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The layer's output after ``block``, from its input ``x`` and its output so far ``h``."""
    if isinstance(block, str):
        adapter = layer.adapters[block] if block in layer.adapters else None
        if adapter is None or (getattr(type(adapter), "skipped", None) is not None and adapter.skipped):
            return h
        return h + adapter(x, h)
    if isinstance(block, Stack):
        for child in block.children:
            h = apply(child, layer, x, h)
        return h
    if isinstance(block, Average):
        outputs = [w * apply(child, layer, x, h) for child, w in zip(block.children, block.weights)]
        return sum(outputs[1:], outputs[0])
    sizes = block.batch_sizes if isinstance(block, BatchSplit) else _equal_parts(h.shape[0], len(block.children))
    if sum(sizes) != h.shape[0] or x.shape[0] != h.shape[0]:
        raise StateError(f"{type(block).__name__} splits {sum(sizes)} rows ({sizes}) but the batch has {h.shape[0]}; "
                         "give batch_sizes that add up to the batch size")
    parts = [apply(child, layer, xs, hs) for child, xs, hs in zip(block.children, x.split(sizes), h.split(sizes))]
    return torch.cat(parts, dim=0)


def _equal_parts(rows: int, count: int) -> list[int]:
    if rows % count:
        raise StateError(f"Parallel over {count} children needs a batch of {count} equal copies, got {rows} rows; "
                         "call the model itself (it replicates the batch), not one of its layers")
    return [rows // count] * count


def check_members(model: nn.Module, names: list[str], state) -> None:
    from ..core import model_adapters
    from ..core.adapters import adapter_layers

    state.check_known(names)
    merged = [n for n in names if n in state.merged]
    if merged:
        raise StateError(f"adapters {merged} are merged into the base weights; unmerge them before composing them")
    for name in names:
        if any(True for _ in model_adapters.model_adapters(model, name)):
            raise ConfigError(f"{name!r} has a soft prompt or prefix, which rewrites the model's input rather than a layer's "
                              "output; composition blocks take module-wrapping adapters (bottleneck adapters, LoRA, ...)")
    for module_name, layer in adapter_layers(model):
        for name in names:
            adapter = layer.adapters[name] if name in layer.adapters else None
            if adapter is not None and (getattr(adapter, "alters_base", False) or getattr(adapter, "wants_call", False)):
                raise ConfigError(f"{name!r} at {module_name} ({type(adapter).__name__}) changes the base layer or reads its "
                                  "other inputs, so it cannot be composed from the layer's output; save it as a plain "
                                  "adapter (PiSSA is saved as plain LoRA) and load that")
