"""``peftlab train``, ``train-many`` and ``generate``: the options table (defaults < config file < flags),
the job, and generation with a saved adapter."""
from __future__ import annotations

import argparse
import difflib
import json
import random
import sys
import time
from pathlib import Path

from ..errors import ConfigError, PeftlabError
from .info import read_adapter_header

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
    from ..quant import FORMATS
    if o["quantize"] is not None and o["quantize"] not in FORMATS:
        raise ConfigError(f"--quantize must be one of {', '.join(FORMATS)}, got {o['quantize']!r}")
    if o["quantize_embeddings"] and o["quantize"] is None:
        raise ConfigError("--quantize-embeddings quantizes the embeddings in the format of --quantize; give that too, "
                          "e.g. --quantize nf4 --quantize-embeddings")


# ---------------------------------------------------------------------------------------------
# train


def say(*parts) -> None:
    """Print a progress line; in a data-parallel run only rank 0 speaks."""
    from ..dist import world
    if world().main:
        print(*parts, flush=True)


def cmd_train(args) -> int:
    from ..dist import ddp

    o = resolve_train_options(args)
    if not ddp.world().distributed:
        if o["backend"] == "ray":
            from ..dist import cluster
            return cluster.train(o, say=say)
        if o["nproc"] > 1:
            return launch_data_parallel(o["nproc"], args.argv)
    return run_train(o)


def run_train(o: dict) -> int:
    """The training run of resolved options ``o``, in this process (one of several under torchrun or
    Ray Train, which set up the process group): load, evaluate, train, evaluate, save, report."""
    import torch

    import peftlab
    from ..core.adapters import build_configs, train_new_head
    from ..models import load_model
    from ..train import train

    from ..dist import ddp

    started = time.perf_counter()
    place = ddp.world()
    out = Path(o["out"])
    classify = o["task"] == "sequence-classification"
    train_cfg = train_config(o)
    builtin = o["data"] is None
    if builtin and o["system"] is None:
        from ..tasks import extract
        o["system"] = extract.SYSTEM
    train_rows, eval_rows = load_train_rows(o)
    label2id = None
    if classify:
        from ..train.data import infer_label2id, require_columns
        require_columns(train_rows, [o["label_key"]])
        label2id = infer_label2id(row[o["label_key"]] for row in train_rows + eval_rows)
    data_name = "the built-in extract task" if builtin else o["data"]
    say(f"peftlab train: {o['model']} + {o['method']} on {data_name} "
        f"({len(train_rows)} training rows, {len(eval_rows)} held-out)")

    t = time.perf_counter()
    torch.manual_seed(o["seed"])
    from ..models import resolve_device
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
    from ..formats.files import write_json
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
    from ..train import TrainConfig

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
    from ..formats.files import write_json
    from ..models import load_model

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
        from ..tasks import extract
        return extract.make_splits(o["train_rows"], o["eval_rows"], seed=o["seed"])
    from ..train import load_rows
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
    from ..core.adapters import build_configs
    from ..quant import quantize, weight_bytes

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
    from ..train import CausalLMData, ClassificationData

    if o["task"] == "sequence-classification":
        from ..tasks.classification import accuracy
        data = ClassificationData(tokenizer, train_rows, text_key=o["text_key"], label_key=o["label_key"],
                                  max_length=o["max_length"], label2id=label2id)
        if not eval_rows:
            return data, None, "accuracy"
        held_out = ClassificationData(tokenizer, eval_rows, text_key=o["text_key"], label_key=o["label_key"],
                                      max_length=o["max_length"], label2id=label2id)
        return data, (lambda m: accuracy(m, held_out, batch_size=o["eval_batch_size"])), "accuracy"

    from ..tasks.generation import evaluate
    from ..train.data import require_columns
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
    from ..formats.files import write_json
    write_json(Path(adapter_dir) / PROMPT_FILE,
               {"system": system, "chat_template": bool(getattr(tokenizer, "chat_template", None))})


# ---------------------------------------------------------------------------------------------
# generate


def cmd_generate(args) -> int:
    import peftlab
    from ..models import load_model
    from ..tasks.generation import generate

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
