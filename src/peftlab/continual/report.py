"""What a continual run leaves on disk: JSONL (one line per stage), a summary JSON, a Markdown
report and a heatmap of the accuracy matrix.

    out/stages.jsonl      one JSON object per stage and method: what it trained on, accuracy on every task
    out/summary.json      every method's whole result (matrix, baseline, ACC / BWT / FWT, settings)
    out/report.md         a table of the methods' metrics, then each method's matrix
    out/<method>.png      the accuracy matrix as a heatmap (stages down, tasks across)

Several methods written to one folder add up: each write keeps the other methods' results.
"""
from __future__ import annotations

import json
from pathlib import Path

TASK_IDENTITY = {
    "union": ("No method is told the task of a test row: every method predicts over the union of all tasks' label words "
              "with one frozen label-word head (amazon and yelp share their five labels). AdapterCL picks an adapter per "
              "row by the lowest prediction entropy."),
    "task": ("Each row is scored over its own task's label words only (the counterpart of O-LoRA's instructions, which "
             "list the task's answer options), with one frozen label-word head; no method picks parameters by task. "
             "AdapterCL picks an adapter per row by the lowest prediction entropy."),
}


def write_run(result: dict, out: Path) -> dict:
    """Add one method's result to ``out`` (JSONL lines, summary, report, heatmap); returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    results = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    results[result["method"]] = result
    summary_path.write_text(json.dumps(results, indent=1))
    with open(out / "stages.jsonl", "w") as f:  # rewritten whole, so a re-run of a method replaces its lines
        for each in results.values():
            for line in each["stages"]:
                f.write(json.dumps(line) + "\n")
    heatmap(result, out / f"{result['method']}.png")
    (out / "report.md").write_text(markdown(list(results.values())))
    return {"jsonl": out / "stages.jsonl", "summary": summary_path, "report": out / "report.md",
            "heatmap": out / f"{result['method']}.png"}


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _signed(value) -> str:
    return "–" if value is None else f"{100 * value:+.1f}"


def markdown(results: list) -> str:
    """The methods' average accuracy, BWT and FWT (points), then each method's accuracy matrix."""
    if not results:
        return "# Continual learning\n\nNo results.\n"
    tasks = results[0]["tasks"]
    space = results[0]["settings"].get("label_space", "union")
    lines = ["# Continual learning", "", f"Tasks in order: {', '.join(tasks)}. Label space: {space}. {TASK_IDENTITY[space]}",
             "",
             "Average accuracy: mean of the last row of R. BWT (backward transfer): mean over all but the last task of "
             "R[T-1][j] - R[j][j], negative when tasks are forgotten. FWT (forward transfer): mean over all but the "
             "first task of R[j-1][j] - b_j, with b_j the untrained model's accuracy (Lopez-Paz & Ranzato, 2017). "
             "All in points (accuracy x 100).", "",
             "| method | avg accuracy | BWT | FWT | seconds | paper |", "|---|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r['method']} | {_pct(r['average_accuracy'])} | {_signed(r['bwt'])} | {_signed(r['fwt'])} "
                     f"| {r['seconds']:.0f} | {r['paper']} |")
    lines += ["", "Baseline b (no training): " + ", ".join(f"{t} {_pct(b)}" for t, b in zip(tasks, results[0]["baseline"]))]
    for r in results:
        lines += ["", f"## {r['method']}", "", f"{r['summary']}. Options: "
                  + ", ".join(f"{k}={v}" for k, v in r["options"].items()) + ".", "",
                  "| after stage | " + " | ".join(r["tasks"]) + " |", "|---|" + "---:|" * len(r["tasks"])]
        for line, row in zip(r["stages"], r["matrix"]):
            lines.append(f"| {line['stage']}: {'+'.join(line['trained_on'])} | " + " | ".join(_pct(a) for a in row) + " |")
    return "\n".join(lines) + "\n"


def heatmap(result: dict, path: Path) -> Path:
    """The accuracy matrix as an annotated heatmap PNG (rows: after each stage; columns: tasks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix, tasks = result["matrix"], result["tasks"]
    stages = ["+".join(line["trained_on"]) for line in result["stages"]]
    fig, ax = plt.subplots(figsize=(1.4 + 1.1 * len(tasks), 1.2 + 0.6 * len(matrix)))
    image = ax.imshow([[100 * a for a in row] for row in matrix], vmin=0, vmax=100, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(stages)), [f"after {s}" for s in stages])
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    bwt = _signed(result["bwt"])
    ax.set_title(f"{result['method']}: avg {_pct(result['average_accuracy'])}, BWT {bwt}", fontsize=10)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
