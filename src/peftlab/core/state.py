"""The per-model adapter state that every wrapped layer reads.

One ``AdapterState`` object is shared by every ``AdapterLayer`` of a model, so switching the
active adapter, disabling all adapters, or routing rows to adapters is a single assignment
here instead of a walk over the model's layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .routing import Routing

STATE_ATTR = "_peftlab_state"


@dataclass
class AdapterState:
    configs: dict = field(default_factory=dict)  # adapter name -> list of MethodConfig
    active: list = field(default_factory=list)  # names applied to every row, in order
    disabled: bool = False  # True inside peftlab.disabled(): the exact base model
    routing: Routing | None = None  # set inside peftlab.routing(): one adapter per batch row
    merged: list = field(default_factory=list)  # names whose weights are folded into the base
    base_name: str | None = None  # name or path of the base model, recorded on save
    composition: object = None  # a compose.blocks composition while one is installed
    task_ids: object = None  # set inside peftlab.task_ids(): each row's task (Poly, multitask prompts)

    def check_known(self, names) -> None:
        from ..errors import ConfigError

        for name in names:
            if name is not None and name not in self.configs:
                raise ConfigError(f"no adapter named {name!r}; this model has {sorted(self.configs) or 'none'}")


def get_state(model, *, create: bool = False) -> AdapterState | None:
    state = getattr(model, STATE_ATTR, None)
    if state is None and create:
        state = AdapterState()
        object.__setattr__(model, STATE_ATTR, state)
    return state


def require_state(model) -> AdapterState:
    from ..errors import StateError

    state = get_state(model)
    if state is None or not state.configs:
        raise StateError("this model has no peftlab adapters; call peftlab.attach(model, 'lora[r=16]') or peftlab.load first")
    return state
