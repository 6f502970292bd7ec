"""The one wrapper every module-wrapping method shares.

``AdapterLayer`` replaces a module (a Linear, an Embedding, a norm, a whole attention or MLP
block) in its parent, keeps the original as ``base_layer`` and holds any number of named
adapters. An adapter is a small ``nn.Module`` whose ``forward(x, base_out)`` returns what to add
to the base output (see the note above ``main_input``). The active-adapter loop, disabling,
routing and merge bookkeeping live here once, not in each method.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import StateError


class AdapterLayer(nn.Module):
    def __init__(self, base_layer: nn.Module, state):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        object.__setattr__(self, "_state", state)  # shared, not a submodule

    def __getattr__(self, name):
        # Let model code read the wrapped module's attributes (``.weight``, ``.in_features``).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "adapters"):
                raise
            return getattr(self.base_layer, name)

    def forward(self, *args, **kwargs):
        state = self._state
        adapters = self.adapters
        x = main_input(args, kwargs)
        if state.disabled:
            if any(n in adapters for n in state.merged):
                raise StateError(f"adapters {state.merged} are merged into the weights; peftlab.unmerge them before disabling")
            out = self.base_layer(*args, **kwargs)
            return self._restore_base(x, out, adapters.keys())
        routing = state.routing
        if routing is None:
            active = [n for n in state.active if n in adapters and n not in state.merged and not _skipped(adapters[n])]
            if (len(active) == 1 and len(args) == 1 and not kwargs and not _has_hooks(self.base_layer)
                    and not torch.is_autocast_enabled(x.device.type)):  # fused paths compute in one dtype
                fused = getattr(adapters[active[0]], "fused_forward", None)
                if fused is not None:
                    out = fused(self.base_layer, x)
                    if out is not None:
                        others = [n for n in adapters.keys() if n != active[0] and n not in state.merged]
                        return self._restore_base(x, out, others)
            out = self.base_layer(*args, **kwargs)
            for name in active:
                out = _add(out, _call(adapters[name], x, out, args, kwargs))
            inactive = [n for n in adapters.keys() if n not in active and n not in state.merged]
            return self._restore_base(x, out, inactive)
        return self._routed_forward(x, args, kwargs, routing)

    def _routed_forward(self, x, args, kwargs, routing):
        state = self._state
        if any(n in self.adapters for n in state.merged):
            raise StateError(f"adapters {state.merged} are merged into the weights; unmerge them before routing rows to adapters")
        if x.shape[0] != routing.rows:
            raise StateError(
                f"routing names {routing.rows} rows but the batch has {x.shape[0]}; give one adapter (or None) per row "
                "(beam search and num_return_sequences > 1 change the batch size and are not supported with routing)"
            )
        sliced = self._sliced_forward(x, args, kwargs, routing)
        if sliced is not None:
            return sliced
        base_out = self.base_layer(*args, **kwargs)
        out = _first(base_out)
        segments = routing.segments(x.device)
        # Every adapter sees the base output, exactly as when it runs alone (set_active), whatever
        # the order the adapters were attached in; base corrections (PiSSA) come after.
        for name, adapter in self.adapters.items():
            rows = segments.get(name)
            if rows is None or _skipped(adapter):
                continue
            if getattr(adapter, "wants_call", False):
                raise StateError(f"adapter {name!r} ({type(adapter).__name__}) reads its layer's other inputs and cannot "
                                 "be routed per row; run it alone with set_active")
            if len(rows) == routing.rows:
                out = out + adapter(x, base_out)
            else:
                out = out.index_add(0, rows, adapter(x.index_select(0, rows), _select_rows(base_out, rows)))
        for name, adapter in self.adapters.items():
            if getattr(adapter, "alters_base", False):  # adapters that changed the base restore it on other rows
                rows = segments.get(name)
                if rows is None:
                    out = out + adapter.inactive_delta(x)
                elif len(rows) != routing.rows:
                    correction = adapter.inactive_delta(x)
                    out = out + correction.index_fill(0, rows, 0)
        return _replace_first(base_out, out)

    def _sliced_forward(self, x, args, kwargs, routing):
        """Rows grouped in runs (``Routing.spans``) whose adapters have a fused kernel: each run is a
        slice of the batch through its adapter's fused layer (the kernel it runs alone), outputs
        concatenated once. No gathered copies of the batch and no scattered sums: training many
        adapters in one batch keeps what one adapter's training keeps. None where it does not apply."""
        if (routing.spans is None or len(args) != 1 or kwargs or _has_hooks(self.base_layer)
                or torch.is_autocast_enabled(x.device.type)):
            return None
        if any(getattr(a, "alters_base", False) or _skipped(a) for a in self.adapters.values()):
            return None
        outs = []
        # one split, not slices: its backward concatenates the runs' input gradients once, where each
        # slice's backward would write its gradient into a zero tensor of the whole batch
        pieces = x.split([stop - start for _, start, stop in routing.spans]) if len(routing.spans) > 1 else (x,)
        for (name, _, _), rows in zip(routing.spans, pieces):
            adapter = self.adapters[name] if name is not None and name in self.adapters else None
            if adapter is None:
                outs.append(self.base_layer(rows))
                continue
            fused = getattr(adapter, "fused_forward", None)
            out = fused(self.base_layer, rows) if fused is not None else None
            if out is None:
                return None
            outs.append(out)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def _restore_base(self, x, out, names):
        for name in names:
            adapter = self.adapters[name]
            if getattr(adapter, "alters_base", False):
                out = _add(out, adapter.inactive_delta(x))
        return out

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters.keys())}"


# An adapter's ``forward(x, base_out)`` returns what to add to the wrapped module's output. ``x``
# is the module's main input (its first positional argument, or the keyword a model passes it
# as); ``base_out`` is the module's output, a tensor or, for modules that return a tuple (an
# attention block's ``(hidden, weights)``), that tuple, whose first element the delta is added to.
# An adapter with ``wants_call = True`` also receives the call's ``args`` and ``kwargs`` (e.g. the
# rotary position embeddings an attention block is given). An adapter whose ``skipped`` is true
# right now is not called at all (AdapterDrop: adapters of the lowest layers cost nothing).
MAIN_INPUT_NAMES = ("hidden_states", "input", "x", "input_ids", "inputs_embeds")


def main_input(args, kwargs):
    if args:
        return args[0]
    for key in MAIN_INPUT_NAMES:
        if key in kwargs:
            return kwargs[key]
    raise StateError(f"a wrapped module was called without a tensor input (keywords: {sorted(kwargs)})")


def _skipped(adapter) -> bool:
    # looked up on the class first: a miss on an nn.Module instance goes through its slow __getattr__
    return getattr(type(adapter), "skipped", None) is not None and adapter.skipped


def _call(adapter, x, base_out, args, kwargs):
    if getattr(adapter, "wants_call", False):
        return adapter(x, base_out, args, kwargs)
    return adapter(x, base_out)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _add(out, delta):
    return (out[0] + delta, *out[1:]) if isinstance(out, tuple) else out + delta


def _replace_first(out, first):
    return (first, *out[1:]) if isinstance(out, tuple) else first


def _select_rows(out, rows):
    return tuple(o.index_select(0, rows) if torch.is_tensor(o) and o.dim() > 0 else o for o in out) \
        if isinstance(out, tuple) else out.index_select(0, rows)


def _has_hooks(module: nn.Module) -> bool:
    """A fused path computes the base layer's output without calling it, which would skip hooks
    registered on it (activation capture, device-offload hooks, ...); use it only when there are none."""
    from torch.nn.modules import module as torch_module

    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None)
                or torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                or torch_module._global_backward_hooks or getattr(torch_module, "_global_backward_pre_hooks", None))
