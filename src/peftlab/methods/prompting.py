"""What the soft-prompt family shares: virtual tokens in front of the user's sequence.

Prompt tuning and P-tuning prepend ``n`` trainable vectors to the input embeddings
(``InputPrompt``); prefix tuning and P-tuning v2 put ``n`` trainable keys and values in front of
every attention layer through the KV cache (``KVPrefix``). Both are model-level adapters
(``core/model_adapters.py``): they rewrite the keyword inputs of the model's backbone (the
decoder or encoder stack under the head) and, for input prompts, its output. Not registered: the
methods live in ``prompt_tuning.py``, ``ptuning.py``, ``prefix.py`` and ``ptuning_v2.py``.

Either way the backbone sees ``n`` more positions than the user gave it, and the bookkeeping is
the same for a training forward, a forward with a KV cache and every step of ``generate``:

- the attention mask gets ``n`` ones in front (the virtual tokens are never padding);
- the user's tokens sit at positions ``n, n+1, ...``: explicit ``position_ids`` (which ``generate``
  computes from the mask, so left-padded rows start at 0; transformers 5 passes no
  ``cache_position``) are shifted by ``n``, and prepended tokens take the ``n`` positions in front
  (``0..n-1``); without ``position_ids`` the model counts them itself, from the cache length;
- a call *starts a sequence* when there is no cache, or the cache is empty or was not filled with
  this adapter's virtual tokens yet; only then are the virtual tokens added (prepended
  embeddings, or prefix keys and values written into the cache). Later calls (decoding steps)
  only lengthen the mask and shift the positions, since the cache holds the virtual tokens;
- the hidden states of prepended embeddings are dropped from the backbone's output, so the head,
  the labels, the loss and ``generate`` see the user's sequence only. (A BERT pooler has already
  read position 0, a virtual token, as in HF PEFT.)
- in training under gradient checkpointing, where transformers hands its layers no cache, prefixes
  travel in a cache the layers may keep (``PrefixOnlyCache``, below).

Saving writes the final virtual tokens (``prompt_embeddings``, HF PEFT's name and layout), never
the reparameterization networks that produced them; ``fold`` does the same in memory.
"""
from __future__ import annotations

import functools
import weakref

import torch
from torch import nn

from ..core import kv_cache, model_adapters
from ..errors import AdapterFormatError, ConfigError, IncompatibleBaseError, StateError, TargetError

# The registry tests' tiny models, with weights at a pretrained model's scale: at the default
# initializer_range of 0.02 attention is uniform over a random 2-layer model, and virtual tokens can
# only shift every position's output alike (HF PEFT's prompt tuning plateaus there just the same).
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}
SAVED_KEY = "prompt_embeddings"  # HF PEFT's tensor name for every prompt-learning method
HOLDERS_ATTR = "_peftlab_virtual_token_holders"  # on a KV cache: the adapters whose tokens it holds
CHECKPOINTED_LAYERS_ATTR = "_peftlab_checkpointed_layers"  # on a backbone: its layers that may keep a PrefixOnlyCache


# ---- settings and the model ------------------------------------------------------------------------

def check_length(config) -> None:
    """Every soft-prompt method's ``length``: how many virtual tokens."""
    if not isinstance(config.length, int) or isinstance(config.length, bool) or config.length <= 0:
        raise ConfigError(f"{config.method}: length (the number of virtual tokens) must be a positive integer, "
                          f"got {config.length!r}")


def input_embeddings(backbone: nn.Module, method: str) -> nn.Module:
    """The token embedding table the backbone looks its ``input_ids`` up in."""
    get = getattr(backbone, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if embeddings is None or getattr(embeddings, "weight", None) is None or embeddings.weight.dim() != 2:
        raise TargetError(f"{method} prepends vectors to the input embeddings, so it needs a model whose backbone has "
                          f"get_input_embeddings() and accepts inputs_embeds (a transformers model); "
                          f"{type(backbone).__name__} has no token embedding table")
    return embeddings


def backbone_config(backbone: nn.Module, method: str):
    config = getattr(backbone, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers"):
        raise TargetError(f"{method} writes keys and values into every layer's KV cache, so it needs a transformers "
                          f"model (it reads the layer and head counts from model.config); {type(backbone).__name__} "
                          "has no such config")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


class PrefixShape:
    """How many layers, key/value heads and head dimensions a prefix covers (from the model config)."""

    def __init__(self, config):
        self.layers = config.num_hidden_layers
        heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.width = self.kv_heads * self.head_dim  # one layer's keys (or values) for one token
        self.flat = self.layers * 2 * self.width  # one virtual token's keys and values, all layers


# ---- pure math -----------------------------------------------------------------------------------

def repeat_to_length(ids: list, length: int) -> list:
    """``ids`` repeated or truncated to exactly ``length`` entries (text-initialized prompts)."""
    return (ids * -(-length // len(ids)))[:length]


def split_prefix(flat: torch.Tensor, shape: PrefixShape) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """HF PEFT's flat prefix (tokens x layers*2*kv_heads*head_dim) as one (keys, values) pair per
    layer, each (kv_heads x tokens x head_dim)."""
    per_layer = flat.view(flat.shape[0], shape.layers, 2, shape.kv_heads, shape.head_dim).permute(1, 2, 3, 0, 4)
    return [(layer[0], layer[1]) for layer in per_layer]


def lengthen_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    """A 2D attention mask with ``length`` ones (the virtual tokens) in front."""
    if mask.dim() != 2:
        raise StateError(f"soft prompts and prefixes need a 2D attention mask (batch x tokens), got {mask.dim()}D; "
                         "static caches (cache_implementation='static') and custom 4D masks are not supported")
    return torch.cat([mask.new_ones(mask.shape[0], length), mask], dim=1)


def shift_positions(position_ids: torch.Tensor, length: int, *, prepend: bool) -> torch.Tensor:
    """The user's positions moved ``length`` places on; with ``prepend``, the ``length`` positions
    they made room for in front of each row (``0..length-1`` unless another adapter shifted them)."""
    shifted = position_ids + length
    if not prepend:
        return shifted
    front = torch.arange(length, device=position_ids.device, dtype=position_ids.dtype)
    return torch.cat([position_ids.amin(-1, keepdim=True) + front, shifted], dim=-1)


def prepend_zeros(token_types: torch.Tensor, length: int) -> torch.Tensor:
    """Token type ids with ``length`` zeros (the virtual tokens' segment) in front."""
    return torch.cat([token_types.new_zeros(token_types.shape[0], length), token_types], dim=1)


def update(kwargs: dict, key: str, change, *args, **settings) -> None:
    """``kwargs[key] = change(kwargs[key], ...)`` where the call passed that input."""
    if kwargs.get(key) is not None:
        kwargs[key] = change(kwargs[key], *args, **settings)


def batch_size(kwargs: dict) -> int:
    for key in ("input_ids", "inputs_embeds"):
        if kwargs.get(key) is not None:
            return kwargs[key].shape[0]
    raise StateError("the model was called without input_ids or inputs_embeds")


# ---- KV caches ---------------------------------------------------------------------------------

def starts_sequence(cache, adapter: nn.Module) -> bool:
    """True when this call must add ``adapter``'s virtual tokens: no cache, an empty one, or one
    that does not hold them yet."""
    if cache is None or cache.get_seq_length() == 0:
        return True
    return adapter not in getattr(cache, HOLDERS_ATTR, ())


def remember(cache, adapter: nn.Module) -> None:
    """Mark ``cache`` as holding ``adapter``'s virtual tokens (read by ``starts_sequence``)."""
    if cache is None or not hasattr(cache, "get_seq_length"):
        return
    holders = getattr(cache, HOLDERS_ATTR, None)
    if holders is None:
        holders = weakref.WeakSet()
        setattr(cache, HOLDERS_ATTR, holders)
    holders.add(adapter)


# ---- gradient checkpointing ----------------------------------------------------------------------
# transformers checkpoints each decoder layer in training and hands it no KV cache: the
# layer runs twice (forward, then again in backward) and a cache that it writes to would give the
# second run other keys than the first. Layers that only *read* the cache may keep it
# (``_can_checkpoint_with_cache``). So a prefix trained under checkpointing travels in a cache that
# holds the prefixes and stores nothing else, and the layers are told they may keep exactly that cache.

def checkpointed_training(backbone: nn.Module) -> bool:
    return backbone.training and bool(getattr(backbone, "gradient_checkpointing", False))


@functools.cache
def prefix_only_cache() -> type:
    """The ``PrefixOnlyCache`` class (made on first use, so importing peftlab does not import transformers)."""
    from transformers import DynamicCache

    class PrefixOnlyCache(DynamicCache):
        """A KV cache that holds prefixes only: ``update`` returns the prefix followed by the layer's
        own keys and values and stores nothing, so every run of a layer sees the same keys."""

        def hold(self, keys: torch.Tensor, values: torch.Tensor, layer: int) -> None:
            DynamicCache.update(self, keys, values, layer)

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            held = self.layers[layer_idx]
            return torch.cat([held.keys, key_states], dim=-2), torch.cat([held.values, value_states], dim=-2)

    return PrefixOnlyCache


def let_layers_keep_prefix_caches(backbone: nn.Module) -> None:
    """For the backbone call under way, whose cache is a ``PrefixOnlyCache``: every checkpointed layer
    may keep it. Set on the layers themselves, because transformers reads the setting before the
    layer's own hooks run (in ``__call__`` before 5.23); taken back when the call ends, by a hook on
    the backbone that runs even when the call fails, so no other call ever sees it."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = backbone.__dict__.get(CHECKPOINTED_LAYERS_ATTR)
    if layers is None:
        layers = [m for m in backbone.modules() if isinstance(m, GradientCheckpointingLayer)]
        backbone.__dict__[CHECKPOINTED_LAYERS_ATTR] = layers
        backbone.register_forward_hook(_close_layers_to_caches, always_call=True)
    for layer in layers:
        layer._can_checkpoint_with_cache = True


def _close_layers_to_caches(backbone: nn.Module, args, output) -> None:
    for layer in backbone.__dict__[CHECKPOINTED_LAYERS_ATTR]:
        layer.__dict__.pop("_can_checkpoint_with_cache", None)  # back to the layer class's own setting


def drop_leading(output, length: int):
    """The backbone's output without the first ``length`` positions of its hidden states."""
    if not length:
        return output
    if isinstance(output, tuple):
        return (output[0][:, length:], *output[1:])
    output.last_hidden_state = output.last_hidden_state[:, length:]
    if getattr(output, "hidden_states", None) is not None:
        output.hidden_states = tuple(h[:, length:] for h in output.hidden_states)
    return output


# ---- the two kinds of model-level adapter --------------------------------------------------------

class InputPrompt(nn.Module):
    """``length`` vectors prepended to the input embeddings; subclasses say what they are (``prompt()``)."""

    def __init__(self, backbone: nn.Module, length: int):
        super().__init__()
        self.length = length
        self.__dict__["_backbone"] = backbone  # a plain reference, not a submodule

    def prompt(self) -> torch.Tensor:
        """The virtual tokens' embeddings, (length x hidden)."""
        raise NotImplementedError

    def batch_prompt(self, rows: int) -> torch.Tensor:
        """The virtual tokens of each of ``rows`` rows, (rows x length x hidden): ``prompt()`` for every
        row, unless a method gives rows prompts of their own (multitask prompt tuning)."""
        return self.prompt().expand(rows, -1, -1)

    def rewrite_inputs(self, kwargs: dict):
        kwargs = dict(kwargs)
        update(kwargs, "attention_mask", lengthen_mask, self.length)
        if not starts_sequence(kwargs.get(kv_cache.keyword(self._backbone)), self):
            update(kwargs, "position_ids", shift_positions, self.length, prepend=False)
            return kwargs, 0
        embeds = kwargs.pop("inputs_embeds", None)
        ids = kwargs.pop("input_ids", None)
        if embeds is None:
            if ids is None:
                raise StateError("the model was called without input_ids or inputs_embeds")
            embeds = self._backbone.get_input_embeddings()(ids)
        prompt = self.batch_prompt(embeds.shape[0]).to(embeds.dtype)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        update(kwargs, "position_ids", shift_positions, self.length, prepend=True)
        update(kwargs, "token_type_ids", prepend_zeros, self.length)
        return kwargs, self.length

    def rewrite_output(self, output, prepended: int):
        remember(kv_cache.from_output(output), self)
        return drop_leading(output, prepended)


class KVPrefix(nn.Module):
    """``length`` keys and values in front of every attention layer; subclasses give them (``prefix()``)
    in HF PEFT's flat layout (length x layers*2*kv_heads*head_dim)."""

    def __init__(self, backbone: nn.Module, length: int, shape: PrefixShape):
        super().__init__()
        self.length = length
        self.shape = shape
        self.__dict__["_backbone"] = backbone

    def prefix(self) -> torch.Tensor:
        raise NotImplementedError

    def rewrite_inputs(self, kwargs: dict):
        kwargs = dict(kwargs)
        keyword = kv_cache.keyword(self._backbone)
        cache = kwargs.get(keyword)
        if checkpointed_training(self._backbone) and not isinstance(cache, prefix_only_cache()):
            cache = prefix_only_cache()(config=self._backbone.config)  # the layers would drop any other cache
        if isinstance(cache, prefix_only_cache()):
            let_layers_keep_prefix_caches(self._backbone)
        if starts_sequence(cache, self):
            kwargs[keyword] = self.fill(cache, batch_size(kwargs))
        update(kwargs, "attention_mask", lengthen_mask, self.length)
        update(kwargs, "position_ids", shift_positions, self.length, prepend=False)
        return kwargs, None

    def fill(self, cache, batch: int):
        """Append the prefix to every layer of ``cache`` (a new ``DynamicCache`` when None)."""
        from transformers import DynamicCache

        if cache is None:
            cache = DynamicCache(config=self._backbone.config)
        dtype = self._backbone.get_input_embeddings().weight.dtype
        write = cache.hold if isinstance(cache, prefix_only_cache()) else cache.update
        for layer, (keys, values) in enumerate(split_prefix(self.prefix().to(dtype), self.shape)):
            write(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), layer)
        return cache

    def rewrite_output(self, output, note):
        remember(kv_cache.from_output(output), self)
        return output


# ---- folding and the saved form --------------------------------------------------------------------

class Folding:
    """For adapters trained through a reparameterization network (prefix tuning's MLP, P-tuning's
    prompt encoder): ``final()`` computes the virtual tokens, ``fold()`` replaces the network by
    them (same outputs, fewer parameters), and the saved form is always the folded one."""

    def final(self) -> torch.Tensor:
        raise NotImplementedError

    def network_names(self) -> tuple:
        """Attribute names of the parameters and modules that ``fold`` removes."""
        raise NotImplementedError

    @property
    def folded(self) -> bool:
        return SAVED_KEY in self._parameters

    def fold(self) -> None:
        if self.folded:
            return
        with torch.no_grad():
            value = self.final().detach().clone()
        trainable = any(p.requires_grad for p in self.parameters())
        for name in self.network_names():
            delattr(self, name)
        self.register_parameter(SAVED_KEY, nn.Parameter(value, requires_grad=trainable))

    def export_state(self) -> dict:
        return {SAVED_KEY: self.final().detach()}

    def import_state(self, tensors: dict) -> None:
        """Load a saved (folded) adapter: the network is dropped and the saved tokens used as they are."""
        value = check_saved(tensors, self.final().shape, type(self).__name__)
        self.fold()
        with torch.no_grad():
            getattr(self, SAVED_KEY).copy_(value)


def check_saved(tensors: dict, shape, what: str) -> torch.Tensor:
    """The saved ``prompt_embeddings`` tensor, checked to have ``shape``."""
    if set(tensors) != {SAVED_KEY}:
        raise AdapterFormatError(f"a saved {what} holds exactly one tensor, '{SAVED_KEY}'; found {sorted(tensors)}")
    value = tensors[SAVED_KEY]
    if tuple(value.shape) != tuple(shape):
        raise IncompatibleBaseError(f"the saved {SAVED_KEY} is {tuple(value.shape)}, but this model and config need "
                                    f"{tuple(shape)} (virtual tokens x width): it was saved for another base model")
    return value


def fold(model: nn.Module, name: str = "default") -> None:
    """Replace the reparameterization networks of adapter ``name`` (prefix tuning's MLP, P-tuning's
    prompt encoder) by the virtual tokens they compute: the outputs stay the same, the network's
    parameters are gone, and training goes on (if at all) on the tokens directly."""
    for _, _, module in model_adapters.model_adapters(model, name):
        if isinstance(module, Folding):
            module.fold()
