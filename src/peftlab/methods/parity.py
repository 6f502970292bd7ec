"""Coverage of HF PEFT (``peftlab methods --compare-hf`` and the README's parity table).

One row per PEFT type HF PEFT 0.21.2 registers (``peft.PeftType``; a test keeps ``HF_TYPES`` equal
to it) and per LoRA option of its ``LoraConfig``. Nothing in a row is asserted by hand where the
code can answer:

- *in peftlab* is whether the method is registered (``METHODS``), or, for a LoRA option, whether
  its peftlab spec builds;
- *files both ways* is whether a PEFT-format converter in ``formats/io.py`` reads that
  ``peft_type`` (for an option: whether the converter writes it, stated per row); the tests run
  every such row through the real ``peft`` in both directions (``tests/test_parity.py``);
- the SST-2 columns are the benchmark's measured accuracy of peftlab's method and of its ``hf:``
  twin (``bench/sst2_figures.json``, written by ``peftlab bench report --figures``).

What is missing says why in its note.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

FIGURES = Path(__file__).resolve().parents[1] / "bench" / "sst2_figures.json"
HF_VERSION = "0.21.2"

# peft type -> (peftlab method or where the feature lives, note). A method name that is not
# registered shows as missing, with the note as its reason.
HF_TYPES = {
    "LORA": ("lora", ""),
    "ADALORA": ("adalora", ""),
    "LOHA": ("loha", ""),
    "LOKR": ("lokr", ""),
    "OFT": ("oft", ""),
    "BOFT": ("boft", ""),
    "VERA": ("vera", ""),
    "FOURIERFT": ("fourierft", ""),
    "IA3": ("ia3", ""),
    "LN_TUNING": ("ln_tuning", ""),
    "PROMPT_TUNING": ("prompt", ""),
    "P_TUNING": ("ptuning", ""),
    "PREFIX_TUNING": ("prefix", ""),
    "ADAPTION_PROMPT": ("llama_adapter", "LLaMA-Adapter; Llama-family models only"),
    "XLORA": ("compose.mixture", "a gated mixture of frozen LoRAs (peftlab.compose.mixture), outputs twin-tested "
                                 "against peft's XLoraModel; X-LoRA's own files are not read"),
    "HRA": ("hra", ""),
    "VBLORA": ("vblora", ""),
    "MISS": ("miss", ""),
    "RANDLORA": ("randlora", ""),
    "SHIRA": ("shira", ""),
    "C3A": ("c3a", ""),
    "ROAD": ("road", ""),
    "WAVEFT": ("waveft", ""),
    "DELORA": ("delora", ""),
    "GRALORA": ("gralora", ""),
    "TRAINABLE_TOKENS": ("trainable_tokens", ""),
    "POLY": ("poly", ""),
    "CPT": ("cpt", ""),
    "MULTITASK_PROMPT_TUNING": ("multitask_prompt", ""),
    "ADAMSS": ("adamss", ""),
    "BEFT": ("beft", ""),
    "LILY": ("lily", ""),
    "FROD": ("frod", ""),
    "PVERA": ("pvera", ""),
    "GLORA": ("glora", ""),
    "UNILORA": ("unilora", ""),
    "HIRA": ("hira", ""),
    "OSF": ("osf", ""),
    "CARTRIDGE": ("cartridge", ""),
    "TINYLORA": ("tinylora", ""),
    "PSOFT": ("psoft", ""),
    "PEANUT": ("peanut", ""),
    "SHADOW": ("shadow", "not yet: a second, smaller transformer (built from the base's config) runs beside the "
                          "frozen one, its state injected into and updated from every block; it needs a "
                          "whole-block protocol, the shadow's own KV cache in generate and its auxiliary loss"),
    "SUPERTUNING": ("supertuning", ""),
    "DEFT": ("deft", ""),
}

# The survey's methods that HF PEFT does not have (issue 16): name -> (peftlab method, paper, note).
# A method name that is not registered shows as missing, with the note as its reason.
SURVEY = {
    "AdaMix": ("adamix", "Wang et al., 2022 (arXiv:2205.12410)", ""),
    "MerA": ("mera", "He et al., 2023 (arXiv:2308.15982)", ""),
    "DePT": ("dept", "Shi & Lipani, 2024 (arXiv:2309.05173)", ""),
    "SPoT": ("spot", "Vu et al., 2022 (arXiv:2110.07904)", ""),
    "ATTEMPT": ("attempt", "Asai et al., 2022 (arXiv:2205.11961)", ""),
    "InfoPrompt": ("infoprompt", "Wu et al., 2023 (arXiv:2306.04933)",
                   "not yet: only the abstract was readable here, not the two mutual-information estimators "
                   "(critic, negatives, weights) that define it"),
    "SPT": ("spt", "Zhu & Tan, 2023 (EMNLP 2023)", "not yet: learned gates choosing the layers a prompt is "
            "inserted at; neither the paper's text nor its code was readable here, only its title"),
    "MEFT": ("meft", "Liao et al., 2023 (arXiv:2306.00477)", ""),
}


@dataclass(frozen=True)
class Option:
    """A ``LoraConfig`` field of HF PEFT: peftlab's spelling (a spec string, or a trainer setting),
    whether peftlab's HF files carry it, and why not where they do not."""

    hf: str
    spec: str = ""  # peftlab's spec; empty: not in peftlab
    files: bool = False  # peftlab writes / reads it in PEFT's LoRA file
    note: str = ""
    tested_in: str = ""  # the test file that runs it through peft, where a tiny Llama cannot show it


LORA_OPTIONS = (
    Option("r, lora_alpha, lora_dropout, target_modules", "lora[r=8,alpha=16,dropout=0.1]", True),
    Option("use_rslora", "lora[rslora=true]", True),
    Option("rank_pattern, alpha_pattern", "LoraConfig(rank_pattern={'q_proj': 8}, alpha_pattern={'q_proj': 4})", True),
    Option("init_lora_weights='gaussian'", "lora[init=gaussian]", True),
    Option("init_lora_weights='pissa'", "lora[init=pissa]", True, "saved as the equivalent plain LoRA (peft's "
           "path_initial_model_for_weight_conversion form)"),
    Option("init_lora_weights='olora'", "lora[init=olora]", True, "saved as the equivalent plain LoRA"),
    Option("init_lora_weights='loftq'", "lora[init=loftq]", False, "needs a base quantized with "
           "peftlab.quantize(..., loftq_rank=r); the LoRA saves as a plain LoRA, not checked against peft's LoftQ"),
    Option("init_lora_weights='eva'", "lora[init=eva]", True, "from the trainer's first batches (or "
           "peftlab.methods.lora_data.initialize); exact PCA where peft's is incremental; tested against peft in "
           "tests/test_lora_data_inits.py", tested_in="test_lora_data_inits.py"),
    Option("init_lora_weights='corda'", "lora[init=corda]", True, "saved as the equivalent plain LoRA, as peft's "
           "converted files", tested_in="test_lora_data_inits.py"),
    Option("init_lora_weights='lora_ga'", "lora[init=lora_ga]", True, "saved as the equivalent plain LoRA, as peft's "
           "converted files", tested_in="test_lora_data_inits.py"),
    Option("use_dora", "dora", True),
    Option("lora_bias", "lora[lora_bias=true]", True),
    Option("layer_replication", "lora[layer_replication=[[0,2],[1,2]]]", True),
    Option("use_qalora, qalora_group_size", "qalora", False, "QA-LoRA is its own method here; its files are native"),
    Option("loraplus_lr_ratio (create_loraplus_optimizer)", "TrainConfig(loraplus_lr_ratio=16)", False,
           "an optimizer setting, not part of the file"),
    Option("create_lorafa_optimizer", "lora_fa", False, "LoRA-FA is its own method here; its files are native"),
    Option("target_parameters", "lora[targets=[],target_parameters=[experts.gate_up_proj]]", True,
           "raw 2-D / 3-D parameters (MoE experts); tested against peft in tests/test_lora_target_parameters.py",
           tested_in="test_lora_target_parameters.py"),
    Option("Conv1d / Conv2d / Conv3d targets", "lora[targets=[conv1]]", True,
           "convolutions named in targets (all-linear keeps to linear layers); also DoRA, and LoHa / LoKr on "
           "Conv1d / Conv2d; tested against peft in tests/test_lora_conv.py", tested_in="test_lora_conv.py"),
    Option("trainable_token_indices", "lora|trainable_tokens[token_indices=[0]]", False,
           "read from PEFT's LoRA files as lora|trainable_tokens; saved in peftlab's format"),
    Option("fan_in_fan_out (GPT-2 Conv1D)", "lora", True, "GPT-2's Conv1D layers are wrapped with fan_in_fan_out"),
    Option("megatron_config", note="Megatron-LM's parallel layers: out of scope (peftlab shards with FSDP2)"),
    Option("velora_config, monteclora_config, arrow_config, kasa_config, alora_invocation_tokens, use_bdlora",
           note="not yet: LoRA variants HF PEFT added in 2025-26, listed for a later issue"),
)


def registered(method: str) -> bool:
    from . import METHODS

    return method in METHODS or method.startswith("compose.")


def interchangeable(peft_type: str) -> bool:
    """Whether a PEFT-format converter reads (and so writes) this ``peft_type``."""
    from ..formats.io import CONVERTERS

    return any(peft_type in c.PEFT_TYPES for c in CONVERTERS)


def option_present(option: Option) -> bool:
    """Whether the option's spec builds here; a ``LoraConfig(...)`` or ``TrainConfig(...)`` spec (a
    setting the spec string cannot spell, e.g. a dict) counts when that dataclass has the field."""
    if not option.spec:
        return False
    if option.spec.startswith(("TrainConfig(", "LoraConfig(")):
        from ..train import TrainConfig
        from .lora import LoraConfig

        cls, _, rest = option.spec.partition("(")
        fields = {"TrainConfig": TrainConfig, "LoraConfig": LoraConfig}[cls].__dataclass_fields__
        return all(part.split("=")[0].strip() in fields for part in rest.split(", ") if "=" in part)
    from ..core.adapters import build_configs

    try:
        build_configs(option.spec)
    except Exception:  # an option whose setting this version lacks shows as missing, not as an error
        return False
    return True


def figures(path: Path = FIGURES) -> dict:
    """``{method: {"metric", "std", "seeds", ...}}`` of the SST-2 benchmark (``hf:`` rows included)."""
    return json.loads(path.read_text())["methods"] if path.exists() else {}


def _accuracy(entry: dict | None) -> str:
    if not entry:
        return ""
    return f"{entry['metric']:.3f} ± {entry['std']:.3f} ({entry['seeds']})" if entry["seeds"] > 1 else \
        f"{entry['metric']:.3f} (1 seed)"


def type_rows(measured: dict | None = None) -> list[dict]:
    measured = figures() if measured is None else measured
    rows = []
    for peft_type, (method, note) in HF_TYPES.items():
        present = registered(method)
        rows.append({"hf": peft_type, "peftlab": method if present else "", "in_peftlab": present,
                     "files": present and interchangeable(peft_type),
                     "sst2": _accuracy(measured.get(method)), "sst2_hf": _accuracy(measured.get("hf:" + method)),
                     "note": note if not present or method.startswith("compose.") or method == "llama_adapter" else ""})
    return rows


def survey_rows() -> list[dict]:
    return [{"method": name, "peftlab": method if registered(method) else "", "paper": paper,
             "in_peftlab": registered(method), "note": "" if registered(method) else note or "not yet"}
            for name, (method, paper, note) in SURVEY.items()]


def option_rows() -> list[dict]:
    rows = []
    for option in LORA_OPTIONS:
        present = option_present(option)
        rows.append({"hf": option.hf, "peftlab": option.spec if present else "", "in_peftlab": present,
                     "files": present and option.files, "note": option.note})
    return rows


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def markdown_table(measured: dict | None = None) -> str:
    types = type_rows(measured)
    options = option_rows()
    have = sum(r["in_peftlab"] for r in types)
    lines = [f"{have} of HF PEFT {HF_VERSION}'s {len(types)} PEFT types are in peftlab, "
             f"{sum(r['files'] for r in types)} of them with files that load both ways; "
             f"{sum(r['in_peftlab'] for r in options)} of its {len(options)} LoRA options.", "",
             "| HF PEFT type | peftlab | files both ways | SST-2 peftlab | SST-2 HF PEFT | note |",
             "|---|---|---|---|---|---|"]
    for r in types:
        name = f"`{r['peftlab']}`" if r["peftlab"] else "-"
        lines.append(f"| `{r['hf']}` | {name} | {_yes(r['files'])} | {r['sst2']} | {r['sst2_hf']} | {r['note']} |")
    lines += ["", "| HF PEFT LoRA option | peftlab | files both ways | note |", "|---|---|---|---|"]
    for r in options:
        name = f"`{r['peftlab']}`" if r["peftlab"] else "-"
        lines.append(f"| `{r['hf']}` | {name} | {_yes(r['files'])} | {r['note']} |")
    lines += ["", "| the survey's methods HF PEFT lacks | paper | peftlab | note |", "|---|---|---|---|"]
    for r in survey_rows():
        name = f"`{r['peftlab']}`" if r["peftlab"] else "-"
        lines.append(f"| {r['method']} | {r['paper']} | {name} | {r['note']} |")
    return "\n".join(lines)
