"""LoRAHub: weights for a hub of LoRA adapters, learned from a few examples without gradients.

LoraHub (Huang et al., 2023, "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA
Composition", arXiv:2307.13269) starts from many LoRAs trained on other tasks and, given a handful
of examples of a new task, searches one scalar weight per adapter so that their combination has a
low loss on the examples. The search is gradient-free (nevergrad's ``NGOpt``, which picks CMA-ES or
a related strategy for the budget and dimension), bounded to ``[-1.5, 1.5]`` and started at 0, and
its objective is the examples' loss plus an L1 penalty that keeps the weights sparse. Each step
costs one forward pass over the examples, no backward pass and no optimizer state, so a hub of
adapters can be tried on a model that could not be fine-tuned on the same hardware.

Which combination. The paper's code adds the A factors and the B factors separately,
``(Σ w_i B_i)(Σ w_i A_i)``; that product holds cross terms ``w_i w_j B_i A_j`` that belong to no
adapter, weights act quadratically (``w = -1`` on one adapter gives it back, not its negation), and
it needs every adapter to have the same rank at the same layers. Here the default,
``space="update"``, combines the adapters' true updates, ``Σ w_i ΔW_i`` (task arithmetic, the same
sum ``peftlab.combine(..., method="linear")`` makes, exact: factors stacked, rank ``Σ r_i``), so a
weight means what it says and any weight-update adapter (rsLoRA, DoRA, different ranks) can sit in
the hub. ``space="factor"`` reproduces the paper's element-wise sum for those who want its numbers.

The objective is ``loss + l1 · mean_i |w_i|``: the authors' code divides the L1 sum by the number
of adapters, and their default ``0.05`` is meant for that form. The loss is the causal-LM loss of
the targets given the inputs (``train/loss.py``), averaged over target tokens.

The result is a plain LoRA adapter ``name`` on the model (scale 1, per-layer ranks), active and
frozen; ``out`` saves it (HF PEFT's format) with ``lorahub.json`` beside it.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError

SPACES = ("update", "factor")


@dataclass
class LoraHubResult:
    """The adapter made (``name``), the hub's adapter names and their learned ``weights``, the
    objective at those weights (``loss`` of the examples, ``objective`` with the penalty), the
    examples' loss of the base model, and each evaluation's objective in order (``history``)."""

    name: str
    adapters: list
    weights: list
    loss: float
    objective: float
    base_loss: float
    space: str
    history: list = field(default_factory=list)


def lorahub(model: nn.Module, hub: list, examples, budget: int = 40, l1: float = 0.05, seed: int = 0,
            name: str = "lorahub", *, tokenizer=None, space: str = "update", bound: float = 1.5,
            batch_size: int = 8, out=None) -> LoraHubResult:
    """Learn one weight per adapter of ``hub`` (names of adapters attached to ``model``, or adapter
    folders, loaded here) from ``examples`` with ``budget`` forward passes, and attach the combination
    as adapter ``name`` (active). ``examples``: ``(input, target)`` text pairs (with ``tokenizer``),
    or tokenized rows / batches with ``input_ids`` and ``labels``. See the module docstring."""
    ng = _nevergrad()
    check_arguments(hub, budget, l1, space, bound, batch_size)
    import peftlab
    from ..core.state import get_state

    state = get_state(model)
    if state is not None and name in state.configs:
        raise ConfigError(f"the model already has an adapter named {name!r}; choose another name for the LoRAHub result")
    batches = example_batches(examples, tokenizer, batch_size)
    names = resolve_hub(model, hub)
    previous = list(get_state(model).active)
    updates = hub_updates(model, names, space)
    ranks = {module: _rank(factors, space) for module, factors in updates.items()}
    attach_plain_lora(model, name, ranks)
    try:
        result = search(ng, model, name, names, updates, batches, budget, l1, seed, space, bound)
    except BaseException:
        peftlab.delete(model, name)  # a failed search leaves the model as it was
        peftlab.set_active(model, previous)
        raise
    if out is not None:
        folder = peftlab.save(model, out, name=name)
        report = {k: v for k, v in asdict(result).items() if k != "history"}
        report.update(budget=budget, l1=l1, seed=seed, bound=bound)
        (Path(folder) / "lorahub.json").write_text(json.dumps(report, indent=2) + "\n")
    return result


def search(ng, model, name, names, updates, batches, budget, l1, seed, space, bound) -> LoraHubResult:
    """NGOpt over the weights in [-bound, bound], started at 0; the combination at the recommended
    weights is left in adapter ``name``."""
    base_loss = examples_loss(model, batches, disabled=True)
    history = []

    def objective(weights) -> float:
        set_combination(model, name, updates, [float(w) for w in weights], space)
        value = examples_loss(model, batches) + l1 * float(sum(abs(w) for w in weights)) / len(weights)
        history.append(value if math.isfinite(value) else float("inf"))
        return history[-1]

    parametrization = ng.p.Array(init=[0.0] * len(names), lower=-bound, upper=bound)
    parametrization.random_state.seed(seed)
    optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=budget, num_workers=1)
    with warnings.catch_warnings():  # nevergrad's inner optimizers (COBYLA, CMA) warn about their own defaults
        warnings.simplefilter("ignore", UserWarning)
        recommendation = optimizer.minimize(objective)
    weights = [float(w) for w in recommendation.value]
    set_combination(model, name, updates, weights, space)
    loss = examples_loss(model, batches)
    penalty = l1 * sum(map(abs, weights)) / len(weights)
    return LoraHubResult(name, names, weights, loss, loss + penalty, base_loss, space, history)


def check_arguments(hub, budget, l1, space, bound, batch_size) -> None:
    if isinstance(hub, (str, Path)) or not hub:
        raise ConfigError(f"hub must be a list of adapter names or folders (at least one), got {hub!r}")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ConfigError(f"budget is the number of loss evaluations the search may make: a positive integer, got {budget!r}")
    if not isinstance(l1, (int, float)) or isinstance(l1, bool) or not l1 >= 0:
        raise ConfigError(f"l1 (the penalty on the mean absolute weight) must be a number >= 0, got {l1!r}")
    if space not in SPACES:
        raise ConfigError(f"space must be 'update' (Σ w_i ΔW_i, the default) or 'factor' (the paper's "
                          f"(Σ w_i B_i)(Σ w_i A_i)), got {space!r}")
    if not isinstance(bound, (int, float)) or isinstance(bound, bool) or not bound > 0:
        raise ConfigError(f"bound (weights are searched in [-bound, bound]) must be a positive number, got {bound!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")


def resolve_hub(model: nn.Module, hub: list) -> list[str]:
    """Adapter names for the hub's entries: attached names as they are, folders loaded under their
    folder's name (made unique)."""
    import peftlab
    from ..core.state import get_state

    names = []
    for entry in hub:
        state = get_state(model)
        known = state.configs if state is not None else {}
        if isinstance(entry, str) and entry in known:
            names.append(entry)
            continue
        path = Path(entry)
        if not (path / "adapter_config.json").is_file():
            raise ConfigError(f"hub entry {str(entry)!r} is neither an adapter of this model ({sorted(known) or 'none'}) "
                              "nor an adapter folder (no adapter_config.json); attach or save the adapters first")
        base = "".join(c if c.isalnum() or c in "-_" else "_" for c in path.resolve().name) or "hub"
        adapter, count = base, 1
        while adapter in known:
            count += 1
            adapter = f"{base}_{count}"
        peftlab.load(model, path, name=adapter)
        names.append(adapter)
    if len(set(names)) != len(names):
        raise ConfigError(f"the hub lists an adapter twice: {names}")
    return names


def example_batches(examples, tokenizer, batch_size: int) -> list[dict]:
    """``examples`` as padded batches with ``labels`` (-100 on the inputs and padding)."""
    from ..train.data import CausalLMData, pad_collate, pad_id_of

    if isinstance(examples, dict):
        examples = [examples]
    examples = list(examples) if examples is not None else []
    if not examples:
        raise ConfigError("LoRAHub needs a few examples of the new task: (input, target) pairs or tokenized rows")
    if all(isinstance(e, (tuple, list)) and len(e) == 2 and all(isinstance(t, str) for t in e) for e in examples):
        if tokenizer is None:
            raise ConfigError("examples are (input, target) text pairs: pass tokenizer= to turn them into tokens")
        data = CausalLMData(tokenizer, [{"prompt": i, "response": t} for i, t in examples], max_length=1024)
        rows, pad_id = [data[i] for i in range(len(data))], pad_id_of(tokenizer)
    elif all(isinstance(e, dict) and "input_ids" in e and "labels" in e for e in examples):
        if all(torch.as_tensor(e["input_ids"]).dim() == 2 for e in examples):
            return [dict(e) for e in examples]  # already batches
        rows, pad_id = examples, 0
    else:
        raise ConfigError("examples must be (input, target) string pairs, or dicts with input_ids and labels "
                          f"(tokenized rows or batches); got {type(examples[0]).__name__} items")
    return [pad_collate(rows[i:i + batch_size], pad_id) for i in range(0, len(rows), batch_size)]


def examples_loss(model: nn.Module, batches: list[dict], disabled: bool = False) -> float:
    """Mean causal-LM loss over the batches' target tokens (the base model's when ``disabled``)."""
    import contextlib

    import peftlab
    from ..train.loss import training_loss

    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), (peftlab.disabled(model) if disabled else contextlib.nullcontext()):
            for batch in batches:
                batch = {k: torch.as_tensor(v).to(device) for k, v in batch.items()}
                tokens = int((batch["labels"][:, 1:] != -100).sum())
                if tokens:
                    total += float(training_loss(model, batch)) * tokens
                    count += tokens
    finally:
        model.train(was_training)
    if not count:
        raise ConfigError("the examples have no target tokens to score (every label is -100); give each a target")
    return total / count


# ---- the combination ---------------------------------------------------------------------------

def hub_updates(model: nn.Module, names: list[str], space: str) -> dict:
    """``{module name: [LowRank or None per hub adapter]}``, each adapter's update at each layer."""
    from . import algebra
    from .combining import updates_of

    layers = {}
    for i, adapter in enumerate(names):
        for module_name, update in updates_of(model, adapter).items():
            if not isinstance(update, algebra.LowRank):
                if space == "factor":
                    raise ConfigError(f"space='factor' sums LoRA factors, but {adapter!r} has a dense update at {module_name} "
                                      "(DoRA, (IA)^3, ...); use space='update'")
                update = algebra.factorize(update.double())[0]  # exact: float64 SVD at its numerical rank
            layers.setdefault(module_name, [None] * len(names))[i] = update
    if not layers:
        raise ConfigError(f"the hub's adapters {names} adapt no linear layer; LoRAHub combines weight updates")
    if space == "factor":
        for module_name, updates in layers.items():
            ranks = {u.rank if u is not None else None for u in updates}
            if len(ranks) != 1 or None in ranks:
                raise ConfigError(f"space='factor' adds A and B factors entry by entry, so every adapter needs the same rank "
                                  f"at the same layers; at {module_name} they have {sorted(map(str, ranks))}; use space='update'")
    return layers


def _rank(updates: list, space: str) -> int:
    present = [u.rank for u in updates if u is not None]
    return present[0] if space == "factor" else sum(present)


def set_combination(model: nn.Module, name: str, layers: dict, weights: list[float], space: str) -> None:
    """Write the hub's combination at ``weights`` into adapter ``name``'s factors."""
    with torch.no_grad():
        for module_name, updates in layers.items():
            adapter = model.get_submodule(module_name).adapters[name]
            present = [(u, w) for u, w in zip(updates, weights) if u is not None]
            if space == "factor":
                B = sum(w * u.B for u, w in present)
                A = sum(w * u.A for u, w in present)
            else:
                B = torch.cat([w * u.B for u, w in present], dim=1)
                A = torch.cat([u.A for u, _ in present], dim=0)
            adapter.lora_B.weight.copy_(B)
            adapter.lora_A.weight.copy_(A)


def attach_plain_lora(model: nn.Module, name: str, ranks: dict) -> None:
    """A plain LoRA ``name`` at the modules of ``ranks`` with those ranks and scale 1 (alpha = r),
    active and frozen (a combination is a result, not something to train by accident)."""
    import peftlab
    from ..core.adapters import all_adapters
    from ..methods.lora import LoraConfig

    top = max(ranks.values())
    config = LoraConfig(r=top, alpha=top, targets=sorted(ranks), rank_pattern=dict(ranks),
                        alpha_pattern={k: float(v) for k, v in ranks.items()})
    peftlab.attach(model, config, name=name)
    peftlab.set_active(model, name)
    for _, adapter in all_adapters(model, name):
        for p in adapter.parameters():
            p.requires_grad_(False)


def _nevergrad():
    try:
        import nevergrad
    except ImportError:
        raise ConfigError("LoRAHub searches its weights with nevergrad, which is not installed: "
                          "pip install 'peftlab[compose]' (or nevergrad)") from None
    return nevergrad



# ---- peftlab lorahub ---------------------------------------------------------------------------

def add_parser(commands) -> None:
    hub = commands.add_parser(
        "lorahub", help="weights for a hub of LoRA adapters from a few examples, without gradients (LoraHub)",
        description="Load the adapters onto their base model, search one weight per adapter with nevergrad's NGOpt so "
                    "that their combination has a low loss on the examples (plus an L1 penalty), and save the "
                    "combination as a plain Hugging Face PEFT LoRA with lorahub.json (the weights) beside it.")
    hub.add_argument("adapters", nargs="+", metavar="DIR", help="adapter folders (the hub)")
    hub.add_argument("--examples", required=True, metavar="FILE",
                     help="a few examples of the new task: a JSONL/JSON/CSV/TSV file with input and target columns")
    hub.add_argument("--input-key", default="input", help="column of the inputs (default: input)")
    hub.add_argument("--target-key", default="output", help="column of the targets (default: output)")
    hub.add_argument("--budget", type=int, default=40, help="loss evaluations the search may make (default: 40)")
    hub.add_argument("--l1", type=float, default=0.05, help="penalty on the mean absolute weight (default: 0.05)")
    hub.add_argument("--seed", type=int, default=0, help="the search's seed (default: 0)")
    hub.add_argument("--space", default="update", choices=SPACES,
                     help="update (default): Σ w_i ΔW_i; factor: the paper's (Σ w_i B_i)(Σ w_i A_i)")
    hub.add_argument("--out", required=True, metavar="DIR", help="folder for the combined adapter")
    hub.add_argument("--model", help="base model (default: the one the adapters name)")
    hub.set_defaults(func=run)


def run(args) -> int:
    from ..formats.files import read_json
    from ..models import load_model
    from ..train.data import load_rows, require_columns

    folders = [Path(a) for a in args.adapters]
    out = Path(args.out)
    if any(out.resolve() == f.resolve() for f in folders):
        raise ConfigError("--out must be a new folder, not one of the adapters'")
    for folder in folders:
        if not (folder / "adapter_config.json").is_file():
            raise ConfigError(f"{folder} is not an adapter folder (no adapter_config.json); give folders written by "
                              "peftlab.save or peft")
    rows = load_rows(args.examples)
    require_columns(rows, [args.input_key, args.target_key])
    bases = sorted({b for b in (read_json(f / "adapter_config.json").get("base_model_name_or_path") for f in folders) if b})
    if not args.model and len(bases) != 1:
        raise ConfigError(f"the adapters name {'no base model' if not bases else 'different base models: ' + ', '.join(bases)}"
                          "; pass --model")
    print(f"loading {args.model or bases[0]} and {len(folders)} adapters")
    model, tokenizer = load_model(args.model or bases[0])
    examples = [(str(r[args.input_key]), str(r[args.target_key])) for r in rows]
    result = lorahub(model, folders, examples, budget=args.budget, l1=args.l1, seed=args.seed, tokenizer=tokenizer,
                     space=args.space, out=out)
    for name, weight in zip(result.adapters, result.weights):
        print(f"  {weight:+.3f}  {name}")
    print(f"examples' loss {result.loss:.4f} (base model {result.base_loss:.4f}) after {len(result.history)} evaluations")
    print(f"saved {out} (a plain Hugging Face PEFT LoRA) and {out / 'lorahub.json'}")
    return 0
