"""The ``peftlab`` command line.

    peftlab train                      # the built-in job: SmolLM2-135M + LoRA on the extract task
    peftlab train --data my.jsonl --prompt-key question --response-key answer --steps 200
    peftlab train --config run.yaml    # every option can come from a YAML/JSON file; flags override it
    peftlab generate --adapter runs/demo/adapter "To JSON: Ana Diaz paid $40 to Acme Corp on 2 May 2024."
    peftlab info runs/demo/adapter     # method, base, ranks, targets, parameters (no model load)
    peftlab merge runs/demo/adapter --out runs/demo/merged
    peftlab methods                    # the method registry

Errors peftlab raises on purpose (a bad option, a missing file, a wrong base model) print one
line, ``error: ...``, and exit with status 2.
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import random
import re
import struct
import sys
import time
import warnings
from importlib import import_module
from pathlib import Path

from .errors import ConfigError, PeftlabError

DEFAULT_METHOD = "lora[r=8,alpha=16,targets=all-linear]"
PROMPT_FILE = "peftlab_prompt.json"  # next to adapter_config.json: how the adapter expects to be prompted

# One table for every `train` option: the argparse flags, the config-file keys and the defaults.
# (name, type, default, help). Types: str, int, float, bool, "method" (a spec string or a dict).
TRAIN_OPTIONS = [
    ("out", str, "runs/demo", "output folder: adapter/, metrics.json, checkpoint/"),
    ("model", str, "smollm2-135m", "base model: smollm2-135m, minilm, a local folder or a Hugging Face name"),
    ("quantize", str, None, "quantize the base's linear layers first: nf4 or fp4 (4-bit: QLoRA), int8, or int4 "
                            "(group-wise, for qalora); a LoRA with init=loftq gets its LoftQ init here"),
    ("double_quant", bool, True, "with --quantize nf4/fp4: quantize the 4-bit blocks' scales too (QLoRA)"),
    ("quantize_embeddings", bool, False, "with --quantize: the input embeddings and the output head too (a tied head "
                                         "shares their quantized table)"),
    ("method", "method", DEFAULT_METHOD, "adapter spec, e.g. 'lora[r=16,alpha=32,targets=[q_proj,v_proj]]'"),
    ("task", str, "causal-lm", "causal-lm (prompt -> response) or sequence-classification (text -> label)"),
    ("data", str, None, "training rows: a .jsonl/.json/.csv/.tsv file or a Hugging Face dataset name "
                        "(default: peftlab's built-in extract task)"),
    ("eval_data", str, None, "held-out rows (default: --eval-rows rows split off --data)"),
    ("eval_split", str, "test", "split of a Hugging Face --eval-data"),
    ("eval_rows", int, 50, "held-out rows to evaluate before and after training (0 = no evaluation)"),
    ("train_rows", int, 2000, "rows of the built-in task to generate"),
    ("prompt_key", str, "prompt", "column holding the prompt (causal-lm)"),
    ("response_key", str, "response", "column holding the response (causal-lm)"),
    ("text_key", str, "text", "column holding the text (sequence-classification)"),
    ("label_key", str, "label", "column holding the label (sequence-classification)"),
    ("system", str, None, "system message for chat models (default for the built-in task: its own short one)"),
    ("max_length", int, 256, "cut training sequences at this many tokens"),
    ("steps", int, 50, "optimizer steps"),
    ("lr", float, 3e-3, "peak learning rate (AdamW)"),
    ("batch_size", int, 4, "rows per forward pass"),
    ("grad_accum", int, 1, "forward passes per optimizer step"),
    ("warmup_steps", int, 5, "linear warmup steps"),
    ("schedule", str, "cosine", "learning-rate decay after warmup: cosine, linear or constant"),
    ("weight_decay", float, 0.0, "AdamW weight decay on adapter matrices"),
    ("max_grad_norm", float, 1.0, "clip the gradient norm (0 = off)"),
    ("eval_every", int, 0, "also evaluate every N steps during training (0 = only before and after)"),
    ("save_every", int, 0, "write a resumable checkpoint every N steps (0 = only at the end)"),
    ("seed", int, 0, "seed for the data, the split, the adapter init and the data order"),
    ("resume", bool, False, "continue from <out>/checkpoint if there is one"),
    ("device", str, "auto", "auto, cpu, cuda, cuda:1, mps"),
    ("strategy", str, "ddp", "with --nproc or under torchrun: ddp (each process holds the whole model) or fsdp "
                             "(FSDP2: every weight sharded across the processes)"),
    ("nproc", int, 1, "data-parallel processes on this machine, started through torchrun (gloo on CPU, nccl on "
                      "GPU; batch-size is per process); under torchrun itself this is ignored"),
    ("backend", str, "local", "local (this machine: one process, or --nproc through torchrun) or ray (--workers "
                              "processes placed by Ray Train on a Ray cluster; needs peftlab[dist])"),
    ("workers", int, 2, "with --backend ray: training processes (Ray Train workers; batch-size is per worker)"),
    ("cpus_per_worker", int, 1, "with --backend ray: CPUs each worker reserves and uses as torch threads"),
    ("address", str, None, "with --backend ray: the Ray cluster to join (default: RAY_ADDRESS if set, else a local "
                           "Ray started for this run)"),
    ("chunked_loss", bool, True, "causal LMs: compute the head and loss in blocks of rows, never the full logits"),
    ("gradient_checkpointing", bool, False, "recompute each layer's activations in the backward pass instead of "
                                            "keeping them: less memory, about one more forward of compute"),
    ("optimizer", str, "adamw", "adamw, or mezo: forward passes only, no gradients or optimizer state (wants a much "
                                "smaller --lr, e.g. 1e-4 for LoRA, and many more steps)"),
    ("mezo_eps", float, 1e-3, "MeZO's perturbation scale"),
    ("loraplus_lr_ratio", float, None, "LoRA+: lora_B (and 1-D parameters) learn at this multiple of --lr, e.g. 16"),
    ("group_by_length", bool, False, "batch rows of similar length together: much less padding when lengths vary"),
    ("eval_batch_size", int, 64, "rows per generation batch when evaluating"),
    ("max_new_tokens", int, None, "generation length when evaluating (default: just above the longest reference)"),
    ("progress", bool, True, "show a progress bar while training"),
]
TRAIN_DEFAULTS = {name: default for name, _, default, _ in TRAIN_OPTIONS}
TRAIN_TYPES = {name: kind for name, kind, _, _ in TRAIN_OPTIONS}


# ---------------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftlab", description="Parameter-efficient fine-tuning: train, inspect, merge and run adapters.",
        epilog="Run 'peftlab COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"peftlab {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    train = commands.add_parser(
        "train", help="train an adapter (no options: the built-in SmolLM2 + LoRA extract job)",
        description="Train an adapter and report held-out quality before and after. With no options this runs the "
                    "built-in job: SmolLM2-135M-Instruct + LoRA learns to turn sentences into normalized JSON. "
                    "Every option can also come from --config (YAML or JSON, keys as below with _ or -); "
                    "flags given here override the file.")
    train.add_argument("--config", metavar="FILE", help="YAML or JSON file of options")
    for name, kind, default, text in TRAIN_OPTIONS:
        flag = "--" + name.replace("_", "-")
        shown = f" (default: {default})" if default not in (None, "") else ""
        if kind is bool:
            train.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text + shown)
        else:
            train.add_argument(flag, type=str if kind == "method" else kind, default=None,
                               metavar=name.upper(), help=text + shown)
    train.set_defaults(func=cmd_train)

    generate = commands.add_parser(
        "generate", help="complete prompts with a base model, with or without an adapter",
        description="Greedy, chat-templated completion of each prompt. The base model defaults to the one the "
                    "adapter was trained on.")
    generate.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text (several prompts run as one batch)")
    generate.add_argument("--adapter", metavar="DIR", help="adapter folder (HF PEFT format, e.g. runs/demo/adapter)")
    generate.add_argument("--model", help="base model (default: the adapter's base, else smollm2-135m)")
    generate.add_argument("--system", help="system message (default: the one the adapter was trained with)")
    generate.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (default: 128)")
    generate.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default: auto)")
    generate.set_defaults(func=cmd_generate)

    info = commands.add_parser(
        "info", help="describe a saved adapter without loading any model",
        description="Method, base model, ranks, targets and parameter count of an adapter folder, read from "
                    "adapter_config.json and the safetensors header only.")
    info.add_argument("adapter", metavar="DIR", help="adapter folder")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=cmd_info)

    merge = commands.add_parser(
        "merge", help="fold an adapter into its base model and save a plain transformers model",
        description="Load the base model and the adapter, merge the adapter into the weights, remove every peftlab "
                    "module and save_pretrained the result, which transformers loads without peftlab.")
    merge.add_argument("adapter", metavar="DIR", help="adapter folder")
    merge.add_argument("--out", required=True, metavar="DIR", help="folder for the merged model")
    merge.add_argument("--model", help="base model (default: the one named in the adapter)")
    merge.add_argument("--device", default="cpu", help="device to merge on (default: cpu)")
    merge.set_defaults(func=cmd_merge)

    combined = commands.add_parser(
        "combine", help="combine adapters into one LoRA: task arithmetic, TIES, DARE, SVD, concatenation",
        description="Load the adapters onto their base model, combine their true weight updates layer by layer "
                    "(each through its own method's math: LoRA, rsLoRA, PiSSA, DoRA, AdaLoRA, ...), and save the result "
                    "as a plain Hugging Face PEFT LoRA. linear: the exact weighted sum (negative weights subtract); "
                    "cat: the stacked factors; svd: the sum's best approximation at --rank; ties, dare_linear, "
                    "dare_ties, magnitude_prune: pruned to --density entry by entry, then factorized.")
    combined.add_argument("adapters", nargs="+", metavar="DIR", help="adapter folders")
    combined.add_argument("--weights", help="comma-separated weights, one per adapter (default: 1 each), e.g. 1,1,-0.5")
    combined.add_argument("--method", default="linear", help="linear (default), cat, svd, ties, dare_linear, dare_ties "
                                                             "or magnitude_prune")
    combined.add_argument("--density", type=float, help="ties / dare / magnitude_prune: share of each update kept")
    combined.add_argument("--rank", type=int, help="rank of the result (default: exact; svd: the largest input rank)")
    combined.add_argument("--seed", type=int, default=0, help="DARE's random drop (default: 0)")
    combined.add_argument("--space", default="update", choices=["update", "factor"],
                          help="update (default): combine the true weight updates; factor: HF PEFT's add_weighted_adapter "
                          "numbers on plain LoRAs (methods also ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd)")
    combined.add_argument("--out", required=True, metavar="DIR", help="folder for the combined adapter")
    combined.add_argument("--model", help="base model (default: the one the adapters name)")
    combined.set_defaults(func=cmd_combine)

    extract = commands.add_parser(
        "extract-lora", help="a LoRA from a fully fine-tuned model (truncated SVD of the weight difference)",
        description="For each linear layer whose weight differs between --model and --base, keep the best rank <= --max-rank "
                    "approximation of the difference (exact SVD) and save it as a plain Hugging Face PEFT LoRA, with the "
                    "share of each layer's update energy kept in extract.json.")
    extract.add_argument("--model", required=True, help="the fully fine-tuned model (built-in name, folder or hub name)")
    extract.add_argument("--base", required=True, help="the base it was fine-tuned from")
    extract.add_argument("--max-rank", type=int, default=64, help="largest rank per layer (default: 64)")
    extract.add_argument("--targets", help="comma-separated module names or suffixes to extract (default: every linear layer)")
    extract.add_argument("--min-energy", type=float, help="per layer, the fewest directions keeping this share of the energy")
    extract.add_argument("--out", required=True, metavar="DIR", help="folder for the LoRA")
    extract.set_defaults(func=cmd_extract_lora)

    methods = commands.add_parser("methods", help="list the adapter methods peftlab knows",
                                  description="Every registered method: name, category, paper, whether it merges, and its "
                                              "parameter count on SmolLM2-135M at its defaults.")
    methods.add_argument("--json", action="store_true", help="print JSON instead of a table")
    methods.add_argument("--markdown", action="store_true", help="print the README's Markdown table")
    methods.add_argument("--compare-hf", action="store_true",
                         help="every HF PEFT type and LoRA option instead: in peftlab or not (and why), whether the files "
                              "load both ways, and SST-2 accuracy of both from the benchmark")
    methods.set_defaults(func=cmd_methods)

    many = commands.add_parser(
        "train-many", help="train several LoRA jobs on one base in one pass",
        description="Each --job NAME=FILE is a job: FILE holds train options (YAML or JSON, as for 'train --config': "
                    "data, keys, method, lr, steps, batch-size, schedule, seed, out, ...). All jobs share one frozen "
                    "base model, loaded once; each step runs every job's batch through it together, each row through "
                    "its own job's adapter, and steps each job's own optimizer. Each job writes its adapter and "
                    "metrics.json to its out folder.")
    many.add_argument("--job", action="append", required=True, metavar="NAME=FILE", help="a job (repeat for each)")
    many.add_argument("--max-jobs", type=int, metavar="N", help="jobs training at once; the rest wait (default: all)")
    many.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    many.set_defaults(func=cmd_train_many)

    from .bench import add_parser as add_bench_parser
    add_bench_parser(commands)
    from .serve import add_parsers as add_serve_parsers
    add_serve_parsers(commands)
    from .continual.commands import add_parser as add_continual_parser
    add_continual_parser(commands)
    from .compose.lorahub import add_parser as add_lorahub_parser
    add_lorahub_parser(commands)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line (``warning: ...``), without the source line that raised them."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _version() -> str:
    from . import __version__
    return __version__


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a torchrun relaunch repeats
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.func(args) or 0
    except PeftlabError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------------
# Options: defaults < config file < flags


def read_config_file(path) -> dict:
    """Options from a YAML or JSON file (keys with - or _), checked against the train options."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML is a superset of JSON
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML/JSON: {str(error).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} should hold a mapping of options, found {type(data).__name__}")
    options = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in TRAIN_TYPES:
            hint = difflib.get_close_matches(name, list(TRAIN_TYPES), n=1)
            raise ConfigError(f"config file {path}: unknown option {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                              + f"; known options: {', '.join(TRAIN_TYPES)}")
        options[name] = coerce_option(name, value, f"config file {path}")
    return options


def coerce_option(name: str, value, where: str):
    """A config-file value as the option's type (YAML reads 2e-3 as a string, for one)."""
    kind = TRAIN_TYPES[name]
    if value is None:
        if TRAIN_DEFAULTS[name] is None:
            return None
        raise ConfigError(f"{where}: option {name!r} needs a value")
    bad = ConfigError(f"{where}: option {name!r} should be {getattr(kind, '__name__', kind)}, got {value!r}")
    if kind == "method":
        if isinstance(value, (str, dict)):
            return value
        raise bad
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise bad
    if kind is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise bad
    if kind is float:
        if isinstance(value, bool):
            raise bad
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad from None
    if isinstance(value, (dict, list)):
        raise bad
    return str(value)


def resolve_train_options(args) -> dict:
    options = dict(TRAIN_DEFAULTS)
    if getattr(args, "config", None):
        options.update(read_config_file(args.config))
    for name in TRAIN_DEFAULTS:
        value = getattr(args, name, None)
        if value is not None:
            options[name] = value
    if options["warmup_steps"] == TRAIN_DEFAULTS["warmup_steps"] and options["warmup_steps"] >= options["steps"]:
        options["warmup_steps"] = options["steps"] // 10  # the default warmup, scaled down for a very short run
    check_train_options(options)
    return options


TRAIN_TASKS = ("causal-lm", "sequence-classification")


def check_train_options(o: dict) -> None:
    if o["task"] not in TRAIN_TASKS:
        raise ConfigError(f"--task must be one of {', '.join(TRAIN_TASKS)}, got {o['task']!r}")
    for name in ("eval_rows", "train_rows", "eval_batch_size", "max_length", "max_new_tokens", "nproc", "workers",
                 "cpus_per_worker"):
        value = o[name]
        if value is not None and (value < (0 if name == "eval_rows" else 1)):
            raise ConfigError(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'eval_rows' else 'positive'}, "
                              f"got {value}")
    if o["task"] == "sequence-classification" and not o["data"]:
        raise ConfigError("sequence-classification needs --data, e.g. --data ../shared/data/sst2/train.tsv "
                          "--text-key sentence --model minilm")
    if o["backend"] not in ("local", "ray"):
        raise ConfigError(f"--backend must be local or ray, got {o['backend']!r}")
    if o["backend"] == "ray" and o["nproc"] > 1:
        raise ConfigError("--nproc starts processes on this machine through torchrun; with --backend ray Ray places "
                          "them: give --workers N instead")
    from .quant import FORMATS
    if o["quantize"] is not None and o["quantize"] not in FORMATS:
        raise ConfigError(f"--quantize must be one of {', '.join(FORMATS)}, got {o['quantize']!r}")
    if o["quantize_embeddings"] and o["quantize"] is None:
        raise ConfigError("--quantize-embeddings quantizes the embeddings in the format of --quantize; give that too, "
                          "e.g. --quantize nf4 --quantize-embeddings")


# ---------------------------------------------------------------------------------------------
# train


def say(*parts) -> None:
    """Print a progress line; in a data-parallel run only rank 0 speaks."""
    from .dist import world
    if world().main:
        print(*parts, flush=True)


def cmd_train(args) -> int:
    from .dist import ddp

    o = resolve_train_options(args)
    if not ddp.world().distributed:
        if o["backend"] == "ray":
            from .dist import cluster
            return cluster.train(o, say=say)
        if o["nproc"] > 1:
            return launch_data_parallel(o["nproc"], args.argv)
    return run_train(o)


def run_train(o: dict) -> int:
    """The training run of resolved options ``o``, in this process (one of several under torchrun or
    Ray Train, which set up the process group): load, evaluate, train, evaluate, save, report."""
    import torch

    import peftlab
    from .core.adapters import build_configs, train_new_head
    from .models import load_model
    from .train import train

    from .dist import ddp

    started = time.perf_counter()
    place = ddp.world()
    out = Path(o["out"])
    classify = o["task"] == "sequence-classification"
    train_cfg = train_config(o)
    builtin = o["data"] is None
    if builtin and o["system"] is None:
        from .tasks import extract
        o["system"] = extract.SYSTEM
    train_rows, eval_rows = load_train_rows(o)
    label2id = None
    if classify:
        from .train.data import infer_label2id, require_columns
        require_columns(train_rows, [o["label_key"]])
        label2id = infer_label2id(row[o["label_key"]] for row in train_rows + eval_rows)
    data_name = "the built-in extract task" if builtin else o["data"]
    say(f"peftlab train: {o['model']} + {o['method']} on {data_name} "
        f"({len(train_rows)} training rows, {len(eval_rows)} held-out)")

    t = time.perf_counter()
    torch.manual_seed(o["seed"])
    from .models import resolve_device
    device = str(ddp.device_for(place, resolve_device(o["device"])))  # each rank on its own GPU
    model, tokenizer = load_model(o["model"], task=o["task"], num_labels=len(label2id or {0: 0, 1: 1}), device=device)
    if o["quantize"]:
        quantize_base(model, o)
    load_seconds = time.perf_counter() - t
    say(f"loaded {o['model']} in {load_seconds:.1f} s")

    data, evaluate_fn, metric = build_data(o, model, tokenizer, train_rows, eval_rows, label2id)
    shown = metric.replace("_", " ")
    before = after = None
    sharded = place.distributed and o["strategy"] == "fsdp"
    if not place.main and not sharded:
        evaluate_fn = None  # rank 0 evaluates, saves and reports; the other ranks only train (a sharded model
        # runs on every rank together)
    if evaluate_fn is not None:
        before = evaluate_fn(model)
        say(f"held-out {shown} before: {before[metric]:.3f} ({before['n']} rows, {before['seconds']:.1f} s)")

    torch.manual_seed(o["seed"])  # the adapter's random init
    configs = build_configs(o["method"])
    if classify:
        train_new_head(configs, model)
    peftlab.attach(model, configs)
    counts = peftlab.summary(model)
    say(f"adapter: {counts['trainable']:,} trainable parameters ({counts['trainable_percent']:.2f}% of {counts['total']:,})")

    mid_eval = None
    if evaluate_fn is not None and o["eval_every"]:
        def mid_eval(m):
            return {metric: evaluate_fn(m)[metric]}
    ranks = f" on {place.size} data-parallel ranks" if place.distributed else ""
    say(f"training {o['steps']} steps{ranks}, batch {o['batch_size']}x{o['grad_accum']}, lr {o['lr']:g}"
        + (f", resuming from {out / 'checkpoint'}" if o["resume"] and (out / "checkpoint").exists() else ""))
    result = train(model, data, train_cfg, eval_fn=mid_eval)
    summary = result.summary()
    say(f"trained {result.steps} steps in {result.train_seconds:.1f} s "
        f"(final loss {result.final_loss:.4f}, {result.tokens_per_second:.0f} tokens/s)")

    if evaluate_fn is not None:
        after = evaluate_fn(model)
        say(f"held-out {shown} after:  {after[metric]:.3f} ({after['n']} rows, {after['seconds']:.1f} s)")
        for sample in after.get("samples", [])[:1]:
            say("sample:")
            say(f"  prompt:     {sample['prompt']}")
            say(f"  generated:  {sample['prediction']}")
            say(f"  reference:  {sample['reference']}")

    adapter_dir = peftlab.save(model, out / "adapter")  # every rank gathers a sharded model; rank 0 writes
    if not place.main:
        return 0
    if not classify:
        write_prompt_file(adapter_dir, o["system"], tokenizer)
    total = time.perf_counter() - started
    metrics = {
        "before": before, "after": after, "metric": metric,
        "train_seconds": round(result.train_seconds, 2), "load_seconds": round(load_seconds, 2),
        "total_seconds": round(total, 2),
        "train": summary, "losses": [round(x, 5) for x in result.losses], "eval_history": result.eval_history,
        "parameters": {k: counts[k] for k in ("total", "trainable", "trainable_percent")},
        "model": o["model"], "method": o["method"], "adapter": str(adapter_dir),
        "config": {k: v for k, v in o.items()}, "train_config": train_cfg.to_dict(),
        "peftlab_version": peftlab.__version__, "torch_threads": torch.get_num_threads(),
    }
    from .formats.files import write_json
    write_json(out / "metrics.json", metrics)
    say(f"saved {adapter_dir} (Hugging Face PEFT format) and {out / 'metrics.json'}; total {total:.1f} s")
    if before is not None and after is not None:
        say(f"held-out {shown}: {before[metric]:.3f} -> {after[metric]:.3f}")
    return 0


def named_values(items: list, flag: str, value: str) -> dict:
    """``NAME=VALUE`` arguments of a repeated ``flag`` as {name: value}; a malformed or repeated name
    is a clear error."""
    named = {}
    for item in items:
        name, sep, given = item.partition("=")
        if not sep or not name or not given:
            raise ConfigError(f"{flag} takes NAME={value}, got {item!r}")
        if name in named:
            raise ConfigError(f"{flag} names must differ; {name!r} is given twice")
        named[name] = given
    return named


def train_config(o: dict):
    """The training loop's settings from resolved train options."""
    from .train import TrainConfig

    return TrainConfig(
        lr=o["lr"], steps=o["steps"], batch_size=o["batch_size"], grad_accum=o["grad_accum"],
        warmup_steps=o["warmup_steps"], schedule=o["schedule"], weight_decay=o["weight_decay"],
        max_grad_norm=o["max_grad_norm"], eval_every=o["eval_every"], seed=o["seed"], out_dir=str(o["out"]),
        save_every=o["save_every"], resume=o["resume"], device=o["device"], chunked_loss=o["chunked_loss"],
        progress=o["progress"], gradient_checkpointing=o["gradient_checkpointing"], optimizer=o["optimizer"],
        mezo_eps=o["mezo_eps"], group_by_length=o["group_by_length"], strategy=o["strategy"],
        loraplus_lr_ratio=o["loraplus_lr_ratio"])


def cmd_train_many(args) -> int:
    import peftlab
    from .formats.files import write_json
    from .models import load_model

    started = time.perf_counter()
    specs = {name: resolve_train_options(argparse.Namespace(config=path))
             for name, path in named_values(args.job, "--job", "FILE").items()}
    models = sorted({o["model"] for o in specs.values()})
    if len(models) > 1:
        raise ConfigError(f"the jobs are for different base models ({', '.join(models)}); train-many trains jobs of one "
                          "base in one pass: run one train-many per base")
    if any(o["task"] != "causal-lm" for o in specs.values()):
        raise ConfigError("train-many trains causal-lm jobs; train a classifier with 'peftlab train'")
    say(f"peftlab train-many: {len(specs)} jobs on {models[0]}")
    model, tokenizer = load_model(models[0], device=next(iter(specs.values()))["device"])
    jobs = []
    for name, o in specs.items():
        train_rows, eval_rows = load_train_rows(o)
        data, _, _ = build_data(o, model, tokenizer, train_rows, [], None)
        jobs.append(peftlab.Job(name, data, train_config({**o, "progress": False}), o["method"], base=o["model"]))
        say(f"  {name}: {o['method']} on {o['data'] or 'the built-in extract task'} ({len(data)} rows), "
            f"{o['steps']} steps at lr {o['lr']:g} -> {o['out']}")
    outcomes = peftlab.train_many(model, jobs, max_jobs=args.max_jobs, progress=args.progress)
    failed = 0
    for job in jobs:
        outcome = outcomes[job.name]
        summary = outcome.result.summary()
        write_json(Path(job.config.out_dir) / "metrics.json",
                   {"job": job.name, "train": summary, "losses": [round(x, 5) for x in outcome.result.losses],
                    "error": outcome.error, "config": specs[job.name], "peftlab_version": peftlab.__version__})
        if outcome.error:
            failed += 1
            print(f"error: {outcome.error}", file=sys.stderr)
        else:
            say(f"{job.name}: {outcome.result.steps} steps, final loss {outcome.result.final_loss:.4f}; "
                f"saved {Path(job.config.out_dir) / 'adapter'}")
    say(f"train-many: {len(jobs) - failed} of {len(jobs)} jobs done in {time.perf_counter() - started:.1f} s")
    return 1 if failed else 0


def launch_data_parallel(processes: int, argv: list) -> int:
    """``peftlab train --nproc N``: the same command on N processes of this machine, started by
    torchrun's own launcher (``torch.distributed.run``), which also stops them all if one fails."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # the workers run under torchrun, where --nproc means nothing; and torchrun's own parser would
    # take it for an abbreviation of its --nproc-per-node
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        skip = arg == "--nproc"
        if not skip:
            kept.append(arg)
    import os
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))  # cores shared out
    say(f"peftlab train: starting {processes} data-parallel processes through torchrun")
    try:
        torchrun.main(["--standalone", f"--nproc-per-node={processes}", "-m", "peftlab", *kept])
    except ChildFailedError as error:
        failures = sorted(error.failures.items())
        rank, failure = failures[0]
        raise PeftlabError(f"data-parallel training failed: rank {rank} exited with status {failure.exitcode} "
                           "(its error is printed above); the last checkpoint is intact, continue with --resume") from None
    return 0


def load_train_rows(o: dict) -> tuple[list, list]:
    """(training rows, held-out rows) from the built-in task or the user's data."""
    if o["data"] is None:
        if o["task"] != "causal-lm":
            raise ConfigError("the built-in task is causal-lm; give --data for sequence-classification")
        from .tasks import extract
        return extract.make_splits(o["train_rows"], o["eval_rows"], seed=o["seed"])
    from .train import load_rows
    rows = load_rows(o["data"], split="train")
    if o["eval_data"]:
        held_out = load_rows(o["eval_data"], split=o["eval_split"])[: o["eval_rows"]]
        return rows, held_out
    if o["eval_rows"] == 0:
        return rows, []
    if len(rows) < 2 * o["eval_rows"]:
        raise ConfigError(f"{o['data']} has {len(rows)} rows, too few to hold out --eval-rows {o['eval_rows']} for "
                          "evaluation; lower --eval-rows, give --eval-data, or use --eval-rows 0")
    order = list(range(len(rows)))
    random.Random(o["seed"]).shuffle(order)
    cut = len(rows) - o["eval_rows"]
    return [rows[i] for i in order[:cut]], [rows[i] for i in order[cut:]]


def quantize_base(model, o: dict) -> None:
    """--quantize: the base's linear layers in 4 or 8 bits, before the held-out baseline and the
    adapter; a LoRA with init=loftq needs LoftQ run here, for its rank."""
    from .core.adapters import build_configs
    from .quant import quantize, weight_bytes

    loftq = [c for c in build_configs(o["method"]) if getattr(c, "init", None) == "loftq"]
    rank = max((max([c.r, *c.rank_pattern.values()]) for c in loftq), default=None)
    quantize(model, o["quantize"], double_quant=o["double_quant"], loftq_rank=rank, embeddings=o["quantize_embeddings"])
    size = weight_bytes(model)
    what = "the linear layers and the embeddings" if o["quantize_embeddings"] else "the linear layers"
    say(f"quantized {what} to {o['quantize']}" + (f" with LoftQ (rank {rank})" if rank else "")
        + f": base weights {size['total'] / 2**20:.0f} MiB, {size['total'] / size['fp32_total']:.2f}x fp32 "
        f"(quantized layers {size['quantized'] / size['fp32_quantized']:.3f}x)")


def base_quantization(adapter) -> list | None:
    """How the base was quantized when the adapter was trained (None: in full precision)."""
    _, (_, metadata) = read_adapter_header(adapter)
    try:
        return json.loads(metadata.get("peftlab", "{}")).get("base_quantization")
    except json.JSONDecodeError:
        return None


def build_data(o, model, tokenizer, train_rows, eval_rows, label2id):
    """(training dataset, evaluate(model) -> dict or None, metric name)."""
    from .train import CausalLMData, ClassificationData

    if o["task"] == "sequence-classification":
        from .tasks.classification import accuracy
        data = ClassificationData(tokenizer, train_rows, text_key=o["text_key"], label_key=o["label_key"],
                                  max_length=o["max_length"], label2id=label2id)
        if not eval_rows:
            return data, None, "accuracy"
        held_out = ClassificationData(tokenizer, eval_rows, text_key=o["text_key"], label_key=o["label_key"],
                                      max_length=o["max_length"], label2id=label2id)
        return data, (lambda m: accuracy(m, held_out, batch_size=o["eval_batch_size"])), "accuracy"

    from .tasks.generation import evaluate
    from .train.data import require_columns
    data = CausalLMData(tokenizer, train_rows, prompt_key=o["prompt_key"], response_key=o["response_key"],
                        system=o["system"], max_length=o["max_length"])
    if not eval_rows:
        return data, None, "exact_match"
    require_columns(eval_rows, [o["prompt_key"], o["response_key"]])

    def evaluate_fn(m):
        return evaluate(m, tokenizer, eval_rows, system=o["system"], prompt_key=o["prompt_key"],
                        response_key=o["response_key"], batch_size=o["eval_batch_size"],
                        max_new_tokens=o["max_new_tokens"], keep=len(eval_rows))
    return data, evaluate_fn, "exact_match"


def write_prompt_file(adapter_dir: Path, system, tokenizer) -> None:
    from .formats.files import write_json
    write_json(Path(adapter_dir) / PROMPT_FILE,
               {"system": system, "chat_template": bool(getattr(tokenizer, "chat_template", None))})


# ---------------------------------------------------------------------------------------------
# generate


def cmd_generate(args) -> int:
    import peftlab
    from .models import load_model
    from .tasks.generation import generate

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    system = args.system
    model_name = args.model
    if args.adapter:
        hf, _ = read_adapter_header(args.adapter)
        model_name = model_name or hf.get("base_model_name_or_path")
        if not model_name:
            raise ConfigError(f"{args.adapter}: adapter_config.json names no base model; pass --model")
        prompt_file = Path(args.adapter) / PROMPT_FILE
        if system is None and prompt_file.is_file():
            system = json.loads(prompt_file.read_text()).get("system")
    model, tokenizer = load_model(model_name or "smollm2-135m", device=args.device)
    if args.adapter:
        quantized = base_quantization(args.adapter)
        if quantized:  # the base as the adapter was trained on
            peftlab.quant.quantize_like(model, quantized)
        peftlab.load(model, args.adapter)
    outputs = generate(model, tokenizer, list(args.prompts), system=system, max_new_tokens=args.max_new_tokens,
                       batch_size=16)
    for output in outputs:
        print(output.strip(), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# info


SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                           "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_safetensors_header(path) -> tuple[dict, dict]:
    """({tensor name: {"dtype", "shape"}}, metadata) from a safetensors file's JSON header only."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than its 8-byte header length")
            (length,) = struct.unpack("<Q", raw)
            if length > 100_000_000 or length > path.stat().st_size - 8:
                raise ValueError(f"header length {length} does not fit the file")
            header = json.loads(f.read(length))
    except FileNotFoundError:
        raise PeftlabError(f"{path} does not exist") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise PeftlabError(f"{path} is not a readable safetensors file ({error}); re-save the adapter") from None
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata


def read_adapter_header(adapter) -> tuple[dict, dict]:
    """(adapter_config.json, the weights' header) with the usual checks on the folder."""
    from .formats.files import read_json, refuse_pickles
    from .formats.io import CONFIG_NAME, WEIGHTS_NAME

    folder = Path(adapter)
    if not folder.is_dir():
        raise PeftlabError(f"adapter folder {folder} does not exist")
    if not (folder / CONFIG_NAME).is_file():
        raise PeftlabError(f"{folder} has no {CONFIG_NAME}; is this an adapter folder written by peftlab.save or peft?")
    if not (folder / WEIGHTS_NAME).is_file():
        refuse_pickles(folder)
        raise PeftlabError(f"{folder} has no {WEIGHTS_NAME}")
    return read_json(folder / CONFIG_NAME), read_safetensors_header(folder / WEIGHTS_NAME)


# where an HF PEFT tensor name turns from the module's path into the method's own parameter: the
# first part of each method's parameter names, one a line
ADAPTER_PREFIXES = (
    r"lora",
    r"hada",
    r"lokr",
    r"ia3",
    r"ln_tuning",
    r"adaption",
    r"vera_lambda",
    r"pvera_lambda",
    r"vblora_logits",
    r"unilora_indices",
    r"randlora(?=_lambda|_gamma)",
    r"fourierft",
    r"oft",
    r"boft",
    r"road",
    r"delora",
    r"gralora",
    r"waveft",
    r"shira",
    r"c3a",
    r"hra",
    r"miss",
    r"trainable_tokens",
    r"poly",
    r"beft",
    r"osf",
    r"deft",
    r"glora",
    r"lily",
    r"peanut",
    r"tinylora(?=_[ABP]\b)",
    r"supertuning",
    r"adamss",
    r"hira",
    r"frod_lambda",
    r"psoft",
)
ADAPTER_TENSOR = re.compile(r"\.(?=(?:" + "|".join(ADAPTER_PREFIXES) + r")_)")
# saved but never trained, one a line: VeRA's and RandLoRA's random pair (PEFT's RandLoRA saves it under every
# layer too), Uni-LoRA's scales, DeLoRA's column norms of the frozen weight, TinyLoRA's SVD factors and projection,
# AdaMSS's singular basis
SAVED_FROZEN = (
    "vera_A",
    "vera_B",
    "pvera_A",
    "pvera_B",
    "randlora_A",
    "randlora_B",
    "unilora_scales_A",
    "unilora_scales_B",
    "delora_w_norm",
    "tinylora_A",
    "tinylora_B",
    "tinylora_P",
    "adamss_newB",
    "zeros",  # GLoRA's support "none": PEFT's zero buffer
)
SAVED_FROZEN_PREFIXES = ("base_model.frod_V.",)  # saved once per module category (FRoD's shared bases), never trained
SHARED_COPIES = {"LILY": "hf_lily", "TRAINABLE_TOKENS": "hf_trainable_tokens"}  # PEFT writes a shared tensor per layer
INTEGER_DTYPES = ("I64", "I32", "I16", "I8", "U8", "BOOL")  # masks and positions, not trained numbers


def adapter_info(adapter) -> dict:
    hf, (tensors, metadata) = read_adapter_header(adapter)
    extra = {}
    if "peftlab" in metadata:
        try:
            extra = json.loads(metadata["peftlab"])
        except json.JSONDecodeError:
            extra = {}
    configs = extra.get("configs") or ([extra["config"]] if extra.get("config") else [])
    saved_heads = list(hf.get("modules_to_save") or []) + [m for c in configs for m in c.get("modules_to_save") or []]
    saved_heads = list(dict.fromkeys(saved_heads))

    def is_saved_module(key: str) -> bool:
        path = key.removeprefix("base_model.model.").rsplit(".", 1)[0]
        return any(path == m or path.endswith("." + m) for m in saved_heads)

    if hf.get("peft_type") == "PEFTLAB":
        modules = sorted({m for entry in hf.get("methods") or [] for m in entry.get("modules") or []})
    else:
        found = (ADAPTER_TENSOR.split(name, 1) for name in tensors if not is_saved_module(name))
        modules = sorted({re.sub(r"(\.base_layer)+$", "", parts[0].removeprefix("base_model.model."))  # target_parameters nest
                          for parts in found if len(parts) > 1})
    other_params = sum(math.prod(t["shape"]) for n, t in tensors.items() if is_saved_module(n))
    adapter_params = sum(math.prod(t["shape"]) for n, t in tensors.items()  # integer tensors are positions (SHiRA's)
                         if not is_saved_module(n) and n.rsplit(".", 1)[-1] not in SAVED_FROZEN
                         and not n.startswith(SAVED_FROZEN_PREFIXES)
                         and t["dtype"] not in INTEGER_DTYPES)
    copies = SHARED_COPIES.get(hf.get("peft_type"))
    if copies is not None:  # tensors a file stores under several layers count once
        adapter_params -= import_module(f"peftlab.formats.{copies}").duplicate_parameters(
            hf, {n: t["shape"] for n, t in tensors.items()})
    size = sum(math.prod(t["shape"]) * SAFETENSORS_DTYPE_BYTES.get(t["dtype"], 4) for t in tensors.values())
    peft_type = hf.get("peft_type", "?")
    if configs:
        method = "|".join(c.get("method", "?") for c in configs)
    elif peft_type == "PEFTLAB":
        method = "|".join(m.get("method", "?") for m in hf.get("methods") or [])
    else:
        method = "dora" if hf.get("use_dora") else str(peft_type).lower()
    r, alpha = hf.get("r"), hf.get("lora_alpha", hf.get("alpha"))  # LoHa and LoKr call it alpha
    scale = None
    if isinstance(r, (int, float)) and isinstance(alpha, (int, float)) and r:
        scale = alpha / (math.sqrt(r) if hf.get("use_rslora") else r + hf.get("hybrid_r", 0))  # GraLoRA: r + hybrid_r
    return {
        "adapter": str(adapter),
        "method": method,
        "peft_type": peft_type,
        "base_model": hf.get("base_model_name_or_path") or extra.get("base_model"),
        "task_type": hf.get("task_type"),
        "r": r,
        "alpha": alpha,
        "scaling": scale,
        "rslora": bool(hf.get("use_rslora", False)),
        "rank_pattern": hf.get("rank_pattern") or {},
        "alpha_pattern": hf.get("alpha_pattern") or {},
        "target_modules": hf.get("target_modules"),
        "modules_to_save": saved_heads,
        "settings": [{k: v for k, v in c.items() if k not in ("method", "modules")} for c in configs],
        "adapted_modules": len(modules),
        "parameters": adapter_params + other_params,
        "adapter_parameters": adapter_params,
        "saved_module_parameters": other_params,
        "dtypes": sorted({t["dtype"] for t in tensors.values()}),
        "bytes": size,
        "peftlab_version": extra.get("version"),
        "base_fingerprint": extra.get("base_fingerprint"),
    }


def cmd_info(args) -> int:
    info = adapter_info(args.adapter)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    lines = [
        ("adapter", info["adapter"]),
        ("method", f"{info['method']} (peft_type {info['peft_type']})"),
        ("base model", info["base_model"] or "(not recorded)"),
        ("task type", info["task_type"] or "(not recorded)"),
    ]
    if info["r"] is not None:
        rank = f"{info['r']} (alpha {info['alpha']:g}" if isinstance(info["alpha"], (int, float)) else f"{info['r']} (alpha ?"
        rank += f", scale {info['scaling']:g}" if info["scaling"] is not None else ""
        rank += ", rsLoRA)" if info["rslora"] else ")"
        if info["rank_pattern"]:
            rank += f"; per module: {info['rank_pattern']}"
        lines.append(("rank", rank))
    for method, settings in zip(info["method"].split("|"), info["settings"]):
        shown = {k: v for k, v in settings.items() if v not in (None, [], {}) and k not in ("targets", "exclude")}
        lines.append((f"{method} settings", ", ".join(f"{k}={v}" for k, v in shown.items()) or "(defaults)"))
    targets = info["target_modules"]
    if targets or info["adapted_modules"]:
        targets = ", ".join(targets) if isinstance(targets, list) else str(targets or "")
        lines.append(("targets", f"{targets} ({info['adapted_modules']} modules)".strip()))
    lines.append(("parameters", f"{info['parameters']:,} ({info['bytes'] / 2**20:.1f} MiB, {'/'.join(info['dtypes']) or '-'})"))
    if info["modules_to_save"]:
        lines.append(("trained in full", f"{', '.join(info['modules_to_save'])} "
                                         f"({info['saved_module_parameters']:,} parameters)"))
    if info["peftlab_version"]:
        lines.append(("written by", f"peftlab {info['peftlab_version']} (base fingerprint {info['base_fingerprint']})"))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key + ':':<{width + 2}}{value}")
    return 0


# ---------------------------------------------------------------------------------------------
# merge


def cmd_merge(args) -> int:
    import peftlab
    from .models import load_model

    adapter, out = Path(args.adapter), Path(args.out)
    hf, (tensors, _) = read_adapter_header(adapter)
    if out.resolve() == adapter.resolve():
        raise ConfigError("--out must be a different folder from the adapter's")
    model_name = args.model or hf.get("base_model_name_or_path")
    if not model_name:
        raise ConfigError(f"{adapter}: adapter_config.json names no base model; pass --model")
    task = "sequence-classification" if hf.get("task_type") == "SEQ_CLS" else "causal-lm"
    num_labels = next((t["shape"][0] for n, t in tensors.items()
                       if n.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight"))), 2)
    say(f"loading {model_name} and {adapter}")
    model, tokenizer = load_model(model_name, task=task, num_labels=num_labels, device=args.device)
    quantized = base_quantization(adapter)
    if quantized:
        say(f"{adapter} was trained on a {'/'.join(sorted({q['format'] for q in quantized}))} base: quantizing the base "
            "the same way and merging into its dequantized weights (a full-precision model)")
        peftlab.quant.dequantize(peftlab.quant.quantize_like(model, quantized))
    peftlab.load(model, adapter)
    peftlab.merge(model)
    model = peftlab.unload(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    auto = "AutoModelForSequenceClassification" if task == "sequence-classification" else "AutoModelForCausalLM"
    say(f"merged model written to {out}; load it with transformers.{auto}.from_pretrained({str(out)!r})")
    return 0


def cmd_combine(args) -> int:
    import peftlab
    from .compose import combine
    from .formats.files import write_json
    from .models import load_model

    out = Path(args.out)
    folders = [Path(a) for a in args.adapters]
    if any(out.resolve() == f.resolve() for f in folders):
        raise ConfigError("--out must be a new folder, not one of the adapters'")
    try:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else [1.0] * len(folders)
    except ValueError:
        raise ConfigError(f"--weights takes comma-separated numbers, e.g. 1,1,-0.5; got {args.weights!r}") from None
    bases = {str(f): read_adapter_header(f)[0].get("base_model_name_or_path") for f in folders}
    named = sorted({b for b in bases.values() if b})
    if not args.model and len(named) != 1:
        raise ConfigError(f"the adapters name {'no base model' if not named else 'different base models: ' + ', '.join(named)}"
                          "; pass --model")
    model_name = args.model or named[0]
    say(f"loading {model_name} and {len(folders)} adapters")
    model, _ = load_model(model_name)
    names = [f"input{i}" for i in range(len(folders))]
    for folder, name in zip(folders, names):
        peftlab.load(model, folder, name=name)
    result = combine(model, names, weights, method=args.method, density=args.density, rank=args.rank, seed=args.seed,
                     space=args.space)
    adapter = peftlab.save(model, out, name=result.name)
    ranks = sorted(set(result.ranks.values()))
    report = {"method": args.method, "inputs": [str(f) for f in folders], "weights": weights, "density": args.density,
              "rank": args.rank, "seed": args.seed, "space": args.space, "ranks": result.ranks, "energy_dropped": result.energy_dropped}
    write_json(out / "combine.json", report)
    say(f"{args.method} of {len(folders)} adapters: {len(result.ranks)} layers, rank "
        f"{ranks[0] if len(ranks) == 1 else f'{ranks[0]}-{ranks[-1]}'}, at most {100 * result.max_energy_dropped:.2f}% "
        f"of a layer's update energy dropped")
    say(f"saved {adapter} (a plain Hugging Face PEFT LoRA) and {out / 'combine.json'}")
    return 0


def cmd_extract_lora(args) -> int:
    from .compose.extract import extract_to_folder

    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    extract_to_folder(args.model, args.base, args.out, args.max_rank, targets, args.min_energy, say=say)
    return 0


# ---------------------------------------------------------------------------------------------
# methods


def cmd_methods(args) -> int:
    from .methods.table import markdown_table, method_rows

    if args.compare_hf:
        return compare_hf(args)
    if args.markdown:
        print(markdown_table())
        return 0
    rows = method_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    headers = {"name": "method", "category": "category", "mergeable": "mergeable",
               "params_smollm2_135m": "params (SmolLM2-135M)", "paper": "paper"}
    table = [{k: ("yes" if r[k] is True else "no" if r[k] is False else str(r[k])) for k in headers} for r in rows]
    print_columns(headers, table)
    return 0


def print_columns(headers: dict, rows: list) -> None:
    """``rows`` (dicts of strings) as left-aligned columns under ``headers`` ({key: title})."""
    widths = {k: max(len(headers[k]), *(len(r[k]) for r in rows)) for k in headers}
    print("  ".join(f"{headers[k]:<{widths[k]}}" for k in headers).rstrip())
    for r in rows:
        print("  ".join(f"{r[k]:<{widths[k]}}" for k in headers).rstrip())


def compare_hf(args) -> int:
    from .methods import parity

    if args.markdown:
        print(parity.markdown_table())
        return 0
    types, options, survey = parity.type_rows(), parity.option_rows(), parity.survey_rows()
    if args.json:
        print(json.dumps({"hf_peft": parity.HF_VERSION, "types": types, "lora_options": options, "survey": survey},
                         indent=2))
        return 0
    def cell(value):
        return "yes" if value is True else "no" if value is False else value or "-"

    headers = {"hf": "HF PEFT type", "peftlab": "peftlab", "files": "files both ways", "sst2": "SST-2 peftlab",
               "sst2_hf": "SST-2 HF PEFT", "note": "note"}
    print_columns(headers, [{k: cell(r[k]) for k in headers} for r in types])
    print()
    headers = {"hf": "HF PEFT LoRA option", "peftlab": "peftlab", "files": "files both ways", "note": "note"}
    print_columns(headers, [{k: cell(r[k]) for k in headers} for r in options])
    print()
    headers = {"method": "survey method (not in HF PEFT)", "paper": "paper", "peftlab": "peftlab", "note": "note"}
    print_columns(headers, [{k: cell(r[k]) for k in headers} for r in survey])
    return 0


if __name__ == "__main__":
    sys.exit(main())
