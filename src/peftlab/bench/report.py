"""The benchmark report: per task, one row per method, aggregated over seeds, plus PNG plots.

Columns: the task metric (mean and standard deviation over the seeds that finished), trainable
parameters (count and share of the model), adapter file size, peak memory, training time,
tokens/s, inference latency of the adapted and merged model relative to the base model, and
stability: the share of runs that diverged and the spread of the loss curves across seeds (the
mean over steps of the standard deviation of the loss). Plots: the metric against trainable
parameters (log scale) with the Pareto front marked, memory and time bars, and the loss curves.
"""
from __future__ import annotations

import datetime
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from .grid import FULL, HF

LOWER_IS_BETTER = {"perplexity"}


def aggregate(rows: list) -> dict:
    """``{task: [one summary dict per method]}`` from the result rows (failed cells are counted; of a
    (task, method, seed) run more than once, the last row)."""
    latest = {}  # a cell run again (e.g. at a new recommended rate) counts once: its last row
    for row in rows:
        latest[(row["task"], row["method"], row.get("seed"))] = row
    groups = defaultdict(list)
    for row in latest.values():
        groups[(row["task"], row["method"])].append(row)
    tasks = defaultdict(list)
    for (task, method), runs in groups.items():
        finished = [r for r in runs if not r.get("failed") and not r.get("diverged") and not r.get("skipped")]
        metrics = [r["metric"] for r in finished]
        skipped = next((r["skipped"] for r in runs if r.get("skipped")), None)
        runs = [r for r in runs if not r.get("skipped")]
        if skipped and not runs:
            tasks[task].append({"method": method, "skipped": skipped})
            continue
        summary = {"method": method, "runs": len(runs), "finished": len(finished),
                   "diverged": sum(bool(r.get("diverged")) for r in runs) / len(runs),
                   "failed": [r["failed"] for r in runs if r.get("failed")]}
        if finished:
            first = finished[0]
            latency = [r["latency"] for r in finished if r.get("latency")]
            summary.update(
                metric_name=first["metric_name"], metric=statistics.mean(metrics),
                metric_std=statistics.stdev(metrics) if len(metrics) > 1 else 0.0,
                trainable=first["trainable_params"], trainable_percent=first["trainable_percent"],
                adapter_mb=first["adapter_bytes"] / 2**20,
                peak_mb=statistics.mean(r["peak_rss_mb"] for r in finished),
                train_seconds=statistics.mean(r["train_seconds"] for r in finished),
                tokens_per_second=statistics.mean(r["tokens_per_second"] for r in finished),
                latency_adapted=_ratio(latency, "adapted"), latency_merged=_ratio(latency, "merged"),
                loss_spread=loss_spread([r["losses"] for r in finished]),
                loss_curve=mean_curve([r["losses"] for r in finished]),
            )
        tasks[task].append(summary)
    for summaries in tasks.values():
        summaries.sort(key=_order)
    return dict(tasks)


def _order(summary: dict):
    method = summary["method"]
    return (method != FULL, method.removeprefix(HF), method.startswith(HF))  # each twin right after its method


def _ratio(latencies: list, key: str):
    ratios = [l[key] / l["base"] for l in latencies if l.get(key) and l.get("base")]
    return statistics.median(ratios) if ratios else None


def loss_spread(curves: list) -> float | None:
    """Mean over steps of the standard deviation of the loss across seeds."""
    if len(curves) < 2:
        return None
    steps = min(len(c) for c in curves)
    return statistics.mean(statistics.stdev(c[i] for c in curves) for i in range(steps))


def mean_curve(curves: list) -> list:
    steps = min(len(c) for c in curves)
    return [statistics.mean(c[i] for c in curves) for i in range(steps)]


def pareto_front(points: list, lower_is_better: bool = False) -> list:
    """Indices of the points (trainable params, metric) that no other point beats on both."""
    better = (lambda a, b: a < b) if lower_is_better else (lambda a, b: a > b)
    front = []
    for i, (params, metric) in enumerate(points):
        dominated = any((p <= params and not better(metric, m) and (p < params or better(m, metric)))
                        for j, (p, m) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


# ---- Markdown --------------------------------------------------------------------------------

def markdown(task: str, summaries: list, plots: dict | None = None) -> str:
    lines = [f"### {task}", ""]
    name = next((s["metric_name"] for s in summaries if "metric_name" in s), "metric")
    lines.append(f"| method | {name} (mean ± std) | trainable | adapter | peak memory | training | tokens/s "
                 "| latency unmerged / merged | diverged | loss spread |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for s in summaries:
        if "skipped" in s:
            lines.append(f"| `{s['method']}` | not run: {s['skipped']} | | | | | | | | |")
            continue
        if "metric" not in s:
            reason = "; ".join(s["failed"]) or "all runs diverged"
            lines.append(f"| `{s['method']}` | {reason[:120]} | | | | | | | {s['diverged']:.0%} | |")
            continue
        merged = f"{s['latency_merged']:.2f}x" if s["latency_merged"] else "-"
        unmerged = f"{s['latency_adapted']:.2f}x" if s["latency_adapted"] else "-"
        spread = f"{s['loss_spread']:.3f}" if s["loss_spread"] is not None else "-"
        lines.append(
            f"| `{s['method']}` | {s['metric']:.4f} ± {s['metric_std']:.4f} ({s['finished']}/{s['runs']}) "
            f"| {s['trainable']:,} ({s['trainable_percent']:.2f}%) | {_size(s['adapter_mb'])} | {s['peak_mb']:.0f} MB "
            f"| {s['train_seconds']:.1f} s | {s['tokens_per_second']:.0f} | {unmerged} / {merged} "
            f"| {s['diverged']:.0%} | {spread} |")
    for title, path in (plots or {}).items():
        lines += ["", f"![{title}]({path})"]
    return "\n".join(lines) + "\n"


def _size(mb: float) -> str:
    return f"{mb * 1024:.0f} KB" if mb < 1 else f"{mb:.1f} MB"


# ---- plots -----------------------------------------------------------------------------------

def plot(task: str, summaries: list, out: Path) -> dict:
    """Write the task's PNG plots into ``out``; return ``{title: file name}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [s for s in summaries if "metric" in s]
    if not done:
        return {}
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    name = done[0]["metric_name"]
    lower = name in LOWER_IS_BETTER

    fig, ax = plt.subplots(figsize=(9, 6))
    points = [(s["trainable"], s["metric"]) for s in done]
    front = set(pareto_front(points, lower))
    for i, s in enumerate(done):
        twin = s["method"].startswith(HF)
        ax.errorbar(s["trainable"], s["metric"], yerr=s["metric_std"], fmt="s" if twin else "o",
                    color="tab:red" if i in front else ("tab:gray" if twin else "tab:blue"), markersize=6, capsize=2)
        ax.annotate(s["method"], (s["trainable"], s["metric"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front_points = sorted(points[i] for i in front)
    ax.plot([p for p, _ in front_points], [m for _, m in front_points], "--", color="tab:red", label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(name)
    ax.set_title(f"{task}: {name} vs trainable parameters (squares: HF PEFT; red: Pareto front)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    files["metric vs parameters"] = _save(fig, out / f"{task}_metric_vs_params.png")

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, max(4, 0.25 * len(done))))
    labels = [s["method"] for s in done]
    left.barh(labels, [s["peak_mb"] for s in done], color="tab:blue")
    left.set_xlabel("peak memory (MB)")
    right.barh(labels, [s["train_seconds"] for s in done], color="tab:orange")
    right.set_xlabel("training time (s)")
    for axis in (left, right):
        axis.invert_yaxis()
        axis.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    files["memory and time"] = _save(fig, out / f"{task}_memory_time.png")

    columns = 6
    rows = math.ceil(len(done) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 1.9 * rows), sharey=True, squeeze=False)
    for ax, s in zip(axes.flat, done):
        ax.plot(s["loss_curve"], linewidth=1)
        ax.set_title(s["method"], fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(done):]:
        ax.axis("off")
    fig.suptitle(f"{task}: training loss per step (mean over seeds)")
    fig.tight_layout()
    files["loss curves"] = _save(fig, out / f"{task}_loss_curves.png")
    return files


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


# ---- checks ----------------------------------------------------------------------------------

CLEAR_MARGIN = 0.05  # "beats the majority class by a clear margin": five points


def majority_baseline(task: str, rows: list) -> float | None:
    """The majority-class share of a classification task's evaluation rows (from the results, or
    from the task's data when the results predate that field)."""
    for row in rows:
        if row.get("task") == task and row.get("majority") is not None:
            return row["majority"]
    from ..errors import PeftlabError
    from .tasks import get_task, majority_share

    try:
        spec = get_task(task)
        if spec.kind != "classification":
            return None
        labels = [str(r[spec.label_key]) for r in spec.rows()[1]]
    except (PeftlabError, OSError, KeyError):  # no data here (or not a known task): no such line
        return None
    return majority_share(labels)


def checks(summaries: list, majority: float | None) -> str:
    """What the issue asks the benchmark to show, checked from the table: the majority-class
    baseline, LoRA against full fine-tuning, and each HF PEFT twin against peftlab's method."""
    done = {s["method"]: s for s in summaries if "metric" in s}
    lines = ["#### Checks", ""]
    if majority is not None:
        weak = [f"`{m}` ({s['metric']:.4f})" for m, s in done.items() if s["metric"] < majority + CLEAR_MARGIN]
        lines.append(f"- Majority-class baseline: {majority:.4f}. Methods less than {CLEAR_MARGIN * 100:.0f} points above "
                     f"it: {', '.join(weak) or 'none'}.")
    if FULL in done and "lora" in done:
        gap = (done["lora"]["metric"] - done[FULL]["metric"]) * 100
        lines.append(f"- LoRA {done['lora']['metric']:.4f} vs full fine-tuning {done[FULL]['metric']:.4f}: "
                     f"{gap:+.2f} points.")
    pairs = [(m, done[HF + m]) for m in done if HF + m in done]
    if pairs:
        lines += ["", "| method | peftlab | HF PEFT | difference | at least as accurate (within seed noise) "
                      "| training time, peftlab / HF |", "|---|---|---|---|---|---|"]
        for method, twin in pairs:
            ours = done[method]
            noise = max(ours["metric_std"], twin["metric_std"])
            diff = ours["metric"] - twin["metric"]
            lower = twin["metric_name"] in LOWER_IS_BETTER
            ok = (-diff if lower else diff) >= -noise
            lines.append(f"| `{method}` | {ours['metric']:.4f} ± {ours['metric_std']:.4f} | {twin['metric']:.4f} ± "
                         f"{twin['metric_std']:.4f} | {diff:+.4f} | {'yes' if ok else 'no'} (noise {noise:.4f}) "
                         f"| {ours['train_seconds'] / twin['train_seconds']:.2f}x |")
    return "\n".join(lines) + "\n"


def update_figures(rows: list, path: Path, task: str = "sst2") -> int:
    """Merge ``task``'s per-method accuracy from ``rows`` into the JSON figures file at ``path``
    (what ``peftlab methods --compare-hf`` shows); methods the rows do not hold keep their entry.
    Returns how many methods the rows updated."""
    figures = json.loads(path.read_text()) if path.exists() else {"task": task, "methods": {}}
    today = datetime.date.today().isoformat()
    summaries = [s for s in aggregate(rows).get(task, []) if "metric" in s]
    for s in summaries:
        figures["methods"][s["method"]] = {"metric": round(s["metric"], 4), "std": round(s["metric_std"], 4),
                                           "seeds": s["finished"], "train_seconds": round(s["train_seconds"], 1),
                                           "measured": today}
    figures["methods"] = dict(sorted(figures["methods"].items()))
    path.write_text(json.dumps(figures, indent=1) + "\n")
    return len(summaries)


def write_report(rows: list, out: Path) -> Path:
    """``out/report.md`` with a table and plots per task; returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    parts = ["# peftlab benchmark report", "",
             "Each row: one method, aggregated over its seeds (finished/run). Latency is a forward pass over 32 "
             "evaluation rows relative to the base model. Loss spread: the mean over steps of the standard deviation "
             "of the training loss across seeds. `hf:` rows are HF PEFT's implementation, trained by the same loop.", ""]
    for task, summaries in aggregate(rows).items():
        parts.append(markdown(task, summaries, plot(task, summaries, out)))
        parts.append(checks(summaries, majority_baseline(task, rows)))
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path
