"""DePT: Decomposed Prompt Tuning for Parameter-Efficient Fine-tuning (Shi & Lipani, 2024, arXiv:2309.05173).

Why: a soft prompt of ``l`` tokens makes every sequence ``l`` tokens longer, and attention costs
grow with the square of the length. DePT spends the same parameter budget on a shorter prompt of
``m < l`` tokens plus a low-rank update of the input tokens' own embeddings, which costs nothing
in sequence length: the paper beats vanilla prompt tuning on GLUE and SuperGLUE with T5 while
training and inferring over 20% faster and with less memory.

What: the prompt ``P`` (``length`` x hidden) is prepended as in prompt tuning (``prompt_tuning.py``:
same initialisations, same mask, position and KV-cache bookkeeping from ``prompting.py``), and the
frozen embedding ``E_i`` of the input token at position ``i`` becomes ``E_i + (A B)_i``, with
``A`` (``max_length`` x ``r``) and ``B`` (``r`` x hidden): one learned offset per input position,
of rank ``r``. The trainable count is ``m*d + s*r + r*d`` (``m`` = length, ``s`` = max_length,
``d`` = hidden); the paper's code sets ``m``, ``r`` so that it equals vanilla prompt tuning's
``l*d`` (the authors' GLUE script: ``m=40``, ``r=45``, ``s=256`` = 100 tokens' worth on T5-Base,
peftlab's defaults). ``A`` starts as a Kaiming-uniform matrix and ``B`` at zero, as in the
authors' code, so at init the model is prompt tuning with the short prompt.

Where peftlab differs, and why:

- positions: the paper pads every input to ``max_length`` and adds row ``i`` of ``A B`` to column
  ``i``; peftlab adds it to the ``i``-th real token of each row (positions counted from the
  attention mask), so a left-padded row gets what it gets alone. Tokens past ``max_length`` are an
  error (the update has no row for them); tokens produced by ``generate`` get no update, as in the
  authors' generation code, which applies it to the prompt's prefill only.
- the authors' code scales ``A B`` by ``alpha / sqrt(r)``; here the scale is left to the
  learning rate (one constant factor fewer, the same family of updates).
- two learning rates: the paper trains ``P`` and ``A, B`` at different rates (its script: 3e-1
  for the prompt, 5e-3 to 3e-1 for the pair). peftlab's trainer has one rate, and AdamW's step
  does not depend on the gradient's scale, so the module stores ``A / c`` and ``B / c`` and uses
  ``c`` times them (``c`` = ``lr_ratio``): each factor then moves ``lr_ratio`` times as fast as
  the prompt (as ``diff_pruning.py`` does for its gates). The saved tensors are the true ``A`` and
  ``B`` (``lora_embedding_A``, ``lora_embedding_B``, the authors' names) and ``prompt_embeddings``.

No HF PEFT type (saved in peftlab's format). Mergeable: no; the prompt is extra input, and the
update is per position, not per token, so it is no change to the embedding table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core import kv_cache
from ..core.model_adapters import backbone
from ..errors import AdapterFormatError, ConfigError, IncompatibleBaseError, StateError
from .prompt_tuning import PromptTuningConfig, initial_prompt
from .prompting import SAVED_KEY, InputPrompt, input_embeddings, starts_sequence
from .prompting import EXAMPLE_MODEL_SETTINGS  # noqa: F401  (the registry tests' model)

CATEGORY = "additive"
PAPER = "Shi & Lipani, 2024 (arXiv:2309.05173)"
MERGEABLE = False
IDENTITY_AT_INIT = False
# peftlab's prompt-tuning rate for the prompt (the paper's 3e-1 is T5's, as Lester et al.'s is); the
# pair moves lr_ratio = 5e-3 / 3e-1 times as fast, the ratio of the authors' GLUE script's first pair
DEFAULT_LR = 3e-2
INVALID_SETTINGS = ("length=0", "r=0", "max_length=0", "lr_ratio=0", "init=zeros")
KEYS = ("lora_embedding_A", "lora_embedding_B")


@dataclass
class DeptConfig(PromptTuningConfig):
    """length: the (shorter) prompt's tokens; r: rank of the embedding update; max_length: the
    longest input it covers; lr_ratio: how much faster A and B learn than the prompt; init as for
    prompt tuning."""

    method: ClassVar[str] = "dept"
    length: int = 40
    r: int = 45
    max_length: int = 256
    lr_ratio: float = 5e-3 / 3e-1

    def validate(self) -> None:
        super().validate()
        for key in ("r", "max_length"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{self.method}: {key} must be a positive integer, got {value!r}")
        if isinstance(self.lr_ratio, bool) or not isinstance(self.lr_ratio, (int, float)) \
                or not 0 < self.lr_ratio < math.inf:
            raise ConfigError(f"{self.method}: lr_ratio (the low-rank pair's learning rate over the prompt's) must be a "
                              f"positive number, got {self.lr_ratio!r}")


# ---- pure math -----------------------------------------------------------------------------------

def token_positions(mask: torch.Tensor | None, rows: int, length: int, device) -> torch.Tensor:
    """Each token's position among its row's real tokens (rows x length): the attention mask's
    running count minus one (padding before a row's first token counts as 0), or 0..length-1."""
    if mask is None:
        return torch.arange(length, device=device).expand(rows, -1)
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def embedding_update(a: torch.Tensor, b: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Row ``positions[n, t]`` of ``A B`` for every token (rows x length x hidden)."""
    return (a @ b)[positions]


def parameter_count(length: int, max_length: int, r: int, hidden: int) -> int:
    """The paper's budget: m*d + s*r + r*d."""
    return length * hidden + max_length * r + r * hidden


# ---- module ----------------------------------------------------------------------------------------

class DecomposedPrompt(InputPrompt):
    """The prompt (``prompt_embeddings``) and the update's factors, stored divided by ``lr_ratio``."""

    def __init__(self, stack: nn.Module, initial: torch.Tensor, config: DeptConfig):
        super().__init__(stack, initial.shape[0])
        self.prompt_embeddings = nn.Parameter(initial)
        self.ratio = float(config.lr_ratio)
        self.max_length = config.max_length
        like = dict(device=initial.device, dtype=initial.dtype)
        a = torch.empty(config.max_length, config.r, **like)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.scaled_a = nn.Parameter(a / self.ratio)
        self.scaled_b = nn.Parameter(torch.zeros(config.r, initial.shape[1], **like))

    def prompt(self) -> torch.Tensor:
        return self.prompt_embeddings

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The true ``A`` and ``B``."""
        return self.scaled_a * self.ratio, self.scaled_b * self.ratio

    def rewrite_inputs(self, kwargs: dict):
        if starts_sequence(kwargs.get(kv_cache.keyword(self._backbone)), self):
            kwargs = dict(kwargs)
            ids = kwargs.pop("input_ids", None)
            embeds = kwargs.pop("inputs_embeds", None)
            if embeds is None:
                if ids is None:
                    raise StateError("the model was called without input_ids or inputs_embeds")
                embeds = self._backbone.get_input_embeddings()(ids)
            rows, length = embeds.shape[:2]
            positions = token_positions(kwargs.get("attention_mask"), rows, length, embeds.device)
            if int(positions.max()) >= self.max_length:
                raise StateError(f"dept adds a learned offset to input positions 0..{self.max_length - 1} "
                                 f"(max_length={self.max_length}), but an input has {int(positions.max()) + 1} "
                                 "tokens: truncate the inputs, or attach with a larger max_length")
            kwargs["inputs_embeds"] = embeds + embedding_update(*self.factors(), positions).to(embeds.dtype)
        return super().rewrite_inputs(kwargs)

    def export_state(self) -> dict:
        a, b = self.factors()
        return {SAVED_KEY: self.prompt_embeddings.detach(), KEYS[0]: a.detach(), KEYS[1]: b.detach()}

    def import_state(self, tensors: dict) -> None:
        expected = {SAVED_KEY: self.prompt_embeddings, KEYS[0]: self.scaled_a, KEYS[1]: self.scaled_b}
        if set(tensors) != set(expected):
            raise AdapterFormatError(f"a saved dept adapter holds {sorted(expected)}; found {sorted(tensors)}")
        for key, parameter in expected.items():
            if tuple(tensors[key].shape) != tuple(parameter.shape):
                raise IncompatibleBaseError(f"the saved {key} is {tuple(tensors[key].shape)}, but this model and config "
                                            f"need {tuple(parameter.shape)}: saved for another base model or settings")
        with torch.no_grad():
            self.prompt_embeddings.copy_(tensors[SAVED_KEY])
            self.scaled_a.copy_(tensors[KEYS[0]] / self.ratio)
            self.scaled_b.copy_(tensors[KEYS[1]] / self.ratio)


Config = DeptConfig


def make_model_adapter(model: nn.Module, config: DeptConfig) -> DecomposedPrompt:
    stack = backbone(model)
    table = input_embeddings(stack, config.method).weight
    return DecomposedPrompt(stack, initial_prompt(table, config), config)
