"""The accuracy matrix of a continual run and the three numbers read off it.

Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning" (NeurIPS 2017,
arXiv:1706.08840), section 5: after training stage ``i`` (tasks ``0..i`` seen), every task ``j``
is evaluated, giving ``R[i][j]``. With ``T`` tasks and ``b_j`` the accuracy on task ``j`` of the
model before any continual training (here: the base model with the same head, no adapter):

- average accuracy  ``ACC = 1/T  sum_j R[T-1][j]``                   (the last row)
- backward transfer ``BWT = 1/(T-1) sum_{j<T-1} (R[T-1][j] - R[j][j])`` (negative = forgetting)
- forward transfer  ``FWT = 1/(T-1) sum_{j>0} (R[j-1][j] - b_j)``     (what earlier tasks give an unseen one)

Pure functions on lists of floats, so the definitions are tested on hand-written matrices.
A run with a single stage (multitask training, the upper bound) has an average accuracy but no
BWT or FWT (None).
"""
from __future__ import annotations

from ..errors import ConfigError


def _check(matrix: list) -> int:
    if not matrix or not all(isinstance(row, (list, tuple)) for row in matrix):
        raise ConfigError("an accuracy matrix is a non-empty list of rows (one per stage)")
    width = len(matrix[0])
    if width == 0 or any(len(row) != width for row in matrix):
        raise ConfigError(f"every row of the accuracy matrix needs one entry per task ({width})")
    return width


def average_accuracy(matrix: list) -> float:
    """Mean of the last row: accuracy on every task after the whole sequence."""
    _check(matrix)
    last = matrix[-1]
    return sum(last) / len(last)


def backward_transfer(matrix: list) -> float | None:
    """Mean over the tasks before the last of (final accuracy - accuracy right after learning it).
    None unless the matrix is square (one stage per task) with at least two tasks."""
    tasks = _check(matrix)
    if len(matrix) != tasks or tasks < 2:
        return None
    last = matrix[-1]
    return sum(last[j] - matrix[j][j] for j in range(tasks - 1)) / (tasks - 1)


def forward_transfer(matrix: list, baseline: list) -> float | None:
    """Mean over the tasks after the first of (accuracy just before learning it - its baseline).
    None unless the matrix is square with at least two tasks."""
    tasks = _check(matrix)
    if len(baseline) != tasks:
        raise ConfigError(f"forward transfer needs one baseline accuracy per task ({tasks}), got {len(baseline)}")
    if len(matrix) != tasks or tasks < 2:
        return None
    return sum(matrix[j - 1][j] - baseline[j] for j in range(1, tasks)) / (tasks - 1)


def summarize(matrix: list, baseline: list) -> dict:
    """``{"average_accuracy", "bwt", "fwt"}`` of one run."""
    return {"average_accuracy": average_accuracy(matrix), "bwt": backward_transfer(matrix),
            "fwt": forward_transfer(matrix, baseline)}
