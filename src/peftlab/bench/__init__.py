"""``peftlab bench``: every method on the same tasks, measured the same way, beside HF PEFT.

    peftlab bench --preset quick              # SST-2 x (full FT, every method, every HF PEFT twin) x 3 seeds
    peftlab bench --task sst2 --method lora --method hf:lora --seeds 0,1,2 --set train_rows=1000
    peftlab bench --task my_task.yaml         # a user's own data (see tasks.py)
    peftlab bench report                      # Markdown tables and PNG plots from the results file

Pieces: ``tasks.py`` (data, model, metric, budget), ``grid.py`` (methods, twins, presets, cells),
``cell.py`` (one run, in its own process), ``runner.py`` (the JSONL results file, resuming,
progress) and ``report.py`` (aggregation, tables, plots).
"""
from __future__ import annotations

from pathlib import Path

from ..core.config import parse_value
from ..errors import ConfigError

DEFAULT_RESULTS = "runs/bench/results.jsonl"


def add_parser(commands) -> None:
    bench = commands.add_parser(
        "bench", help="benchmark methods on tasks (and HF PEFT's twins); 'bench report' writes the report",
        description="Run a grid of task x method x seed cells, each in its own process, appending one JSON line per "
                    "cell to the results file; a re-run skips finished cells. 'peftlab bench report' turns the file "
                    "into Markdown tables and PNG plots.")
    bench.add_argument("action", nargs="?", choices=("run", "report", "list"), default="run",
                       help="run the grid (default), write the report, or list the cells")
    bench.add_argument("--preset", choices=("quick", "full"), help="quick: the SST-2 grid; full: every task")
    bench.add_argument("--task", action="append", default=[], metavar="TASK",
                       help="a built-in task (sst2, extract, gsm8k, alpaca) or a task spec file; repeatable")
    bench.add_argument("--method", action="append", default=[], metavar="METHOD",
                       help="full, a method name, or hf:<method> for HF PEFT's twin; repeatable (default: all)")
    bench.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    bench.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a task setting for every task, e.g. train_rows=1000 or train=path.tsv")
    bench.add_argument("--results", default=DEFAULT_RESULTS, help=f"results file (default: {DEFAULT_RESULTS})")
    bench.add_argument("--out", help="report folder (default: the results file's folder)")
    bench.add_argument("--figures", metavar="JSON",
                       help="with report: also merge each method's SST-2 accuracy into this figures file (the one "
                            "'peftlab methods --compare-hf' reads is src/peftlab/bench/sst2_figures.json)")
    bench.add_argument("--threads", type=int, default=2, help="torch threads per cell (default: 2)")
    bench.add_argument("--backend", choices=("local", "ray"), default="local",
                       help="local: cells one after another here; ray: each cell a Ray task reserving --threads CPUs, "
                            "as many at once as the cluster holds (needs peftlab[dist])")
    bench.add_argument("--address", help="with --backend ray: the Ray cluster to join (default: RAY_ADDRESS if set, "
                                         "else a local Ray started for this run)")
    bench.set_defaults(func=run)


def run(args) -> int:
    from .grid import cells, learning_rate, method_names, preset
    from .report import write_report
    from .runner import read_results, run_grid
    from .tasks import get_task

    results = Path(args.results)
    if args.action == "report":
        rows = read_results(results)
        path = write_report(rows, Path(args.out) if args.out else results.parent)
        print(f"report written to {path}")
        if args.figures:
            from .report import update_figures

            print(f"figures of {update_figures(rows, Path(args.figures))} methods written to {args.figures}")
        return 0
    if args.preset:
        tasks, methods, seeds = preset(args.preset)
    else:
        tasks, methods, seeds = [], method_names(), []
    tasks = [get_task(t) for t in args.task] or tasks
    if not tasks:
        raise ConfigError("give --task (sst2, extract, gsm8k, alpaca or a task spec file) or --preset quick|full")
    methods = args.method or methods
    seeds = seeds if args.preset and args.seeds == "0,1,2" else _seeds(args.seeds)
    settings = dict(_setting(s) for s in args.set)
    tasks = [t.with_settings(**settings) for t in tasks]
    for method in methods:
        learning_rate(method, tasks[0])  # an unknown method name fails here, naming the known ones
    grid = cells(tasks, methods, seeds)
    if args.action == "list":
        for cell in grid:
            print(cell.key)
        return 0
    for task in tasks:
        task.rows()  # a missing data file fails now, not after an hour of other cells
    run_grid(grid, results, threads=args.threads, backend=args.backend, address=args.address)
    print(f"results in {results}; write the report with: peftlab bench report --results {results}")
    return 0


def _seeds(text: str) -> list:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {text!r}") from None


def _setting(text: str) -> tuple:
    if "=" not in text:
        raise ConfigError(f"--set takes KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), parse_value(value.strip())
