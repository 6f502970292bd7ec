"""SPoT: Better Frozen Model Adaptation through Soft Prompt Transfer (Vu et al., 2022, arXiv:2110.07904).

Why: prompt tuning from a random or vocabulary init lags full fine-tuning on small and mid-sized
models and is sensitive to its init. SPoT first trains a prompt on one or more source tasks, then
starts the target task's prompt from it: on SuperGLUE with T5 this closes the gap to model tuning
across sizes, up to 27x better than vanilla prompt tuning at equal size in the paper's few-shot
settings. Which source helps is predictable: prompts are task embeddings, and the sources whose
prompts are most similar to the target's transfer best.

What: prompt tuning (``prompt_tuning.py``, the same ``SoftPrompt`` module) whose prompt starts as a
copy of a source task's trained prompt, named by ``source``: an input-prompt adapter attached to the
same model under that name (trained or loaded with ``peftlab.load(model, folder, name)``), or a
saved prompt adapter (a folder with ``adapter_model.safetensors``, or the file itself) holding one
``prompt_embeddings`` tensor, as ``peftlab.save`` writes for ``prompt``, ``spot``, ``dept`` and as
HF PEFT writes ``PROMPT_TUNING``. ``length`` defaults to the source's; another length, another
hidden width, or a prefix (keys and values, not input vectors) are clear errors.

Retrieval (the paper's section 4): ``rank_sources(target, sources, metric)`` orders source prompts
by their similarity to the target task's prompt (one trained briefly on the target, the paper's
task embedding): ``average``, the cosine of the two prompts' mean tokens, or ``per_token``, the
mean cosine over every pair of tokens, one from each. Prompts are given as tensors, files or
folders, or adapter names of ``model``.

Once started the prompt is an ordinary prompt-tuning prompt, so it is saved as one: HF PEFT's
``PROMPT_TUNING`` (``formats/hf_spot.py``), which loads as ``prompt`` in peftlab and in HF PEFT,
and never needs the source again. No HF PEFT type of its own. Mergeable: no (extra input).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..core import model_adapters
from ..core.config import MethodConfig
from ..core.state import get_state
from ..errors import AdapterFormatError, ConfigError, IncompatibleBaseError
from .prompt_tuning import SoftPrompt
from .prompting import SAVED_KEY, InputPrompt, KVPrefix, check_length, input_embeddings
from .prompting import EXAMPLE_MODEL_SETTINGS  # noqa: F401  (the registry tests' model)

CATEGORY = "additive"
PAPER = "Vu et al., 2022 (arXiv:2110.07904)"
MERGEABLE = False
IDENTITY_AT_INIT = False
DEFAULT_LR = 3e-2  # peftlab's prompt-tuning rate: SPoT trains as Lester et al. do (0.3 with Adafactor on T5)
EXAMPLE_PREREQUISITES = {"source": "prompt[length=4]"}  # the source task's prompt, on the same model
EXAMPLE_SETTINGS = "source=source"
INVALID_SETTINGS = ("source=None", "length=0")
METRICS = ("average", "per_token")
WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass
class SpotConfig(MethodConfig):
    """source: the source task's prompt (an adapter name of this model, or a saved prompt adapter's
    folder or file); length: its length (by default the source's)."""

    method: ClassVar[str] = "spot"
    source: str | None = None
    length: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.length is not None:
            check_length(self)
        if not isinstance(self.source, str) or not self.source or self.source == "None":
            raise ConfigError(f"{self.method}: source must name the source task's prompt: an adapter of this model, or "
                              f"a saved prompt adapter's folder or file; got {self.source!r}")


# ---- source prompts --------------------------------------------------------------------------------

def load_prompt(source, model: nn.Module | None = None) -> torch.Tensor:
    """A source's prompt (tokens x hidden): a tensor as given, an input-prompt adapter of ``model``
    by name, or the one ``prompt_embeddings`` tensor of a saved adapter (folder or safetensors file)."""
    if isinstance(source, torch.Tensor):
        prompt = source
    elif model is not None and isinstance(source, str) and source in getattr(get_state(model), "configs", {}):
        prompt = _adapter_prompt(model, source)
    else:
        prompt = _file_prompt(source, model)
    if prompt.dim() != 2:
        raise AdapterFormatError(f"a source prompt is a (tokens x hidden) matrix; {source!r} has shape {tuple(prompt.shape)}")
    return prompt.detach()


def _adapter_prompt(model: nn.Module, name: str) -> torch.Tensor:
    modules = [m for _, _, m in model_adapters.model_adapters(model, name)]
    prompts = [m for m in modules if isinstance(m, InputPrompt)]
    if len(prompts) != 1:
        what = "a prefix (keys and values in every layer), not input vectors" if any(isinstance(m, KVPrefix) for m in modules) \
            else f"{len(prompts)} input prompts"
        raise IncompatibleBaseError(f"source adapter {name!r} holds {what}; SPoT transfers one input prompt "
                                    "(prompt, spot, dept, ptuning)")
    return prompts[0].prompt()


def _file_prompt(source, model) -> torch.Tensor:
    from ..formats.files import read_tensors, refuse_pickles

    path = Path(source)
    if not path.exists():
        names = sorted(getattr(get_state(model), "configs", {})) if model is not None else []
        where = f"not an adapter of this model (it has {names}) and " if names else ""
        raise ConfigError(f"spot: source {str(source)!r} is {where}not a file or folder")
    if path.is_dir():
        if not (path / WEIGHTS_NAME).exists():
            refuse_pickles(path)
            raise AdapterFormatError(f"{path} has no {WEIGHTS_NAME}: not a saved prompt adapter")
        path = path / WEIGHTS_NAME
    tensors, _ = read_tensors(path)
    found = [key for key in tensors if key == SAVED_KEY or key.endswith("." + SAVED_KEY)]
    if len(found) != 1:
        raise AdapterFormatError(f"{path} should hold one '{SAVED_KEY}' tensor (a saved prompt adapter); found "
                                 f"{sorted(tensors)}")
    return tensors[found[0]]


# ---- task similarity -------------------------------------------------------------------------------

def similarity(a: torch.Tensor, b: torch.Tensor, metric: str = "average") -> float:
    """Two prompts' similarity as task embeddings: ``average``, cos(mean_i a_i, mean_j b_j); or
    ``per_token``, the mean over all pairs (i, j) of cos(a_i, b_j)."""
    if metric not in METRICS:
        raise ConfigError(f"spot: metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if a.shape[-1] != b.shape[-1]:
        raise IncompatibleBaseError(f"prompts of width {a.shape[-1]} and {b.shape[-1]} cannot be compared: "
                                    "they were trained on different base models")
    a, b = a.double(), b.double()
    if metric == "average":
        return torch.nn.functional.cosine_similarity(a.mean(0), b.mean(0), dim=0).item()
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    return (unit(a) @ unit(b).T).mean().item()


def rank_sources(target, sources, metric: str = "average", model: nn.Module | None = None) -> list:
    """``(source, similarity)`` for every source, most similar to ``target`` first (ties keep the
    given order). ``sources``: a list, or a dict of name -> prompt; each prompt and the target as
    ``load_prompt`` takes them (tensors, saved adapters, adapter names of ``model``)."""
    items = list(sources.items()) if isinstance(sources, dict) else [(s, s) for s in sources]
    if not items:
        raise ConfigError("spot: rank_sources needs at least one source prompt")
    goal = load_prompt(target, model)
    scored = [(key, similarity(goal, load_prompt(value, model), metric)) for key, value in items]
    return sorted(scored, key=lambda pair: -pair[1])


# ---- module ----------------------------------------------------------------------------------------

Config = SpotConfig


def make_model_adapter(model: nn.Module, config: SpotConfig) -> SoftPrompt:
    stack = model_adapters.backbone(model)
    table = input_embeddings(stack, config.method).weight
    prompt = load_prompt(config.source, model)
    if prompt.shape[1] != table.shape[1]:
        raise IncompatibleBaseError(f"spot: source {config.source!r} is a prompt of width {prompt.shape[1]}, but this "
                                    f"model's embeddings are {table.shape[1]} wide: it was trained on another base model")
    if config.length is not None and config.length != prompt.shape[0]:
        raise ConfigError(f"spot: length={config.length}, but source {config.source!r} has {prompt.shape[0]} tokens; "
                          "SPoT starts from the whole source prompt (leave length unset)")
    config.length = prompt.shape[0]  # recorded, as the saved prompt's length
    return SoftPrompt(stack, prompt.to(device=table.device, dtype=table.dtype).clone())
