"""Safe file I/O shared by every format: atomic writes, safetensors only, clear errors."""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import AdapterFormatError, PeftlabError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: a crash or a full disk
    never leaves a half-written file in place of a good one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        if error.errno == errno.ENOSPC:
            raise PeftlabError(f"no space left on the device while writing {path}; free some space or choose another "
                               "output folder (the previous file, if any, is untouched)") from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
    atomic_write(path, write)


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as error:
        raise AdapterFormatError(f"{path} is not valid JSON ({error}); the file is corrupt or truncated — re-save the adapter") from None
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


def write_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_tensors(path: Path) -> tuple[dict, dict]:
    """Load every tensor of a safetensors file, with its metadata. Never unpickles anything."""
    path = Path(path)
    if not path.exists():
        raise AdapterFormatError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise AdapterFormatError(
            f"{path} could not be read as safetensors ({error}); the file is corrupt or truncated — re-save or re-download it"
        ) from None
    return tensors, metadata


def refuse_pickles(folder: Path) -> None:
    pickles = sorted(p.name for p in Path(folder).iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterFormatError(
            f"{folder} holds only pickle files ({', '.join(pickles)}); peftlab loads safetensors only, because unpickling "
            "can run arbitrary code. Convert it where you trust the file: "
            "safetensors.torch.save_file(torch.load(path, weights_only=True), 'adapter_model.safetensors')"
        )
