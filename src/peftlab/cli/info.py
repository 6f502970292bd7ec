"""``peftlab info``: what an adapter folder holds, read from its config and its weights' header alone."""
from __future__ import annotations

import json
import math
import re
import struct
from importlib import import_module
from pathlib import Path

from ..errors import PeftlabError

SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                           "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_safetensors_header(path) -> tuple[dict, dict]:
    """({tensor name: {"dtype", "shape"}}, metadata) from a safetensors file's JSON header only."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than its 8-byte header length")
            (length,) = struct.unpack("<Q", raw)
            if length > 100_000_000 or length > path.stat().st_size - 8:
                raise ValueError(f"header length {length} does not fit the file")
            header = json.loads(f.read(length))
    except FileNotFoundError:
        raise PeftlabError(f"{path} does not exist") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise PeftlabError(f"{path} is not a readable safetensors file ({error}); re-save the adapter") from None
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata


def read_adapter_header(adapter) -> tuple[dict, dict]:
    """(adapter_config.json, the weights' header) with the usual checks on the folder."""
    from ..formats.files import read_json, refuse_pickles
    from ..formats.io import CONFIG_NAME, WEIGHTS_NAME

    folder = Path(adapter)
    if not folder.is_dir():
        raise PeftlabError(f"adapter folder {folder} does not exist")
    if not (folder / CONFIG_NAME).is_file():
        raise PeftlabError(f"{folder} has no {CONFIG_NAME}; is this an adapter folder written by peftlab.save or peft?")
    if not (folder / WEIGHTS_NAME).is_file():
        refuse_pickles(folder)
        raise PeftlabError(f"{folder} has no {WEIGHTS_NAME}")
    return read_json(folder / CONFIG_NAME), read_safetensors_header(folder / WEIGHTS_NAME)


# where an HF PEFT tensor name turns from the module's path into the method's own parameter: the
# first part of each method's parameter names, one a line
ADAPTER_PREFIXES = (
    r"lora",
    r"hada",
    r"lokr",
    r"ia3",
    r"ln_tuning",
    r"adaption",
    r"vera_lambda",
    r"pvera_lambda",
    r"vblora_logits",
    r"unilora_indices",
    r"randlora(?=_lambda|_gamma)",
    r"fourierft",
    r"oft",
    r"boft",
    r"road",
    r"delora",
    r"gralora",
    r"waveft",
    r"shira",
    r"c3a",
    r"hra",
    r"miss",
    r"trainable_tokens",
    r"poly",
    r"beft",
    r"osf",
    r"deft",
    r"glora",
    r"lily",
    r"peanut",
    r"tinylora(?=_[ABP]\b)",
    r"supertuning",
    r"adamss",
    r"hira",
    r"frod_lambda",
    r"psoft",
)
ADAPTER_TENSOR = re.compile(r"\.(?=(?:" + "|".join(ADAPTER_PREFIXES) + r")_)")
# saved but never trained, one a line: VeRA's and RandLoRA's random pair (PEFT's RandLoRA saves it under every
# layer too), Uni-LoRA's scales, DeLoRA's column norms of the frozen weight, TinyLoRA's SVD factors and projection,
# AdaMSS's singular basis
SAVED_FROZEN = (
    "vera_A",
    "vera_B",
    "pvera_A",
    "pvera_B",
    "randlora_A",
    "randlora_B",
    "unilora_scales_A",
    "unilora_scales_B",
    "delora_w_norm",
    "tinylora_A",
    "tinylora_B",
    "tinylora_P",
    "adamss_newB",
    "zeros",  # GLoRA's support "none": PEFT's zero buffer
)
SAVED_FROZEN_PREFIXES = ("base_model.frod_V.",)  # saved once per module category (FRoD's shared bases), never trained
SHARED_COPIES = {"LILY": "hf_lily", "TRAINABLE_TOKENS": "hf_trainable_tokens"}  # PEFT writes a shared tensor per layer
INTEGER_DTYPES = ("I64", "I32", "I16", "I8", "U8", "BOOL")  # masks and positions, not trained numbers


def adapter_info(adapter) -> dict:
    hf, (tensors, metadata) = read_adapter_header(adapter)
    extra = {}
    if "peftlab" in metadata:
        try:
            extra = json.loads(metadata["peftlab"])
        except json.JSONDecodeError:
            extra = {}
    configs = extra.get("configs") or ([extra["config"]] if extra.get("config") else [])
    saved_heads = list(hf.get("modules_to_save") or []) + [m for c in configs for m in c.get("modules_to_save") or []]
    saved_heads = list(dict.fromkeys(saved_heads))

    def is_saved_module(key: str) -> bool:
        path = key.removeprefix("base_model.model.").rsplit(".", 1)[0]
        return any(path == m or path.endswith("." + m) for m in saved_heads)

    if hf.get("peft_type") == "PEFTLAB":
        modules = sorted({m for entry in hf.get("methods") or [] for m in entry.get("modules") or []})
    else:
        found = (ADAPTER_TENSOR.split(name, 1) for name in tensors if not is_saved_module(name))
        modules = sorted({re.sub(r"(\.base_layer)+$", "", parts[0].removeprefix("base_model.model."))  # target_parameters nest
                          for parts in found if len(parts) > 1})
    other_params = sum(math.prod(t["shape"]) for n, t in tensors.items() if is_saved_module(n))
    adapter_params = sum(math.prod(t["shape"]) for n, t in tensors.items()  # integer tensors are positions (SHiRA's)
                         if not is_saved_module(n) and n.rsplit(".", 1)[-1] not in SAVED_FROZEN
                         and not n.startswith(SAVED_FROZEN_PREFIXES)
                         and t["dtype"] not in INTEGER_DTYPES)
    copies = SHARED_COPIES.get(hf.get("peft_type"))
    if copies is not None:  # tensors a file stores under several layers count once
        adapter_params -= import_module(f"peftlab.formats.{copies}").duplicate_parameters(
            hf, {n: t["shape"] for n, t in tensors.items()})
    size = sum(math.prod(t["shape"]) * SAFETENSORS_DTYPE_BYTES.get(t["dtype"], 4) for t in tensors.values())
    peft_type = hf.get("peft_type", "?")
    if configs:
        method = "|".join(c.get("method", "?") for c in configs)
    elif peft_type == "PEFTLAB":
        method = "|".join(m.get("method", "?") for m in hf.get("methods") or [])
    else:
        method = "dora" if hf.get("use_dora") else str(peft_type).lower()
    r, alpha = hf.get("r"), hf.get("lora_alpha", hf.get("alpha"))  # LoHa and LoKr call it alpha
    scale = None
    if isinstance(r, (int, float)) and isinstance(alpha, (int, float)) and r:
        scale = alpha / (math.sqrt(r) if hf.get("use_rslora") else r + hf.get("hybrid_r", 0))  # GraLoRA: r + hybrid_r
    return {
        "adapter": str(adapter),
        "method": method,
        "peft_type": peft_type,
        "base_model": hf.get("base_model_name_or_path") or extra.get("base_model"),
        "task_type": hf.get("task_type"),
        "r": r,
        "alpha": alpha,
        "scaling": scale,
        "rslora": bool(hf.get("use_rslora", False)),
        "rank_pattern": hf.get("rank_pattern") or {},
        "alpha_pattern": hf.get("alpha_pattern") or {},
        "target_modules": hf.get("target_modules"),
        "modules_to_save": saved_heads,
        "settings": [{k: v for k, v in c.items() if k not in ("method", "modules")} for c in configs],
        "adapted_modules": len(modules),
        "parameters": adapter_params + other_params,
        "adapter_parameters": adapter_params,
        "saved_module_parameters": other_params,
        "dtypes": sorted({t["dtype"] for t in tensors.values()}),
        "bytes": size,
        "peftlab_version": extra.get("version"),
        "base_fingerprint": extra.get("base_fingerprint"),
    }


def cmd_info(args) -> int:
    info = adapter_info(args.adapter)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    lines = [
        ("adapter", info["adapter"]),
        ("method", f"{info['method']} (peft_type {info['peft_type']})"),
        ("base model", info["base_model"] or "(not recorded)"),
        ("task type", info["task_type"] or "(not recorded)"),
    ]
    if info["r"] is not None:
        rank = f"{info['r']} (alpha {info['alpha']:g}" if isinstance(info["alpha"], (int, float)) else f"{info['r']} (alpha ?"
        rank += f", scale {info['scaling']:g}" if info["scaling"] is not None else ""
        rank += ", rsLoRA)" if info["rslora"] else ")"
        if info["rank_pattern"]:
            rank += f"; per module: {info['rank_pattern']}"
        lines.append(("rank", rank))
    for method, settings in zip(info["method"].split("|"), info["settings"]):
        shown = {k: v for k, v in settings.items() if v not in (None, [], {}) and k not in ("targets", "exclude")}
        lines.append((f"{method} settings", ", ".join(f"{k}={v}" for k, v in shown.items()) or "(defaults)"))
    targets = info["target_modules"]
    if targets or info["adapted_modules"]:
        targets = ", ".join(targets) if isinstance(targets, list) else str(targets or "")
        lines.append(("targets", f"{targets} ({info['adapted_modules']} modules)".strip()))
    lines.append(("parameters", f"{info['parameters']:,} ({info['bytes'] / 2**20:.1f} MiB, {'/'.join(info['dtypes']) or '-'})"))
    if info["modules_to_save"]:
        lines.append(("trained in full", f"{', '.join(info['modules_to_save'])} "
                                         f"({info['saved_module_parameters']:,} parameters)"))
    if info["peftlab_version"]:
        lines.append(("written by", f"peftlab {info['peftlab_version']} (base fingerprint {info['base_fingerprint']})"))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key + ':':<{width + 2}}{value}")
    return 0
