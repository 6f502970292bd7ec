"""``peftlab continual``: learn tasks one after another and measure forgetting.

    peftlab continual --tasks agnews,amazon,yelp,dbpedia --method o-lora
    peftlab continual --method seq-lora,o-lora,replay --order dbpedia,amazon,yelp,agnews --steps 40
    peftlab continual --tasks sst2,my_task.yaml --method progressive --option length=20

A thin layer over ``peftlab.continual.run``: one run per method, each writing into ``--out``.
"""
from __future__ import annotations

from ..core.config import parse_value
from ..errors import ConfigError
from .methods import METHODS, get_method
from .sequence import DEFAULT_SEQUENCE

DEFAULT_OUT = "runs/continual"


def add_parser(commands) -> None:
    cl = commands.add_parser(
        "continual", help="train tasks one after another and measure forgetting (O-LoRA, progressive prompts, ...)",
        description="Train the tasks in order with a continual-learning method, test every task after every stage, and "
                    "write the accuracy matrix R[i][j], average accuracy, backward and forward transfer as JSONL, a "
                    "Markdown report and heatmap PNGs. Every method predicts with one frozen label-word head, over the "
                    "union of the tasks' labels without being told a row's task (--label-space union), or over each "
                    "row's own task's labels (--label-space task).")
    cl.add_argument("--tasks", default=",".join(DEFAULT_SEQUENCE),
                    help="comma-separated tasks: agnews, amazon, yelp, dbpedia, a benchmark classification task (sst2) "
                         f"or a task spec file (default: {','.join(DEFAULT_SEQUENCE)})")
    cl.add_argument("--method", default="o-lora",
                    help=f"one or more of {', '.join(METHODS)}, comma-separated (default: o-lora)")
    cl.add_argument("--order", help="the same tasks in another training order (names or 0-based positions)")
    cl.add_argument("--model", default="minilm", help="the encoder (default: minilm, all-MiniLM-L6-v2, offline)")
    cl.add_argument("--train-rows", type=int, default=400, help="training rows sampled per task (0: all; default: 400)")
    cl.add_argument("--test-rows", type=int, default=200, help="test rows sampled per task (0: all; default: 200)")
    cl.add_argument("--steps", type=int, help="optimizer steps per task (default: --epochs passes over its rows)")
    cl.add_argument("--epochs", type=float, default=1.0, help="passes over each task's rows when --steps is not given")
    cl.add_argument("--batch-size", type=int, default=16, help="rows per step (default: 16)")
    cl.add_argument("--lr", type=float, help="learning rate (default: the method's own: 5e-3, prompts 3e-2)")
    cl.add_argument("--max-length", type=int, default=64, help="tokens per row (default: 64)")
    cl.add_argument("--label-space", choices=("union", "task"), default="union",
                    help="union (default): every row scored over every task's labels, no task information; task: each "
                         "row over its own task's labels (as O-LoRA's instructions list the options)")
    cl.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="a method setting, e.g. r=8, lambda1=0.5, lambda2=0, length=10, bottleneck=32, memory=20")
    cl.add_argument("--seed", type=int, default=0, help="seed of the samples, inits and data order (default: 0)")
    cl.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    cl.add_argument("--device", default="cpu", help="cpu, cuda, auto (default: cpu)")
    cl.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    cl.set_defaults(func=run_command)


def run_command(args) -> int:
    from .runner import run

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    if not methods:
        raise ConfigError(f"--method is empty; choose from {', '.join(METHODS)}")
    options = dict(_option(text) for text in args.option)
    for method in methods:  # every name and option checked before the first run starts
        get_method(method, {k: v for k, v in options.items() if k in method_options(method)})
    unused = sorted(set(options) - {k for m in methods for k in method_options(m)})
    if unused:
        raise ConfigError(f"--option {unused[0]} is not a setting of {', '.join(methods)}; settings: "
                          + "; ".join(f"{m}: {', '.join(method_options(m))}" for m in methods))
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    for method in methods:
        result = run(args.tasks, method, order=args.order, model=args.model,
                     options={k: v for k, v in options.items() if k in method_options(method)},
                     train_rows=args.train_rows, test_rows=args.test_rows, steps=args.steps, epochs=args.epochs,
                     batch_size=args.batch_size, lr=args.lr, max_length=args.max_length,
                     label_space=args.label_space, seed=args.seed, out=args.out,
                     device=args.device, log=print)
        print(f"{method}: average accuracy {100 * result['average_accuracy']:.1f}, BWT {_points(result['bwt'])}, "
              f"FWT {_points(result['fwt'])}")
    print(f"report in {args.out}/report.md, stages in {args.out}/stages.jsonl")
    return 0


def method_options(name: str) -> list:
    from .methods import method_class

    return list(method_class(name).OPTIONS)


def _points(value) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}"


def _option(text: str) -> tuple:
    if "=" not in text:
        raise ConfigError(f"--option takes KEY=VALUE (e.g. lambda1=0.5), got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), parse_value(value.strip())
