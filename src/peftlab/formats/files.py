"""Safe file I/O shared by every format: atomic writes, safetensors only, clear errors."""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ..errors import AdapterFormatError, PeftlabError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


_UMASK = os.umask(0)
os.umask(_UMASK)


def write_files(files: dict) -> None:
    """Write ``{path: bytes}`` atomically, so that either every file is replaced or none is: all contents go
    to synced temporary files first, and only then are they renamed into place. A full disk (or
    any write error) leaves the previous files, a consistent set, untouched."""
    staged = []
    try:
        for path, data in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_UMASK)
        for tmp, path in staged:
            os.replace(tmp, path)
    except OSError as error:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        _raise_io(error, [p for _, p in staged] or list(files))
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        raise


def _raise_io(error: OSError, paths) -> None:
    if error.errno == errno.ENOSPC:
        names = ", ".join(str(p) for p in paths)
        raise PeftlabError(f"no space left on the device while writing {names}; free some space or choose another "
                           "output folder (the previous files, if any, are untouched)") from None
    raise error


def json_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def tensor_bytes(tensors: dict, metadata: dict | None = None) -> bytes:
    """A safetensors file's bytes. Serialised in memory so that a write error is an ``OSError``
    with its errno (safetensors' own file writer reports a full disk as a generic error)."""
    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)


def write_json(path: Path, data: dict) -> None:
    write_files({Path(path): json_bytes(data)})


def write_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    write_files({Path(path): tensor_bytes(tensors, metadata)})


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterFormatError(f"{path} is not valid JSON ({error}); the file is corrupt or truncated — re-save the adapter") from None
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


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
