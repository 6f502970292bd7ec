"""Running a grid: one process per cell, results appended to a JSONL file cell by cell.

Killing a run loses at most the cell that was running; running the same command again reads
the file, skips every cell whose key is there (the key includes the task's settings, so a
changed budget runs anew) and goes on. Progress shows the cell being run, the grid's progress
and an ETA from the cells timed so far in this run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ..errors import ConfigError, PeftlabError
from .grid import skip_reason


def finished_keys(results: Path) -> set:
    """Keys of the cells a results file already holds (a torn last line from a kill is ignored)."""
    keys = set()
    if not results.exists():
        return keys
    for line in results.read_text().splitlines():
        try:
            keys.add(json.loads(line)["key"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return keys


def read_results(results: Path) -> list:
    if not results.exists():
        raise PeftlabError(f"{results} does not exist; run 'peftlab bench' first (or pass --results)")
    rows = []
    for line in results.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def append(results: Path, row: dict) -> None:
    """One line per cell, flushed and synced before the next cell starts."""
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_grid(cells: list, results: Path, threads: int = 2, timeout: float = 1800, say=print, backend: str = "local",
             address: str | None = None) -> list:
    """Run every cell not yet in ``results``; return the rows this call added. ``backend="ray"``
    runs the cells as Ray tasks (``dist/cluster.py``), as many at once as the cluster has room for
    at ``threads`` CPUs each; rows are appended as cells finish, so the resume rule is the same."""
    done = finished_keys(results)
    todo = [c for c in cells if c.key not in done]
    say(f"bench: {len(cells)} cells, {len(cells) - len(todo)} already in {results}, {len(todo)} to run"
        + (" as Ray tasks" if backend == "ray" and todo else ""))
    added, runnable = [], []
    for cell in todo:
        reason = skip_reason(cell)
        if reason is None:
            runnable.append(cell)
            continue
        row = {"key": cell.key, "task": cell.task.name, "method": cell.method, "seed": cell.seed, "skipped": reason}
        append(results, row)
        added.append(row)
        say(f"{cell.task.name} | {cell.method} | seed {cell.seed}: skipped ({reason})")
    started = time.perf_counter()
    for i, (cell, row) in enumerate(_finished(runnable, threads, timeout, backend, address, say), 1):
        append(results, row)
        added.append(row)
        elapsed = time.perf_counter() - started
        eta = f", ETA {format_seconds(elapsed / i * (len(runnable) - i))}" if i < len(runnable) else ""
        say(f"[{i}/{len(runnable)}{eta}] {cell.task.name} | {cell.method} | seed {cell.seed}: {describe(row)}")
    return added


def _finished(cells: list, threads: int, timeout: float, backend: str, address: str | None, say):
    """(cell, row) pairs as cells finish: one after another here, or in parallel on Ray."""
    if backend == "ray":
        from ..dist import cluster
        yield from cluster.run_cells(cells, threads, timeout, address=address)
        return
    if backend != "local":
        raise ConfigError(f"--backend must be local or ray, got {backend!r}")
    for cell in cells:
        say(f"running {cell.task.name} | {cell.method} | seed {cell.seed}")
        yield cell, run_in_process(cell, threads, timeout)


def run_in_process(cell, threads: int, timeout: float, cwd: str | None = None) -> dict:
    """One cell in a fresh Python process; ``cwd``: the folder relative paths are read from (the
    driver's, when this runs as a Ray task on its machine)."""
    command = [sys.executable, "-m", "peftlab.bench.cell", str(threads)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    base = {"key": cell.key, "task": cell.task.name, "method": cell.method, "seed": cell.seed}
    started = time.perf_counter()
    try:
        done = subprocess.run(command, input=json.dumps(cell.to_dict()), capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=cwd if cwd and os.path.isdir(cwd) else None)
    except subprocess.TimeoutExpired:
        return {**base, "failed": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {**base, "failed": f"exit status {done.returncode}", "stderr": done.stderr[-2000:]}
    return {**json.loads(lines[-1]), "cell_wall_seconds": round(time.perf_counter() - started, 2)}


def describe(row: dict) -> str:
    if row.get("failed"):
        return f"failed: {row['failed']}"
    if row.get("diverged"):
        return "diverged"
    return (f"{row['metric_name']} {row['metric']:.4f}, {row['trainable_params']:,} trainable, "
            f"{row['train_seconds']:.0f} s training, {row['peak_rss_mb']:.0f} MB peak")


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
