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
import sys
import warnings

from ..errors import PeftlabError
from .info import adapter_info, cmd_info
from .tools import cmd_combine, cmd_extract_lora, cmd_merge, cmd_methods
from .train import (DEFAULT_METHOD, PROMPT_FILE, TRAIN_DEFAULTS, TRAIN_OPTIONS, cmd_generate, cmd_train, cmd_train_many,
                    named_values, resolve_train_options, run_train, train_config)

__all__ = ["main", "build_parser", "adapter_info", "DEFAULT_METHOD", "PROMPT_FILE", "TRAIN_DEFAULTS", "named_values",
           "resolve_train_options", "run_train", "train_config"]

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

    from ..bench import add_parser as add_bench_parser
    add_bench_parser(commands)
    from ..serve import add_parsers as add_serve_parsers
    add_serve_parsers(commands)
    from ..continual.commands import add_parser as add_continual_parser
    add_continual_parser(commands)
    from ..compose.lorahub import add_parser as add_lorahub_parser
    add_lorahub_parser(commands)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line (``warning: ...``), without the source line that raised them."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _version() -> str:
    from .. import __version__
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


if __name__ == "__main__":
    sys.exit(main())
