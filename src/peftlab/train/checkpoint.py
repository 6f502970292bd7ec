"""Checkpoints that resume a run exactly, written so that a kill at any moment leaves a good one.

A checkpoint is a folder (``out_dir/checkpoint/``) holding, for step N:

    adapter-N.safetensors     every trainable parameter, by name
    optimizer-N.safetensors   AdamW's moment tensors (its small settings go in state.json)
    rng-N.safetensors         torch's CPU and CUDA generator states
    state.json                step, data position, loss history, python/numpy RNG, and which files
                              above belong to it

Each file is written atomically (temporary file + rename), and ``state.json`` is written last: it is
the commit record. A run killed while writing step N's tensors leaves ``state.json`` still naming
step N-k's complete set; files of other steps are deleted only after the new ``state.json`` is in
place. Nothing is pickled: tensors are safetensors, the rest is JSON.

The learning-rate schedule is a pure function of the step (see ``loop.lr_at``), so the step *is*
the scheduler's state, and the data order is a pure function of (seed, position), so the position
is the data loader's state.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from ..dist.fsdp import full, scatter
from ..errors import TrainingError
from ..formats.files import read_json, read_tensors, write_json, write_tensors

STATE_FILE = "state.json"
FORMAT_VERSION = 1
_KINDS = ("adapter", "optimizer", "rng")


def checkpoint_folder(out_dir) -> Path:
    return Path(out_dir) / "checkpoint"


def has_checkpoint(folder: Path) -> bool:
    return (Path(folder) / STATE_FILE).is_file()


def save_checkpoint(folder: Path, step: int, params: dict, optimizer, progress: dict, write: bool = True) -> None:
    """Write step ``step``: ``params`` maps names to trainable parameters; ``progress`` is the
    JSON-ready rest of the run's state (data position, losses, ...). Sharded (FSDP) tensors are
    gathered whole, so every rank of a sharded run must call this; only one with ``write`` writes."""
    folder = Path(folder)
    files = {kind: f"{kind}-{step:08d}.safetensors" for kind in _KINDS}
    meta = {"step": str(step)}
    optimizer_tensors, optimizer_rest = _split_optimizer_state(optimizer.state_dict())
    optimizer_tensors = {key: full(value) for key, value in optimizer_tensors.items()}
    adapter_tensors = {name: full(p.data) for name, p in params.items()}
    if not write:
        return
    rng_tensors, rng_rest = capture_rng()
    write_tensors(folder / files["adapter"], adapter_tensors, meta)
    write_tensors(folder / files["optimizer"], optimizer_tensors, meta)
    write_tensors(folder / files["rng"], rng_tensors, meta)
    state = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "files": files,
        "trainable": {name: list(p.shape) for name, p in params.items()},
        "optimizer": optimizer_rest,
        "rng": rng_rest,
        **progress,
    }
    write_json(folder / STATE_FILE, state)  # the commit point
    _remove_stale_files(folder, keep=set(files.values()))


def load_checkpoint(folder: Path, params: dict, optimizer) -> dict:
    """Restore parameters, optimizer and RNG states in place; return the state dict (step,
    position, histories...). Raises TrainingError when the checkpoint does not fit the model."""
    folder = Path(folder)
    state = read_json(folder / STATE_FILE)
    _check_fits(folder, state, params)
    tensors = {kind: _read_step_file(folder, state, kind) for kind in _KINDS}
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(scatter(tensors["adapter"][name], p))
    saved = _join_optimizer_state(tensors["optimizer"], state["optimizer"])
    in_order = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param_state in saved["state"].items():  # moments laid out as their parameter is
        for key, value in param_state.items():
            if torch.is_tensor(value) and value.shape == in_order[index].shape:
                param_state[key] = scatter(value, in_order[index])
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise TrainingError(f"the checkpoint in {folder} has {len(saved['param_groups'])} optimizer parameter groups, this run "
                            f"{len(optimizer.param_groups)}: resume with the optimizer settings it was written with "
                            "(e.g. the same loraplus_lr_ratio, on or off)")
    optimizer.load_state_dict(saved)
    restore_rng(tensors["rng"], state["rng"])
    return state


def _check_fits(folder: Path, state: dict, params: dict) -> None:
    saved = state.get("trainable", {})
    current = {name: list(p.shape) for name, p in params.items()}
    if saved == current:
        return
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    reshaped = sorted(n for n in set(saved) & set(current) if saved[n] != current[n])
    problems = (("not in the checkpoint", missing), ("not trainable in this model", unexpected),
                ("different shape", reshaped))
    details = "; ".join(f"{label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                        for label, names in problems if names)
    raise TrainingError(f"the checkpoint in {folder} was written for other trainable parameters ({details}); "
                        "resume with the same model and adapter spec, or use a fresh out_dir")


def _read_step_file(folder: Path, state: dict, kind: str) -> dict:
    path = folder / state["files"][kind]
    tensors, meta = read_tensors(path)
    if meta.get("step") != str(state["step"]):
        raise TrainingError(f"{path} belongs to step {meta.get('step')}, but {STATE_FILE} is at step {state['step']}; "
                            "the checkpoint folder was modified by hand — use a fresh out_dir")
    return tensors


def _remove_stale_files(folder: Path, keep: set) -> None:
    """Tensor files of older steps, and temporary files a killed write left behind."""
    for path in folder.iterdir():
        ours = path.suffix == ".safetensors" and path.name.split("-")[0] in _KINDS
        leftover = path.name.startswith(".") and path.name.endswith(".tmp")
        if (ours and path.name not in keep) or leftover:
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Optimizer state: tensors to safetensors, the rest (hyperparameters, param indices) to JSON.


def _split_optimizer_state(state_dict: dict) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for index, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict, rest: dict) -> dict:
    state: dict = {}
    for flat, value in [*tensors.items(), *rest["scalars"].items()]:
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


# ---------------------------------------------------------------------------------------------
# Random number generators: dropout and anything else random must continue where it left off.


def capture_rng() -> tuple[dict, dict]:
    """(tensors, JSON-ready dict) with the state of every generator a training step may use."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = cuda_state
    version, internal, gauss = random.getstate()
    rest = {"python": [version, list(internal), gauss]}
    numpy_state = _numpy_state()
    if numpy_state is not None:
        rest["numpy"] = numpy_state
    return tensors, rest


def restore_rng(tensors: dict, rest: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda_states = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    version, internal, gauss = rest["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in rest:
        _set_numpy_state(rest["numpy"])


def _numpy_state():
    try:
        import numpy as np
    except ImportError:
        return None
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _set_numpy_state(state) -> None:
    try:
        import numpy as np
    except ImportError:
        return
    name, keys, pos, has_gauss, cached = state
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
