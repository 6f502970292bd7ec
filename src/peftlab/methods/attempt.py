"""ATTEMPT: Parameter-Efficient Multi-task Tuning via Attentional Mixtures of Soft Prompts (Asai et
al., EMNLP 2022, arXiv:2205.11961).

Why: a soft prompt trained on a large source task (MNLI, SQuAD, ...) holds knowledge a small target
task could use, but prompt tuning starts every task from scratch. ATTEMPT keeps a library of
*frozen* source prompts and learns, for the target task, only a new target prompt and a small
attention module that decides, for each input, how much of every prompt to mix in. The LM and the
source prompts never change; new source prompts can be added or removed at will.

What: with source prompts ``P_1..P_t`` and the target prompt ``P_{t+1}`` (each length x hidden), an
input's embeddings ``X`` (tokens x hidden) and ``maxpool`` over the token axis::

    x = maxpool(X)                                 (padding excluded)
    h = LayerNorm(W_up · SiLU(W_down · x))         the attention module G (hidden -> attn_r -> hidden)
    a = softmax_j(maxpool(P_j) · h / T)            over the t sources and the target, T = temperature
    P(x) = P_{t+1} + sum_j a_j P_j

and ``P(x)`` is prepended to that input's embeddings as prompt tuning does (``prompting.py``: mask,
positions, KV cache and ``generate`` are handled there). Only ``P_{t+1}``, ``W_down``, ``W_up`` and
the layer norm train. ``W_down`` and ``W_up`` have no bias and ``attn_r`` defaults to 100, as in the
authors' code; ``T`` defaults to ``hidden * e`` (the paper's ``d * exp(1)``; their code's default 2000
is that for T5-base's 768), which keeps the mixture soft at the start.

Source prompts: ``sources=[path, ...]`` names soft-prompt adapters peftlab saved (a folder or its
``adapter_model.safetensors``: ``prompt`` in HF PEFT's PROMPT_TUNING format, or a peftlab-format
file holding one ``...prompt_embeddings`` tensor, e.g. a folded P-tuning prompt); each must have
``length`` virtual tokens on this base model. Without ``sources`` the adapter draws
``random_sources`` random prompts at the embedding table's scale, so the defaults attach to any
model (a smoke test of the mechanics, not a transfer). The source prompts are saved with the adapter
(a frozen buffer, ``source_prompts``), so a saved ATTEMPT adapter loads without its source files;
``source_count`` records how many there were.

Differences from the paper: the paper pre-trains the source prompts itself (prompt tuning on each
source task) and, in multi-task training, shares the attention module across target tasks; here the
sources are any saved peftlab soft prompts and one adapter serves one target task (attach one per
task, or use ``multitask_prompt`` for task-conditioned prompts). The input's max-pool skips padded
positions (the authors' code pools over the padding too), so a row's mixture does not depend on how
much padding its batch gave it. The target prompt starts like
prompt tuning's (``init=vocab`` / ``random`` / ``text``). HF PEFT has no ATTEMPT, so the adapter is
saved in peftlab's own format.

Mergeable: no. The prompt is extra input, not a change to any weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..core import kv_cache
from ..core.config import MethodConfig
from ..core.model_adapters import backbone
from ..errors import AdapterFormatError, ConfigError, IncompatibleBaseError
from .prompt_tuning import INITS, check_text_init, initial_prompt
from .prompting import SAVED_KEY, InputPrompt, check_length, input_embeddings, starts_sequence
from .prompting import EXAMPLE_MODEL_SETTINGS  # noqa: F401  (the registry tests' model)

CATEGORY = "additive"
PAPER = "Asai et al., 2022 (arXiv:2205.11961)"
MERGEABLE = False
IDENTITY_AT_INIT = False
# peftlab's prompt-tuning rate (3e-2 with AdamW): the trained part is a soft prompt plus a small network.
# The authors' T5 configs use 0.3 for the prompts and 0.1 for the attention module. Not yet measured for ATTEMPT
DEFAULT_LR = 3e-2
INVALID_SETTINGS = ("length=0", "attn_r=0", "temperature=-1", "random_sources=-1", "sources=[]", "init=zeros")


def _positive_int(config, key: str, *, zero: bool = False) -> None:
    value = getattr(config, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if zero else 1):
        raise ConfigError(f"{config.method}: {key} must be a {'non-negative' if zero else 'positive'} integer, got {value!r}")


@dataclass
class AttemptConfig(MethodConfig):
    """length: virtual tokens of every prompt; sources: saved soft-prompt adapters (frozen source
    prompts); random_sources: how many random source prompts without sources; attn_r: the attention
    module's inner width; temperature: the softmax temperature (default hidden * e); init / init_text /
    tokenizer / init_ids: the target prompt's start, as prompt tuning's."""

    method: ClassVar[str] = "attempt"
    length: int = 20
    sources: list | None = None
    random_sources: int = 2
    attn_r: int = 100
    temperature: float | None = None
    init: str = "vocab"
    init_text: str | None = None
    tokenizer: str | None = None
    init_ids: list | None = None
    source_count: int | None = None  # recorded at attach: how many source prompts the adapter holds

    def validate(self) -> None:
        super().validate()
        check_length(self)
        if isinstance(self.sources, str):
            self.sources = [self.sources]
        if self.sources is not None and (not isinstance(self.sources, list) or not self.sources
                                         or not all(isinstance(s, str) and s for s in self.sources)):
            raise ConfigError(f"{self.method}: sources must be a non-empty list of saved soft-prompt adapters "
                              f"(folders or .safetensors files), got {self.sources!r}; leave it unset for random sources")
        _positive_int(self, "random_sources", zero=True)
        _positive_int(self, "attn_r")
        if self.temperature is not None and (isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float))
                                             or not self.temperature > 0):
            raise ConfigError(f"{self.method}: temperature must be a positive number (or unset for hidden * e), "
                              f"got {self.temperature!r}")
        if self.source_count is not None:
            _positive_int(self, "source_count", zero=True)
        if self.init not in INITS:
            raise ConfigError(f"{self.method}: init (the target prompt's start) must be one of {', '.join(INITS)}, "
                              f"got {self.init!r}")
        check_text_init(self)


# ---- pure math -----------------------------------------------------------------------------------

def pool_inputs(embeds: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Max-pool each row's token embeddings (batch x tokens x hidden -> batch x hidden), padding excluded."""
    if mask is None:
        return embeds.amax(1)
    keep = mask.to(torch.bool).unsqueeze(-1)
    return embeds.masked_fill(~keep, torch.finfo(embeds.dtype).min).amax(1)


def mixture_weights(pooled_inputs: torch.Tensor, prompts: torch.Tensor, attention: nn.Module, temperature: float) -> torch.Tensor:
    """ATTEMPT's attention: (batch x prompts) weights, softmax over ``maxpool(P_j) · G(x) / T``."""
    keys = prompts.amax(1)  # (prompts x hidden): each prompt max-pooled over its tokens
    return torch.softmax(attention(pooled_inputs) @ keys.T / temperature, dim=-1)


def mixed_prompts(weights: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """Each row's prompt, (batch x length x hidden): the target prompt (last) plus the weighted sum of all."""
    return prompts[-1] + torch.einsum("bp,plh->blh", weights, prompts)


# ---- source prompts ----------------------------------------------------------------------------------

def source_file(path: str) -> Path:
    file = Path(path)
    return file / "adapter_model.safetensors" if file.is_dir() else file


def read_source(path: str, shape: tuple, method: str) -> torch.Tensor:
    """The one soft prompt (length x hidden) of a saved peftlab soft-prompt adapter, checked."""
    from safetensors.torch import load_file

    file = source_file(path)
    if file.suffix != ".safetensors" or not file.is_file():
        raise ConfigError(f"{method}: source {path!r} is not a saved soft-prompt adapter (a folder holding "
                          "adapter_model.safetensors, or such a file); save one with peftlab.save after attaching 'prompt'")
    tensors = load_file(str(file))
    found = [k for k in tensors if k == SAVED_KEY or k.endswith("." + SAVED_KEY)]
    if len(found) != 1:
        raise AdapterFormatError(f"{file}: an ATTEMPT source must hold exactly one soft prompt ('{SAVED_KEY}'); found "
                                 f"{found or sorted(tensors)[:5]}")
    prompt = tensors[found[0]]
    if tuple(prompt.shape) != tuple(shape):
        raise IncompatibleBaseError(f"{file}: the source prompt is {tuple(prompt.shape)}, but this adapter needs {tuple(shape)} "
                                    "(length x hidden): set length to the sources' length, on the same base model")
    return prompt


def source_prompts(table: torch.Tensor, config: AttemptConfig) -> torch.Tensor:
    """The frozen source prompts (sources x length x hidden); ``config.source_count`` records how many."""
    shape = (config.length, table.shape[1])
    factory = dict(device=table.device, dtype=table.dtype)
    if config.sources:
        missing = [s for s in config.sources if not source_file(s).is_file()]
        if missing and config.source_count == len(config.sources):
            # a saved ATTEMPT adapter being loaded: its file holds the source prompts, which replace these
            return torch.zeros(len(config.sources), *shape, **factory)
        prompts = torch.stack([read_source(s, shape, config.method).to(**factory) for s in config.sources])
    else:
        with torch.no_grad():
            prompts = torch.randn(config.random_sources, *shape, **factory) * table.float().std()
    config.source_count = prompts.shape[0]
    return prompts


# ---- module ----------------------------------------------------------------------------------------

class AttentionModule(nn.Module):
    """G: ``LayerNorm(up(SiLU(down(x))))``, hidden -> r -> hidden."""

    def __init__(self, hidden: int, r: int, like: torch.Tensor):
        super().__init__()
        factory = dict(device=like.device, dtype=like.dtype)
        self.down = nn.Linear(hidden, r, bias=False, **factory)  # bias-free, as in the authors' code
        self.up = nn.Linear(r, hidden, bias=False, **factory)
        self.norm = nn.LayerNorm(hidden, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.up(nn.functional.silu(self.down(x))))


class AttentionalPrompt(InputPrompt):
    """Frozen source prompts, a trainable target prompt and the attention that mixes them per row."""

    def __init__(self, stack: nn.Module, sources: torch.Tensor, target: torch.Tensor, attn_r: int, temperature: float):
        super().__init__(stack, target.shape[0])
        self.register_buffer("source_prompts", sources)
        self.prompt_embeddings = nn.Parameter(target)
        self.attention = AttentionModule(target.shape[1], attn_r, target)
        self.temperature = temperature
        self._pooled = None  # the current call's max-pooled inputs (batch x hidden), set by rewrite_inputs

    def prompts(self) -> torch.Tensor:
        """Every prompt, sources first and the target last, (sources+1 x length x hidden)."""
        return torch.cat([self.source_prompts, self.prompt_embeddings.unsqueeze(0)])

    def weights(self, pooled: torch.Tensor) -> torch.Tensor:
        return mixture_weights(pooled.to(self.prompt_embeddings.dtype), self.prompts(), self.attention, self.temperature)

    def prompt(self) -> torch.Tensor:
        """Without an input the mixture is undefined; the target prompt alone stands in."""
        return self.prompt_embeddings

    def batch_prompt(self, rows: int) -> torch.Tensor:
        pooled = self._pooled
        if pooled is None or pooled.shape[0] != rows:
            return super().batch_prompt(rows)
        return mixed_prompts(self.weights(pooled), self.prompts())

    def rewrite_inputs(self, kwargs: dict):
        kwargs = dict(kwargs)
        self._pooled = None
        if starts_sequence(kwargs.get(kv_cache.keyword(self._backbone)), self):
            if kwargs.get("inputs_embeds") is None and kwargs.get("input_ids") is not None:
                kwargs["inputs_embeds"] = self._backbone.get_input_embeddings()(kwargs.pop("input_ids"))
            if kwargs.get("inputs_embeds") is not None:
                self._pooled = pool_inputs(kwargs["inputs_embeds"], kwargs.get("attention_mask"))
        try:
            return super().rewrite_inputs(kwargs)
        finally:
            self._pooled = None


Config = AttemptConfig


def make_model_adapter(model: nn.Module, config: AttemptConfig) -> AttentionalPrompt:
    stack = backbone(model)
    table = input_embeddings(stack, config.method).weight
    sources = source_prompts(table, config)
    temperature = float(config.temperature or table.shape[1] * math.e)
    return AttentionalPrompt(stack, sources, initial_prompt(table, config), config.attn_r, temperature)
