"""``peftlab merge``, ``combine``, ``extract-lora`` and ``methods``."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from .info import read_adapter_header
from .train import base_quantization, say

# ---------------------------------------------------------------------------------------------
# merge


def cmd_merge(args) -> int:
    import peftlab
    from ..models import load_model

    adapter, out = Path(args.adapter), Path(args.out)
    hf, (tensors, _) = read_adapter_header(adapter)
    if out.resolve() == adapter.resolve():
        raise ConfigError("--out must be a different folder from the adapter's")
    model_name = args.model or hf.get("base_model_name_or_path")
    if not model_name:
        raise ConfigError(f"{adapter}: adapter_config.json names no base model; pass --model")
    task = "sequence-classification" if hf.get("task_type") == "SEQ_CLS" else "causal-lm"
    num_labels = next((t["shape"][0] for n, t in tensors.items()
                       if n.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight"))), 2)
    say(f"loading {model_name} and {adapter}")
    model, tokenizer = load_model(model_name, task=task, num_labels=num_labels, device=args.device)
    quantized = base_quantization(adapter)
    if quantized:
        say(f"{adapter} was trained on a {'/'.join(sorted({q['format'] for q in quantized}))} base: quantizing the base "
            "the same way and merging into its dequantized weights (a full-precision model)")
        peftlab.quant.dequantize(peftlab.quant.quantize_like(model, quantized))
    peftlab.load(model, adapter)
    peftlab.merge(model)
    model = peftlab.unload(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    auto = "AutoModelForSequenceClassification" if task == "sequence-classification" else "AutoModelForCausalLM"
    say(f"merged model written to {out}; load it with transformers.{auto}.from_pretrained({str(out)!r})")
    return 0


def cmd_combine(args) -> int:
    import peftlab
    from ..compose import combine
    from ..formats.files import write_json
    from ..models import load_model

    out = Path(args.out)
    folders = [Path(a) for a in args.adapters]
    if any(out.resolve() == f.resolve() for f in folders):
        raise ConfigError("--out must be a new folder, not one of the adapters'")
    try:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else [1.0] * len(folders)
    except ValueError:
        raise ConfigError(f"--weights takes comma-separated numbers, e.g. 1,1,-0.5; got {args.weights!r}") from None
    bases = {str(f): read_adapter_header(f)[0].get("base_model_name_or_path") for f in folders}
    named = sorted({b for b in bases.values() if b})
    if not args.model and len(named) != 1:
        raise ConfigError(f"the adapters name {'no base model' if not named else 'different base models: ' + ', '.join(named)}"
                          "; pass --model")
    model_name = args.model or named[0]
    say(f"loading {model_name} and {len(folders)} adapters")
    model, _ = load_model(model_name)
    names = [f"input{i}" for i in range(len(folders))]
    for folder, name in zip(folders, names):
        peftlab.load(model, folder, name=name)
    result = combine(model, names, weights, method=args.method, density=args.density, rank=args.rank, seed=args.seed,
                     space=args.space)
    adapter = peftlab.save(model, out, name=result.name)
    ranks = sorted(set(result.ranks.values()))
    report = {"method": args.method, "inputs": [str(f) for f in folders], "weights": weights, "density": args.density,
              "rank": args.rank, "seed": args.seed, "space": args.space, "ranks": result.ranks, "energy_dropped": result.energy_dropped}
    write_json(out / "combine.json", report)
    say(f"{args.method} of {len(folders)} adapters: {len(result.ranks)} layers, rank "
        f"{ranks[0] if len(ranks) == 1 else f'{ranks[0]}-{ranks[-1]}'}, at most {100 * result.max_energy_dropped:.2f}% "
        f"of a layer's update energy dropped")
    say(f"saved {adapter} (a plain Hugging Face PEFT LoRA) and {out / 'combine.json'}")
    return 0


def cmd_extract_lora(args) -> int:
    from ..compose.extract import extract_to_folder

    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    extract_to_folder(args.model, args.base, args.out, args.max_rank, targets, args.min_energy, say=say)
    return 0


# ---------------------------------------------------------------------------------------------
# methods


def cmd_methods(args) -> int:
    from ..methods.table import markdown_table, method_rows

    if args.compare_hf:
        return compare_hf(args)
    if args.markdown:
        print(markdown_table())
        return 0
    rows = method_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    headers = {"name": "method", "category": "category", "mergeable": "mergeable",
               "params_smollm2_135m": "params (SmolLM2-135M)", "paper": "paper"}
    table = [{k: ("yes" if r[k] is True else "no" if r[k] is False else str(r[k])) for k in headers} for r in rows]
    print_columns(headers, table)
    return 0


def print_columns(headers: dict, rows: list) -> None:
    """``rows`` (dicts of strings) as left-aligned columns under ``headers`` ({key: title})."""
    widths = {k: max(len(headers[k]), *(len(r[k]) for r in rows)) for k in headers}
    print("  ".join(f"{headers[k]:<{widths[k]}}" for k in headers).rstrip())
    for r in rows:
        print("  ".join(f"{r[k]:<{widths[k]}}" for k in headers).rstrip())


def compare_hf(args) -> int:
    from ..methods import parity

    if args.markdown:
        print(parity.markdown_table())
        return 0
    types, options, survey = parity.type_rows(), parity.option_rows(), parity.survey_rows()
    if args.json:
        print(json.dumps({"hf_peft": parity.HF_VERSION, "types": types, "lora_options": options, "survey": survey},
                         indent=2))
        return 0
    def cell(value):
        return "yes" if value is True else "no" if value is False else value or "-"

    headers = {"hf": "HF PEFT type", "peftlab": "peftlab", "files": "files both ways", "sst2": "SST-2 peftlab",
               "sst2_hf": "SST-2 HF PEFT", "note": "note"}
    print_columns(headers, [{k: cell(r[k]) for k in headers} for r in types])
    print()
    headers = {"hf": "HF PEFT LoRA option", "peftlab": "peftlab", "files": "files both ways", "note": "note"}
    print_columns(headers, [{k: cell(r[k]) for k in headers} for r in options])
    print()
    headers = {"method": "survey method (not in HF PEFT)", "paper": "paper", "peftlab": "peftlab", "note": "note"}
    print_columns(headers, [{k: cell(r[k]) for k in headers} for r in survey])
    return 0

