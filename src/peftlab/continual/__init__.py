"""Continual learning: task sequences, continual methods, the accuracy matrix and its metrics.

Where it sits: on top of the library (``attach``, named adapters, ``set_active``) and the trainer
(``peftlab.train``); it learns tasks one after another and measures what is forgotten.

    import peftlab.continual as cl
    result = cl.run("agnews,amazon,yelp,dbpedia", "o-lora", train_rows=400, steps=25, out="runs/cl")
    result["matrix"], result["average_accuracy"], result["bwt"], result["fwt"]

Modules: ``sequence.py`` (tasks, order, rows, the shared label space), ``model.py`` (the encoder
with a frozen label-word head every method shares), ``methods.py`` (the protocol, sequential LoRA,
multitask, the registry), ``olora.py``, ``progressive.py``, ``adaptercl.py``, ``replay.py`` (one
file per method), ``metrics.py`` (average accuracy, BWT, FWT), ``runner.py`` (the stage loop),
``report.py`` (JSONL, Markdown, heatmap) and ``commands.py`` (``peftlab continual``).
"""
from .methods import METHODS, get_method
from .metrics import average_accuracy, backward_transfer, forward_transfer, summarize
from .runner import run
from .sequence import CONTINUAL_TASKS, DEFAULT_SEQUENCE

__all__ = ["run", "METHODS", "get_method", "average_accuracy", "backward_transfer", "forward_transfer", "summarize",
           "CONTINUAL_TASKS", "DEFAULT_SEQUENCE"]
