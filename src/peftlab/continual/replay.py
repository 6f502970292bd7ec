"""Experience replay: a small memory of earlier tasks' rows mixed into each later task's training.

Why: the simplest strong baseline of continual learning (e.g. Chaudhry et al., 2019, "On Tiny
Episodic Memories in Continual Learning", arXiv:1902.10486; LAMOL, Sun et al., 2020, replays
generated rows instead). Rehearsing even a few rows of each earlier task keeps one shared LoRA from
drifting away from them.

What: one LoRA, as ``seq-lora``. After each stage ``memory`` rows of that stage's task are drawn
(seeded, without replacement) into the buffer; stage ``i`` trains on its own rows plus the whole
buffer, which holds rows of tasks ``0..i-1`` only. Task-free at test time.
"""
from __future__ import annotations

import random

from .methods import SeqLora


class ReplayBuffer:
    """Rows per task, in the order the tasks were learned."""

    def __init__(self, per_task: int, seed: int = 0):
        self.per_task, self.seed = per_task, seed
        self.by_task = {}

    def add(self, task: str, rows: list) -> None:
        rng = random.Random(f"{self.seed}:{task}")
        self.by_task[task] = rng.sample(rows, min(self.per_task, len(rows)))

    def rows(self) -> list:
        return [row for rows in self.by_task.values() for row in rows]


class Replay(SeqLora):
    name = "replay"
    paper = "experience replay (Chaudhry et al., 2019, arXiv:1902.10486)"
    summary = "one LoRA; a memory of a few rows of each earlier task mixed into each later task's rows"
    OPTIONS = {**SeqLora.OPTIONS, "memory": 20, "seed": 0}

    def __init__(self, **options):
        super().__init__(**options)
        self.buffer = ReplayBuffer(self.memory, self.seed)

    def training_rows(self, stage: int, rows: list) -> list:
        return rows + self.buffer.rows()

    def after_stage(self, model, stage: int, rows: list) -> None:
        for task in dict.fromkeys(row["task"] for row in rows):
            self.buffer.add(task, [row for row in rows if row["task"] == task])
