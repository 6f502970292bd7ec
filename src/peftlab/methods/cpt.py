"""CPT: Context-aware Prompt Tuning (Blau et al., 2024, arXiv:2410.17222).

Why: in-context learning reads a few labelled examples but learns nothing from them; prompt
tuning learns from them but overfits with so few. CPT takes the examples themselves as the soft
prompt (their tokens' embeddings) and refines those embeddings by training, like an adversarial
attack in reverse: each token may move only within a small ball around where it started, so the
prompt stays the examples' text in meaning while it becomes better at the task.

What (for causal LMs, as in the paper and HF PEFT): ``token_ids`` are the context (the few-shot
examples, formatted and tokenized); ``types`` says what each token is: for example ``i`` (from 0),
``4i+1`` its input template, ``4i+2`` its input, ``4i+3`` its output template, ``4i+4`` its label;
``0`` anything else. The prompt is::

    P = E[token_ids] + delta,    delta starts at 0

prepended to the input embeddings (``prompting.py``). Only template and input tokens move (types
1, 2, 3 mod 4); labels and type-0 tokens stay their embeddings. After every optimizer step
(``after_step``, which ``peftlab.train`` calls; a hand-written loop calls
``peftlab.core.adapters.after_step``) each token's ``delta`` is projected back into its L2 ball::

    delta_i <- delta_i * eps_i / max(||delta_i||, eps_i),
    eps_i = (format_epsilon for template tokens, epsilon for input tokens) * sqrt(hidden / 2048)

(the width scaling and defaults 0.1 are HF PEFT's).

The loss (``regularization``, which ``peftlab.train`` adds to the model's loss): as in the paper,
the context's own labels train the prompt too, each label token predicted from the context before
it; with ``weighted_loss=decay`` example ``k`` places back from the last weighs ``loss_decay**(k+1)``
(the user's labels weigh 1), else every example weighs 1. It needs one extra forward of the prompt
alone (the base model, other adapters off), since causal attention makes those predictions
independent of the input.

Differences from HF PEFT (``CPT``, read and written exactly by ``formats/hf_cpt.py``):

- PEFT pools the context's label tokens (repeated in every row) and the user's into one mean over
  tokens; peftlab adds the context's weighted mean to the model's own loss on the user's tokens (the
  virtual positions are dropped from the output, so the head, the labels and ``generate`` see the
  user's sequence only, and the context's term is computed once per step, not once per row). The
  two agree term by term; only the balance between the two means differs;
- PEFT tells template, input and label tokens of the *user's* input apart by an
  ``input_type_mask`` its own collator builds; peftlab's trainer counts every labelled input token;
- PEFT projects ``delta`` at the start of every forward; peftlab after every optimizer step
  (the same prompts for every forward that follows a step, the step being the only change);
- frozen tokens are kept by multiplying ``delta`` by the trainable-token mask, not by a gradient
  hook (the same prompt; their ``delta`` never gets a gradient).

Saved as PEFT saves it: ``prompt_embeddings`` = the final prompt ``E + delta``. A loaded adapter
starts from that prompt with ``delta = 0`` (as in PEFT), so further training moves within the
balls around the loaded prompt. Mergeable: no.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core import model_adapters
from ..core.config import MethodConfig
from ..errors import ConfigError, TargetError
from .prompting import SAVED_KEY, InputPrompt, check_saved, input_embeddings
from .prompting import EXAMPLE_MODEL_SETTINGS  # noqa: F401  (the registry tests' model)

CATEGORY = "additive"
PAPER = "Blau et al., 2024 (arXiv:2410.17222)"
MERGEABLE = False
IDENTITY_AT_INIT = False
# Neither the paper nor HF PEFT names a rate (PEFT's own CPT tests run at transformers' Trainer default,
# 5e-5). CPT is projected gradient descent: an AdamW step moves a token by about lr * sqrt(hidden), and
# the ball's radius is 0.1 * sqrt(hidden / 2048) (0.053 on SmolLM2-135M), so at 1e-4 a token crosses
# its ball in about 20 steps, as PGD attacks pace their steps; to be measured (SST-2 as a causal LM)
DEFAULT_LR = 1e-4
ARCHITECTURES = ("llama",)  # causal LMs only, as in the paper and HF PEFT (others: TargetError)
# the registry tests' tiny model (hidden 32) would get balls of radius 0.0125: one example of eight
# tokens (template, input, template, label), with the balls widened and the random label's own loss
# down-weighted, so a few steps visibly lower the loss on the user's tokens (the reported loss)
EXAMPLE_SETTINGS = ("token_ids=[5,6,7,8,9,10,11,12],types=[1,2,2,2,3,3,3,4],epsilon=8,format_epsilon=8,"
                    "weighted_loss=decay,loss_decay=0.1")
INVALID_SETTINGS = ("token_ids=[]", "types=[1,2]", "epsilon=0", "format_epsilon=-1", "weighted_loss=linear",
                    "loss_decay=0", "mask=[1,1]")
LOSS_TYPES = ("none", "decay")
REFERENCE_WIDTH = 2048  # the hidden size the epsilons are given for (PEFT's normalization)
FROZEN_EPSILON = 1e-10  # PEFT's radius for tokens that never move (labels, type 0)


def _token_list(config, key: str, minimum: int = 0) -> None:
    value = getattr(config, key)
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= minimum
                                              for i in value):
        raise ConfigError(f"{config.method}: {key} must be a list of integers >= {minimum}, got {value!r}")


@dataclass
class CptConfig(MethodConfig):
    """token_ids: the context examples' tokens (the prompt's init, one virtual token each); types: each
    token's type (4i+1 input template, 4i+2 input, 4i+3 output template, 4i+4 label of example i, 0 other);
    epsilon / format_epsilon: the ball radii of input / template tokens (scaled by sqrt(hidden/2048));
    weighted_loss: none or decay (earlier examples' labels weigh loss_decay per example back); mask,
    tokenizer: recorded for HF PEFT's format (unused)."""

    method: ClassVar[str] = "cpt"
    token_ids: list | None = None
    types: list | None = None
    mask: list | None = None
    epsilon: float = 0.1
    format_epsilon: float = 0.1
    weighted_loss: str = "none"
    loss_decay: float = 1.0
    tokenizer: str | None = None

    def validate(self) -> None:
        super().validate()
        if self.token_ids is None:
            self.token_ids = [0]  # HF PEFT's default context: one token
        _token_list(self, "token_ids")
        if not self.token_ids:
            raise ConfigError(f"{self.method}: token_ids (the context's tokens) must not be empty")
        for key in ("types", "mask"):
            if getattr(self, key) is None:
                setattr(self, key, [1] * len(self.token_ids))
            _token_list(self, key)
            if len(getattr(self, key)) != len(self.token_ids):
                raise ConfigError(f"{self.method}: {key} needs one entry per context token ({len(self.token_ids)}), "
                                  f"got {len(getattr(self, key))}")
        for key in ("epsilon", "format_epsilon", "loss_decay"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"{self.method}: {key} must be a positive number, got {value!r}")
        if self.weighted_loss not in LOSS_TYPES:
            raise ConfigError(f"{self.method}: weighted_loss must be one of {', '.join(LOSS_TYPES)}, got {self.weighted_loss!r}")

    @property
    def length(self) -> int:
        return len(self.token_ids)


# ---- pure math -----------------------------------------------------------------------------------

def trainable_tokens(types: list) -> torch.Tensor:
    """True for the tokens CPT moves: templates and inputs (types 1, 2, 3 mod 4)."""
    kinds = torch.tensor(types) % 4
    return (torch.tensor(types) > 0) & (kinds != 0)


def radii(types: list, epsilon: float, format_epsilon: float, hidden: int) -> torch.Tensor:
    """Each token's ball radius: format_epsilon for templates, epsilon for inputs (both scaled by
    sqrt(hidden / 2048)), and a vanishing one for tokens that never move."""
    types_ = torch.tensor(types)
    scale = math.sqrt(hidden / REFERENCE_WIDTH)
    eps = torch.full((len(types),), FROZEN_EPSILON)
    kinds = types_ % 4
    eps[(types_ > 0) & ((kinds == 1) | (kinds == 3))] = format_epsilon * scale
    eps[(types_ > 0) & (kinds == 2)] = epsilon * scale
    return eps


def label_weights(types: list, weighted_loss: str, decay: float) -> torch.Tensor:
    """Each context token's weight in the loss: 0 unless it is a label (type 4i+4, i >= 0); example
    labels ``k`` places back from the last weigh ``decay**(k+1)`` with ``weighted_loss=decay``, else 1."""
    types_ = torch.tensor(types)
    labels = (types_ > 0) & (types_ % 4 == 0)
    weights = torch.zeros(len(types))
    for back, kind in enumerate(sorted(set(types_[labels].tolist()), reverse=True)):
        weights[types_ == kind] = decay ** (back + 1) if weighted_loss == "decay" else 1.0
    return weights


def context_loss(logits: torch.Tensor, token_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted mean loss of the context's label tokens, each predicted from the position before it."""
    losses = F.cross_entropy(logits[:-1].float(), token_ids[1:], reduction="none")
    counted = weights[1:] > 0
    return (losses * weights[1:])[counted].mean()


def project(delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Each row of ``delta`` (tokens x hidden) scaled back into its ball: ``delta_i * eps_i / max(||delta_i||, eps_i)``."""
    norms = delta.float().norm(dim=1)
    return delta * (eps / norms.clamp(min=eps)).to(delta.dtype)[:, None]


# ---- module ----------------------------------------------------------------------------------------

class ContextPrompt(InputPrompt):
    """``embedding`` (the context's token embeddings, frozen) + ``delta`` (trained, projected)."""

    def __init__(self, backbone: nn.Module, initial: torch.Tensor, config: CptConfig):
        super().__init__(backbone, initial.shape[0])
        self.register_buffer("embedding", initial.detach().clone())
        self.delta = nn.Parameter(torch.zeros_like(initial))
        self.register_buffer("movable", trainable_tokens(config.types).to(initial.device, initial.dtype)[:, None],
                             persistent=False)
        self.register_buffer("eps", radii(config.types, config.epsilon, config.format_epsilon, initial.shape[1]).to(
            initial.device), persistent=False)

    def prompt(self) -> torch.Tensor:
        return self.embedding + self.delta * self.movable

    @torch.no_grad()
    def project(self) -> None:
        self.delta.copy_(project(self.delta, self.eps))

    def export_state(self) -> dict:
        return {SAVED_KEY: self.prompt().detach()}

    def import_state(self, tensors: dict) -> None:
        """A saved prompt becomes the init (``delta = 0``), as when PEFT loads it."""
        value = check_saved(tensors, self.embedding.shape, "CPT prompt")
        with torch.no_grad():
            self.embedding.copy_(value)
            self.delta.zero_()


def after_step(model: nn.Module, name: str, config: CptConfig, step: int, total_steps: int) -> None:
    """Project every context token's update back into its ball (after each optimizer step)."""
    for _, _, module in model_adapters.model_adapters(model, name):
        if isinstance(module, ContextPrompt):
            module.project()


def regularization(model: nn.Module, name: str, config: CptConfig):
    """The context's own labels (see the module docstring), or None when the context has none."""
    from ..core.adapters import disabled

    weights = label_weights(config.types, config.weighted_loss, config.loss_decay)
    if not bool(weights[1:].any()):
        return None
    terms = []
    for _, _, module in model_adapters.model_adapters(model, name):
        if isinstance(module, ContextPrompt):
            prompt = module.prompt()
            with disabled(model):  # the prompt is given by hand: the model must not prepend it again
                logits = model(inputs_embeds=prompt[None]).logits[0]
            ids = torch.tensor(config.token_ids, device=logits.device)
            terms.append(context_loss(logits, ids, weights.to(logits.device)))
    return sum(terms[1:], terms[0]) if terms else None


Config = CptConfig


def make_model_adapter(model: nn.Module, config: CptConfig) -> ContextPrompt:
    if not type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        raise TargetError(f"{config.method} tunes a context of labelled examples that a causal language model reads "
                          f"before the input, so it needs a causal LM (a transformers *ForCausalLM), as in the paper and "
                          f"HF PEFT; {type(model).__name__} is not one. Use prompt[...] for other models")
    stack = model_adapters.backbone(model)
    table = input_embeddings(stack, config.method).weight
    if max(config.token_ids) >= table.shape[0]:
        raise ConfigError(f"{config.method}: token_ids has token id {max(config.token_ids)}, but the model's vocabulary has "
                          f"{table.shape[0]} tokens; tokenize the context with the model's own tokenizer")
    with torch.no_grad():
        initial = table[torch.tensor(config.token_ids, device=table.device)].clone()
    return ContextPrompt(stack, initial, config)
