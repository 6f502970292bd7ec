"""MEFT: Make Pre-trained Model Reversible: From Parameter to Memory Efficient Fine-Tuning (Liao, Tan and
Monz, NeurIPS 2023, arXiv:2306.00477).

Why: adapters, LoRA and prompts train few parameters, but backpropagation still keeps every layer's
activations, so training memory barely falls. A *reversible* network (RevNet) keeps none: each
block's inputs can be computed back from its outputs, so the backward pass recomputes activations
block by block, top down, from the last output alone. Activation memory no longer grows with depth.
A pretrained model is not reversible; MEFT inserts adapters so that each block becomes a reversible
two-stream function *and* the model still starts at (about) the pretrained model, so no further
pre-training is needed. The paper reports 84% less activation memory than full fine-tuning at the
accuracy of ordinary adapters on GLUE.

What (block ``n`` of ``N``, streams ``h1``, ``h2``, both the embeddings at the bottom)::

    y1 = lam * x1 + F(x2)            F(x) = block_n(x) + A_F(x)      (the pretrained block, an adapter beside it)
    y2 = beta * x2 + G(y1)           G = A_G                         (an adapter)
    next block's (x1, x2) = (y2, y1)                                 (the streams switch)

and the inverse, used by the backward pass: ``x2 = (y2 - G(y1)) / beta``, ``x1 = (y1 - F(x2)) / lam``.
``A(x) = W_up act(W_down x + b_down) + b_up`` with bottleneck ``r`` (8, the paper's) and the model's
own activation. With ``lam`` small and ``beta = 1`` (the paper's MEFT1: 0.1 and 1), ``y1 = h_n +
lam * (...)`` carries the pretrained block outputs and ``y2`` the previous state, so at init the
model is the pretrained one up to ``O(lam)``: the paper's approximation (``IDENTITY_AT_INIT = False``;
``tests/test_meft.py`` measures the gap and that it shrinks like ``lam``).

The backward pass (``ReversibleCoupling``, a ``torch.autograd.Function`` per block): in a forward
that computes gradients, each block runs without an autograd graph and the coupling keeps nothing
for backward but the block's call (its mask and rotary tables, which every block shares) and, once
per forward, the last block's outputs. The backward of block ``n`` reads block ``n``'s outputs,
computes its inputs back with the inverse, recomputes ``F`` and ``G`` on them with a graph, returns
the gradients of its inputs and trainable parameters (the adapters', and any other trainable
parameter inside the block: ``lora|meft`` works), and leaves its inputs for block ``n - 1``. The
random state of each block is replayed, so dropout gives the same gradients as ordinary autograd.

Which variant, and why (the paper has three): MEFT3 makes the attention and the MLP sub-blocks the two
coupled functions, which means calling them apart and re-doing each architecture's residuals and
norms (BERT's post-norm, Llama's pre-norm): copying the model's forward. MEFT1 and MEFT2 use the
whole block as one function, called as it is, so they work the same on decoders and encoders. Of
the two, MEFT1 (``F`` = block, ``lam`` = 0.1, ``beta`` = 1) is the authors' default; MEFT2 is the same
coupling with the roles of the streams exchanged. peftlab implements MEFT1.

Decisions (differences from the paper):

- The block is not opened: ``A_F`` sits beside the whole block (reads its input, adds to its
  output) rather than beside its feed-forward sub-layer inside the block.
- The head reads the ``y1`` stream (the block outputs) of the last block; the paper's code averages
  the two streams, which with ``beta = 1`` mixes in the state one block lower, so the model would
  not start at the pretrained output.
- Both adapters' up-projections start at zero (the paper draws them from N(0, 0.02^2)), so the
  adapters add exactly nothing at init and the only gap to the pretrained model is ``lam``'s.
- The reversible path is taken for a forward that computes gradients with no KV cache content and no
  other input that needs a gradient (a prefix, say); otherwise (generation, ``lora|prefix|meft``)
  the same coupling runs under ordinary autograd. Generation with a KV cache is exact: the second
  stream is position-wise.
- Depth and pre-norm decoders. The inverse divides by ``lam`` once per block, so rounding grows
  about ``1/lam`` per block walked down: on the tiny test models (2 blocks) fp32 gradients match
  ordinary autograd to ~1e-5, but on SmolLM2-135M (30 pre-norm blocks with large residual
  activations) 2 reversible blocks give 5e-5 relative error, 4 give 5e-2, 6 give 13, 30 overflow.
  The same model also starts far from the pretrained one at ``lam=0.1`` (loss 7.07 against 1.69 on a
  sample; 1.61 at ``lam=0.01``): the ``O(lam)`` gap compounds over 30 residual blocks, where the
  paper's BERT/RoBERTa are 12-24 post-norm blocks. Two settings beyond the paper's defaults make such
  models usable: ``reversible_blocks=N`` (the paper's ``num_rev_layers``: only the lowest N blocks
  recompute, the rest use ordinary autograd) and ``anchor_every=k`` (peftlab's: the exact inputs of
  every k-th block are kept, and the backward restarts its reconstruction there, so rounding grows
  over at most k blocks, for two hidden states per k blocks of memory; on SmolLM2 at ``lam=0.01``,
  ``anchor_every=2`` gives 2e-6 relative gradient error). A reconstruction that overflows is a clear
  StateError, not a silent NaN.

Works on transformers models whose config names ``num_hidden_layers`` and ``hidden_size`` and whose
blocks sit in one ``nn.ModuleList`` (Llama, BERT, GPT-2, OPT ...). Mergeable: no. No HF PEFT type.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core import kv_cache
from ..core.config import MethodConfig
from ..core.layer import MAIN_INPUT_NAMES, main_input
from ..core.model_adapters import backbone
from ..errors import ConfigError, StateError, TargetError

CATEGORY = "additive"
PAPER = "Liao et al., 2023 (arXiv:2306.00477)"
MERGEABLE = False
IDENTITY_AT_INIT = False  # the pretrained model up to O(lam): see the module docstring
DEFAULT_LR = 5e-3  # the authors sweep 5e-4..8e-4 for 20-40 GLUE epochs; peftlab's short-run adapter rate (houlsby, parallel)
INVALID_SETTINGS = ("r=0", "lam=0", "beta=0", "lam=-1", "r=half", "anchor_every=0", "reversible_blocks=-1")
# Weights at a pretrained scale for the registry tests: the adapters act beside whole blocks
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}
RUNNING_ATTR = "_peftlab_meft_running"  # on the first block: the stack whose forward is running


@dataclass
class MeftConfig(MethodConfig):
    """r: the adapters' bottleneck; lam: the scale of the stream the block does not read (lambda,
    small: the model starts near the pretrained one); beta: the scale of the other stream; reversible:
    False runs the same coupling under ordinary autograd (the paper's vanilla-gradient baseline);
    reversible_blocks: only the lowest N blocks recompute in backward, the ones above keep their
    activations (the paper's ``num_rev_layers``; none: every block); anchor_every: keep the exact
    inputs of every k-th reversible block, where the backward restarts its reconstruction (none: keep
    nothing, the paper's; deep pre-norm decoders need it, see the module docstring)."""

    method: ClassVar[str] = "meft"
    r: int = 8
    lam: float = 0.1
    beta: float = 1.0
    reversible: bool = True
    reversible_blocks: int | None = None
    anchor_every: int | None = None

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"{self.method}: r (the adapters' bottleneck) must be a positive integer, got {self.r!r}")
        if not isinstance(self.reversible, bool):
            raise ConfigError(f"{self.method}: reversible must be true or false, got {self.reversible!r}")
        count = self.reversible_blocks
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
            raise ConfigError(f"{self.method}: reversible_blocks (how many of the lowest blocks recompute in backward) must "
                              f"be a non-negative integer or none (every block), got {count!r}")
        every = self.anchor_every
        if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every <= 0):
            raise ConfigError(f"{self.method}: anchor_every (keep the exact inputs of every k-th block) must be a positive "
                              f"integer or none, got {every!r}")
        for key in ("lam", "beta"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{self.method}: {key} must be a positive number (the inverse divides by it; the paper's "
                                  f"MEFT1 uses lam=0.1, beta=1), got {value!r}")


# ---- pure math -------------------------------------------------------------------------------------

def couple(x1, x2, block_out, adapter_f, adapter_g, lam: float, beta: float):
    """One reversible block: ``y1 = lam x1 + block(x2) + A_F(x2)``, ``y2 = beta x2 + A_G(y1)``."""
    y1 = lam * x1 + (block_out + adapter_f(x2))
    return y1, beta * x2 + adapter_g(y1)


def uncouple(y1, y2, f, adapter_g, lam: float, beta: float):
    """The inverse of ``couple``: ``(x1, x2)`` from ``(y1, y2)``; ``f(x2)`` is ``block(x2) + A_F(x2)``."""
    x2 = (y2 - adapter_g(y1)) / beta
    return (y1 - f(x2)) / lam, x2


# ---- modules ---------------------------------------------------------------------------------------

class Bottleneck(nn.Module):
    """``W_up act(W_down x + b) + c``, up-projection zero at init."""

    def __init__(self, hidden: int, r: int, activation, factory: dict):
        super().__init__()
        self.down = nn.Linear(hidden, r, **factory)
        self.up = nn.Linear(r, hidden, **factory)
        nn.init.normal_(self.down.weight, std=0.02)  # the paper's init
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.activation = activation

    def forward(self, x):
        return self.up(self.activation(self.down(x.to(self.down.weight.dtype)))).to(x.dtype)


class Run:
    """One forward of the model: which block comes next, the stream it does not read, and (on the
    reversible path) the outputs of the last block run, which the backward pass walks down."""

    def __init__(self):
        self.reversible = None  # decided at the first block
        self.next = 0
        self.side = None
        self.top = None  # (index, y1, y2) of the block whose outputs the next backward step reads


class ReversibleStack(nn.Module):
    """The adapters of every block and the hooks that make the blocks a reversible two-stream stack."""

    def __init__(self, blocks: list, hidden: int, config: MeftConfig, activation, factory: dict):
        super().__init__()
        self.adapters_f = nn.ModuleList(Bottleneck(hidden, config.r, activation, factory) for _ in blocks)
        self.adapters_g = nn.ModuleList(Bottleneck(hidden, config.r, activation, factory) for _ in blocks)
        self.lam, self.beta = float(config.lam), float(config.beta)
        self.reversible = config.reversible
        self.anchor_every = config.anchor_every
        self.reversible_blocks = len(blocks) if config.reversible_blocks is None else config.reversible_blocks
        self.__dict__["_blocks"] = list(blocks)  # plain references, not submodules
        self.__dict__["_runs"] = []
        self.__dict__["_handles"] = []

    # -- the model-level adapter protocol (core/model_adapters.py) --
    def rewrite_inputs(self, kwargs: dict):
        if self._runs:  # a forward that raised left its run behind
            self._release()
        owner = self._blocks[0].__dict__.get(RUNNING_ATTR)
        if owner is not None and owner is not self:
            together = bool(owner._runs) and owner._runs[-1].next == 0  # its forward has not reached a block yet
            owner._release()  # else: left behind by a forward that raised
            if together:
                raise StateError("two meft adapters are active together; a block can be made reversible once: "
                                 "set_active one")
        run = Run()
        self._runs.append(run)
        if len(self._runs) == 1:
            self._blocks[0].__dict__[RUNNING_ATTR] = self
            for index, block in enumerate(self._blocks):
                self._handles.append(block.register_forward_pre_hook(self._before(index), with_kwargs=True))
                self._handles.append(block.register_forward_hook(self._after(index), with_kwargs=True,
                                                                 always_call=True, prepend=True))
        return kwargs, run

    def rewrite_output(self, output, run):
        self._release()
        if run.next not in (0, len(self._blocks)):
            raise StateError(f"meft: only {run.next} of the model's {len(self._blocks)} blocks ran; a reversible stack "
                             "needs every block once per forward (no layer drop)")
        return output

    def _release(self):
        self._runs.clear()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._blocks[0].__dict__.pop(RUNNING_ATTR, None)

    # -- the block hooks --
    def _before(self, index: int):
        def hook(block, args, kwargs):
            run = self._runs[-1]
            if run.next != index:
                raise StateError(f"meft: block {index} ran when block {run.next} was expected; the blocks of a "
                                 "reversible stack must run once each, in order")
            x2 = main_input(args, kwargs)
            run.x1 = x2 if index == 0 else run.side
            if index == 0:
                run.reversible = self.reversible and torch.is_grad_enabled() and reversible_call(block, args, kwargs, x2)
            run.modes = None
            if run.reversible and index < self.reversible_blocks:
                run.call = (args, kwargs, _rng_state(x2) if block.training else None)
                run.modes = torch.is_grad_enabled()
                torch.set_grad_enabled(False)  # the block keeps nothing for backward
            return None
        return hook

    def _after(self, index: int):
        def hook(block, args, kwargs, output):
            run = self._runs[-1] if self._runs else None
            if run is None or run.next != index:
                return None
            if run.modes is not None:
                torch.set_grad_enabled(run.modes)
                run.modes = None
            if output is None:  # the block raised: its error passes through
                return None
            out = output[0] if isinstance(output, tuple) else output
            x2, x1 = main_input(args, kwargs), run.x1
            f, g = self.adapters_f[index], self.adapters_g[index]
            if run.reversible and index < self.reversible_blocks:
                args_, kwargs_, rng = run.call
                step = Step(self, block, index, args_, kwargs_, rng, run)
                y1, y2 = ReversibleCoupling.apply(step, x1, x2, out, *step.params)
                run.call = None
            else:
                y1, y2 = couple(x1, x2, out, f, g, self.lam, self.beta)
            run.side, run.x1 = y2, None
            run.next = index + 1
            return (y1, *output[1:]) if isinstance(output, tuple) else y1
        return hook


def reversible_call(block: nn.Module, args, kwargs, hidden) -> bool:
    """Whether this call can be recomputed from the block's output alone: no KV cache content
    (recomputing would read the keys twice) and no other input that needs a gradient."""
    name = kv_cache.keyword(block)
    cache = kwargs.get(name) if name else None
    if cache is not None and not (hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0):
        return False
    others = list(args[1:]) + [v for k, v in kwargs.items() if k not in MAIN_INPUT_NAMES or v is not hidden]
    flat = [t for v in others for t in (v if isinstance(v, (tuple, list)) else (v,))]
    return not any(torch.is_tensor(t) and t.requires_grad for t in flat)


def _rng_state(x: torch.Tensor):
    cuda = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
    return torch.get_rng_state(), cuda


class Step:
    """What one block's backward needs: the block's call, its adapters, its random state."""

    def __init__(self, stack: ReversibleStack, block, index, args, kwargs, rng, run):
        self.stack, self.block, self.index, self.run, self.rng = stack, block, index, run, rng
        self.args = args[1:]
        self.kwargs = {k: v for k, v in kwargs.items() if k not in MAIN_INPUT_NAMES}
        cache = kv_cache.keyword(block)
        if cache:
            self.kwargs[cache] = None  # the recomputation must not append to the cache again
        self.f_params = [p for p in block.parameters() if p.requires_grad] + list(stack.adapters_f[index].parameters())
        self.g_params = list(stack.adapters_g[index].parameters())
        self.params = self.f_params + self.g_params

    def f(self, x2):
        out = self.block.forward(x2, *self.args, **self.kwargs)  # forward, not __call__: no hooks, no checkpointing
        out = out[0] if isinstance(out, tuple) else out
        return out + self.stack.adapters_f[self.index](x2)

    def backward(self, y1, y2, dy1, dy2):
        stack = self.stack
        anchor = getattr(self, "anchor", None)
        dy1 = torch.zeros_like(y1) if dy1 is None else dy1
        with torch.enable_grad():
            y1 = y1.detach().requires_grad_(dy2 is not None)
            g = stack.adapters_g[self.index](y1)
        if dy2 is None:  # y2 fed nothing (the top block's): no gradient for G, as under ordinary autograd
            grads = [None] * (1 + len(self.g_params))
            dy2 = torch.zeros_like(y2)
        else:
            grads = _grad(g, [y1, *self.g_params], dy2)
            dy1 = dy1 + grads[0]
        with torch.no_grad():
            x2 = (y2 - g.detach()) / stack.beta if anchor is None else anchor[1]
        with torch.enable_grad(), _replayed(self.rng, x2):
            x2 = x2.detach().requires_grad_(True)
            f = self.f(x2)
        f_grads = _grad(f, [x2, *self.f_params], dy1)
        with torch.no_grad():
            x1 = (y1.detach() - f.detach()) / stack.lam if anchor is None else anchor[0]
            if not (torch.isfinite(x1).all() and torch.isfinite(x2).all()):
                raise StateError(f"meft: computing block {self.index}'s inputs back from its outputs overflowed: the inverse "
                                 f"divides by lam={stack.lam} (and beta) once per block, so rounding grows with depth; make "
                                 "fewer blocks reversible (reversible_blocks=N), raise lam, or compute in float64")
        return x1, x2.detach(), stack.lam * dy1, stack.beta * dy2 + f_grads[0], f_grads[1:] + grads[1:]


def _grad(output, inputs, grad_output):
    wanted = [t for t in inputs if t.requires_grad]
    found = iter(torch.autograd.grad(output, wanted, grad_output, allow_unused=True)) if wanted else iter(())
    return [next(found) if t.requires_grad else None for t in inputs]


class _replayed:
    """Run with the random state a block had in its forward (dropout draws the same masks)."""

    def __init__(self, rng, x):
        self.rng, self.x = rng, x

    def __enter__(self):
        if self.rng is None:
            return
        self.fork = torch.random.fork_rng(devices=[self.x.device] if self.x.is_cuda else [])
        self.fork.__enter__()
        torch.set_rng_state(self.rng[0])
        if self.rng[1] is not None:
            torch.cuda.set_rng_state(self.rng[1], self.x.device)

    def __exit__(self, *exc):
        if self.rng is not None:
            self.fork.__exit__(*exc)


class ReversibleCoupling(torch.autograd.Function):
    """One block's coupling whose backward recomputes instead of reading saved activations.

    ``block_out`` (the block's output, computed without a graph) is an input without gradient; the
    backward returns the gradient of ``y1`` with respect to ``x2`` through the block as well, so the
    gradients are those of ``couple`` with the block inside."""

    @staticmethod
    def forward(ctx, step: Step, x1, x2, block_out, *params):
        stack = step.stack
        y1, y2 = couple(x1, x2, block_out, stack.adapters_f[step.index], stack.adapters_g[step.index], stack.lam, stack.beta)
        step.run.top = (step.index, y1.detach(), y2.detach())
        every = stack.anchor_every
        # an anchor: this block's exact inputs (kept by reference: the lower block's outputs)
        step.anchor = (x1.detach(), x2.detach()) if every and step.index % every == every - 1 else None
        ctx.step = step
        ctx.set_materialize_grads(False)
        return y1, y2

    @staticmethod
    def backward(ctx, dy1, dy2):
        step = ctx.step
        top = step.run.top if step is not None else None
        if top is None or top[0] != step.index:
            raise StateError("meft: the reversible backward walks the blocks down once per forward; a second backward "
                             "through the same graph (retain_graph) is not supported, run the forward again")
        x1, x2, dx1, dx2, dparams = step.backward(top[1], top[2], dy1, dy2)
        # the streams switch between blocks: block n's (x1, x2) are block n-1's (y2, y1)
        step.run.top = (step.index - 1, x2, x1) if step.index > 0 else None
        ctx.step = None
        return (None, dx1, dx2, None, *dparams)


# ---- method protocol -------------------------------------------------------------------------------

Config = MeftConfig


def find_blocks(stack: nn.Module, count: int) -> list:
    for _, module in stack.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return list(module)
    raise TargetError(f"meft makes the transformer blocks reversible, but {type(stack).__name__} has no list of "
                      f"{count} blocks (num_hidden_layers)")


def make_model_adapter(model: nn.Module, config: MeftConfig) -> ReversibleStack:
    stack = backbone(model)
    settings = getattr(stack, "config", None)
    settings = settings.get_text_config() if hasattr(settings, "get_text_config") else settings
    if settings is None or not all(hasattr(settings, k) for k in ("hidden_size", "num_hidden_layers")):
        raise TargetError(f"meft makes a transformers model's blocks reversible, so it needs hidden_size and "
                          f"num_hidden_layers in its config; {type(stack).__name__} has none")
    blocks = find_blocks(stack, settings.num_hidden_layers)
    weight = next(stack.parameters())
    factory = {"device": weight.device, "dtype": weight.dtype if weight.dtype.is_floating_point else torch.float32}
    return ReversibleStack(blocks, settings.hidden_size, config, activation_of(settings), factory)


def activation_of(settings):
    name = getattr(settings, "hidden_act", None) or getattr(settings, "activation_function", None)
    try:
        from transformers.activations import ACT2FN

        return ACT2FN[name] if isinstance(name, str) else F.gelu
    except (ImportError, KeyError):
        return F.gelu
