"""peftlab: parameter-efficient fine-tuning of large pretrained models.

    import peftlab
    model = peftlab.attach(model, "lora[r=16,alpha=32]")   # any torch.nn.Module
    peftlab.save(model, "out/adapter")                       # Hugging Face PEFT format
"""
__version__ = "0.1.0"

from .core.adapters import attach, delete, disabled, merge, routing, set_active, summary, unload, unmerge  # noqa: E402
from .errors import (  # noqa: E402
    AdapterFormatError,
    ConfigError,
    DataError,
    IncompatibleBaseError,
    PeftlabError,
    StateError,
    TargetError,
    TrainingError,
)
from .compose import combine  # noqa: E402
from .dist.many import Job, train_many  # noqa: E402
from .formats.io import load, save  # noqa: E402
from .methods import METHODS  # noqa: E402
from .quant import quantize  # noqa: E402
from .prune import binarize, prune_ranks  # noqa: E402
from .core.tasks import task_ids  # noqa: E402

__all__ = [
    "attach", "summary", "save", "load", "set_active", "disabled", "routing", "merge", "unmerge", "unload", "delete",
    "METHODS", "PeftlabError", "ConfigError", "TargetError", "AdapterFormatError", "IncompatibleBaseError",
    "StateError", "TrainingError", "DataError", "Job", "train_many", "combine", "task_ids",
]
