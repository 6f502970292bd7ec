"""Prompt tuning: The Power of Scale for Parameter-Efficient Prompt Tuning (Lester et al., 2021, arXiv:2104.08691).

Why: a frozen model can be steered to a task by text in front of the input; prompt tuning learns
that "text" directly as ``length`` free vectors in the embedding space (a soft prompt), the only
trainable parameters (``length x hidden``, e.g. 11,520 for 20 tokens on SmolLM2-135M). The paper
shows the gap to full fine-tuning closes as the model grows, and that one frozen model can serve
many tasks, each a few kilobytes of prompt.

What: the soft prompt is prepended to the input embeddings of every sequence (``prompting.py``
does the mask, position and KV-cache bookkeeping, so training, KV-cached ``generate`` and
left-padded batches all work; the prompt's hidden states are dropped from the output).
Initialisation, as studied in the paper (section 3.2):

- ``init=vocab`` (default): embeddings of tokens sampled from the vocabulary (the paper samples
  from the 5,000 most frequent tokens; frequency is unknown here, so any token);
- ``init=random``: Gaussian with the standard deviation of the model's embedding table;
- ``init=text``: the embeddings of a text's tokens, repeated or truncated to ``length`` (the
  paper's class-label init is this with the label words). Give ``init_ids`` (token ids) or
  ``init_text`` plus ``tokenizer`` (a name or path ``AutoTokenizer`` loads); the tokenizer's ids
  are recorded in ``init_ids``, so reloading never needs the tokenizer again.

Mergeable: no. The prompt is extra input, not a change to any weight. Saved in HF PEFT's
``PROMPT_TUNING`` format (``formats/hf_prompt.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.config import MethodConfig
from ..core.model_adapters import backbone
from ..errors import ConfigError
from .prompting import InputPrompt, check_length, input_embeddings, repeat_to_length
from .prompting import EXAMPLE_MODEL_SETTINGS  # noqa: F401  (the registry tests' model)

CATEGORY = "additive"
PAPER = "Lester et al., 2021 (arXiv:2104.08691)"
MERGEABLE = False
IDENTITY_AT_INIT = False
DEFAULT_LR = 3e-2
INVALID_SETTINGS = ("length=0", "init=zeros", "init_ids=[3]", "init=text")
INITS = ("vocab", "random", "text")


@dataclass
class PromptTuningConfig(MethodConfig):
    """length: virtual tokens; init: vocab, random or text; init_ids / init_text + tokenizer: the
    text for init=text."""

    method: ClassVar[str] = "prompt"
    length: int = 20
    init: str = "vocab"
    init_text: str | None = None
    tokenizer: str | None = None
    init_ids: list | None = None

    def validate(self) -> None:
        super().validate()
        check_length(self)
        if self.init not in INITS:
            raise ConfigError(f"{self.method}: init must be one of {', '.join(INITS)}, got {self.init!r}")
        check_text_init(self)


def check_text_init(config) -> None:
    """The text-init settings (``init_text``, ``tokenizer``, ``init_ids``) of a config with ``init``:
    given with init=text only, and enough of them to find the text's token ids."""
    text_settings = [k for k in ("init_text", "tokenizer", "init_ids") if getattr(config, k) is not None]
    if config.init != "text" and text_settings:
        raise ConfigError(f"{config.method}: {', '.join(text_settings)} only apply to init=text (now init={config.init})")
    if config.init == "text":
        if config.init_ids is None and not (config.init_text and config.tokenizer):
            raise ConfigError(f"{config.method}: init=text needs init_ids=[token ids], or init_text='...' together "
                              "with tokenizer=<name or path>")
        if config.init_ids is not None and (not isinstance(config.init_ids, list) or not config.init_ids or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in config.init_ids)):
            raise ConfigError(f"{config.method}: init_ids must be a non-empty list of token ids, got {config.init_ids!r}")


# ---- initialisation ------------------------------------------------------------------------------

def text_ids(config: PromptTuningConfig) -> list:
    """The init text's token ids, from ``init_ids`` or the tokenizer (ids recorded in the config)."""
    if config.init_ids is None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
        except (OSError, ValueError) as error:
            raise ConfigError(f"{config.method}: could not load tokenizer {config.tokenizer!r} ({error}); give a local "
                              "path, or the token ids as init_ids=[...]") from None
        config.init_ids = list(tokenizer(config.init_text)["input_ids"])
    return config.init_ids


def initial_prompt(table: torch.Tensor, config: PromptTuningConfig) -> torch.Tensor:
    """The soft prompt at step 0, (length x hidden), from the embedding table (vocab x hidden)."""
    vocab = table.shape[0]
    with torch.no_grad():
        if config.init == "random":
            return torch.randn(config.length, table.shape[1], device=table.device, dtype=table.dtype) * table.float().std()
        if config.init == "vocab":
            ids = torch.randint(0, vocab, (config.length,))
        else:
            ids = text_ids(config)
            if max(ids) >= vocab:
                raise ConfigError(f"{config.method}: init_ids has token id {max(ids)}, but the model's vocabulary has "
                                  f"{vocab} tokens; use the model's own tokenizer")
            ids = torch.tensor(repeat_to_length(ids, config.length))
        return table[ids.to(table.device)].clone()


# ---- module ----------------------------------------------------------------------------------------

class SoftPrompt(InputPrompt):
    """The prompt itself is the parameter (``prompt_embeddings``, length x hidden)."""

    def __init__(self, backbone: nn.Module, initial: torch.Tensor):
        super().__init__(backbone, initial.shape[0])
        self.prompt_embeddings = nn.Parameter(initial)

    def prompt(self) -> torch.Tensor:
        return self.prompt_embeddings


Config = PromptTuningConfig


def make_model_adapter(model: nn.Module, config: PromptTuningConfig) -> SoftPrompt:
    stack = backbone(model)
    table = input_embeddings(stack, config.method).weight
    return SoftPrompt(stack, initial_prompt(table, config))
