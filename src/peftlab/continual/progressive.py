"""Progressive Prompts: Continual Learning for Language Models (Razdaibiedina et al., ICLR 2023,
arXiv:2301.12314).

Why: a soft prompt is a few vectors in front of the input; the model itself never changes. Each
new task gets a new prompt, trained with every earlier prompt in front of it but frozen, so the
earlier tasks' prompts are never overwritten (no forgetting of what they hold) and the new prompt
can reuse what they hold (forward transfer).

What: for task k the input is ``[P_k; P_{k-1}; ...; P_1; x]`` (newest first, as in the paper's
Figure 1); only ``P_k`` trains. Each prompt is peftlab's prompt tuning (``methods/prompt_tuning.py``)
attached as its own adapter; activating them all makes ``core/model_adapters.py`` prepend them in
turn. At test time every prompt learned so far is in front of every row: no task identity. The
paper's residual MLP reparameterization of the prompt (used for BERT) is not included.
"""
from __future__ import annotations

import peftlab

from .methods import ContinualMethod
from .olora import freeze


class ProgressivePrompts(ContinualMethod):
    name = "progressive"
    paper = "Razdaibiedina et al., 2023 (arXiv:2301.12314)"
    summary = "a new soft prompt per task, earlier prompts frozen and concatenated in front of it"
    OPTIONS = {"lr": 3e-2, "length": 10}

    def before_stage(self, model, stage: int) -> None:
        names = [f"task{i}" for i in range(stage + 1)]
        peftlab.attach(model, f"prompt[length={self.length}]", name=names[-1])
        peftlab.set_active(model, names)
        freeze(model, names[:-1])
