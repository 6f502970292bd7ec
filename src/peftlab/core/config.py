"""Method configs as dataclasses, and the short spec-string form that composes them.

A spec string names one or more methods with their settings::

    "lora[r=16,alpha=32,targets=all-linear]|dora[r=8,targets=[q_proj,v_proj]]"

Values are parsed as int, float, bool (true/false), none, a bracketed list, or a
string (quote it with '...' or "..." when it holds commas or brackets, e.g. a regex).
"""
from __future__ import annotations

import dataclasses
import difflib
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import ConfigError


@dataclass
class MethodConfig:
    """Settings every method shares: where it attaches and what else trains.

    targets: module-name suffixes (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``),
        a regex matched against the full module name (``"re:.*\\.(q|v)_proj"``),
        or ``"all-linear"`` (every linear layer except the output head).
    exclude: names or regexes (``re:``) of modules never to wrap.
    layers: only wrap modules inside these transformer block indices.
    modules_to_save: modules (by suffix) trained in full and saved with the adapter,
        e.g. a new classification head.
    """

    method: ClassVar[str] = ""
    targets: Any = "all-linear"
    exclude: list = field(default_factory=list)
    layers: list | None = None
    modules_to_save: list = field(default_factory=list)

    def validate(self) -> None:
        """Raise ConfigError on out-of-range values; subclasses extend it."""
        if isinstance(self.targets, (list, tuple)) and not self.targets:
            raise ConfigError(f"{self.method}: 'targets' is an empty list; name at least one module or use 'all-linear'")
        if self.layers is not None:
            if isinstance(self.layers, int) and not isinstance(self.layers, bool):
                self.layers = [self.layers]
            if not isinstance(self.layers, (list, tuple)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers):
                raise ConfigError(f"{self.method}: 'layers' must be non-negative integers, got {self.layers!r}")
        for key in ("exclude", "modules_to_save"):
            value = getattr(self, key)
            if isinstance(value, str):
                setattr(self, key, [value])
        for key in ("targets", "exclude", "modules_to_save"):
            value = getattr(self, key)
            names = [value] if isinstance(value, str) else value
            if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
                raise ConfigError(f"{self.method}: '{key}' must be a module name or a list of module names "
                                  f"(suffixes or 're:' regexes), got {value!r}")

    def block_indices(self, num_blocks: int) -> list | None:
        """The block indices to adapt in a model of ``num_blocks`` numbered blocks (None: all);
        a method may derive them from its own settings (``select[top_layers=2]``)."""
        return self.layers

    def to_dict(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict, *, strict: bool = True) -> "MethodConfig":
        """Build a config; unknown keys are an error when strict (user input), a warning otherwise
        (a file written by a newer peftlab)."""
        values = {k: v for k, v in values.items() if k != "method"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in values if k not in known]
        for key in unknown:
            hint = difflib.get_close_matches(key, sorted(known), n=1)
            message = f"{cls.method}: unknown setting '{key}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
            message += f"; known settings: {', '.join(sorted(known))}"
            if strict:
                raise ConfigError(message)
            warnings.warn(message + " — ignored (written by a newer peftlab?)", stacklevel=2)
            values.pop(key)
        config = cls(**values)
        config.validate()
        return config


def parse_spec(spec: str) -> list[tuple[str, dict]]:
    """Split ``"lora[r=8]|dora"`` into ``[("lora", {"r": 8}), ("dora", {})]``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"empty method spec {spec!r}; try 'lora[r=16]'")
    parts = []
    for piece in _split_top_level(spec, "|"):
        piece = piece.strip()
        if "[" in piece:
            if not piece.endswith("]"):
                raise ConfigError(f"spec {piece!r}: settings must end with ']' as in 'lora[r=16,alpha=32]'")
            name, body = piece[:-1].split("[", 1)
        else:
            name, body = piece, ""
        name = name.strip().lower()
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"spec {piece!r}: '{name}' is not a method name")
        settings = {}
        for item in _split_top_level(body, ","):
            if not item.strip():
                continue
            if "=" not in item:
                raise ConfigError(f"spec {piece!r}: setting {item.strip()!r} needs the form key=value")
            key, raw = item.split("=", 1)
            settings[key.strip()] = parse_value(raw.strip())
        parts.append((name, settings))
    return parts


def parse_value(raw: str) -> Any:
    """Turn one spec value into a Python value."""
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        return raw[1:-1]
    if raw.startswith("[") and raw.endswith("]"):
        return [parse_value(x.strip()) for x in _split_top_level(raw[1:-1], ",") if x.strip()]
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def _split_top_level(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets, parentheses and quotes."""
    out, depth, quote, current = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch == sep and depth == 0:
            out.append("".join(current))
            current = []
            continue
        current.append(ch)
    if quote or depth:
        raise ConfigError(f"spec {text!r}: unbalanced quotes or brackets")
    out.append("".join(current))
    return out
