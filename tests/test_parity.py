"""The HF PEFT coverage table claims nothing the tests do not exercise.

Every PEFT type the table marks "files both ways" is run here through the real ``peft`` at the
benchmark twin's settings (``bench.cell.hf_twin``): peftlab's adapter at its defaults saves a file
``peft.PeftModel.from_pretrained`` reads with the same logits, HF PEFT's twin trains the same
number of parameters, and the twin's own file loads in peftlab with the same logits. The
prompt-learning types, whose causal-LM logits differ in layout, are covered by their own files,
which this test checks exist and use peft's config class.
"""
from __future__ import annotations

import inspect
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import logits, make_llama, peft_logits

import peftlab
from peftlab.bench.cell import hf_twin
from peftlab.core import adapters as core
from peftlab.methods import METHODS, parity

peft = pytest.importorskip("peft")

TESTS = Path(__file__).resolve().parent
README = TESTS.parent / "README.md"
# types whose logits carry virtual positions or need a Llama: tested against peft in these files
OWN_FILES = {"PROMPT_TUNING": ("test_prompt_peft.py", "PromptTuningConfig"),
             "P_TUNING": ("test_prompt_peft.py", "PromptEncoderConfig"),
             "PREFIX_TUNING": ("test_prompt_peft.py", "PrefixTuningConfig"),
             "ADAPTION_PROMPT": ("test_prompt_peft.py", "AdaptionPromptConfig"),
             "CPT": ("test_cpt.py", "CPTConfig"),
             "MULTITASK_PROMPT_TUNING": ("test_multitask_prompt.py", "MultitaskPromptTuningConfig")}
# where a default fits no single PEFT file on the tiny model (a per-layer size PEFT's config holds once)
TINY_SETTINGS = {"miss": "miss[r=16]", "road": "road[group_size=16]", "psoft": "psoft[r=16]",
                 "trainable_tokens": "trainable_tokens[token_indices=[3,17,40]]"}  # (no default ids)
SHARED = [r for r in parity.type_rows({}) if r["files"]]
WEIGHT_TYPES = [r for r in SHARED if r["hf"] not in OWN_FILES]


def test_the_table_lists_exactly_hf_peft_types():
    assert set(parity.HF_TYPES) == {t.value for t in peft.PeftType}
    assert peft.__version__ == parity.HF_VERSION


def test_every_lora_option_names_real_peft_fields():
    """Each option row names ``LoraConfig`` fields or peft functions (layer kinds aside)."""
    import peft.optimizers

    fields = set(peft.LoraConfig.__dataclass_fields__)
    functions = [f for name, f in vars(peft.optimizers).items() if name.startswith("create_")]
    optimizers = {f.__name__ for f in functions} | {p for f in functions for p in inspect.signature(f).parameters}
    for option in parity.LORA_OPTIONS:
        if "Conv" in option.hf:
            continue
        names = [n.split("=")[0].split("(")[0].strip() for n in re.split(r",\s*", option.hf)]
        unknown = [n for n in names if n not in fields | optimizers]
        assert not unknown, f"{option.hf}: {unknown} are not LoraConfig fields or peft optimizers"


def test_the_survey_rows_are_the_issues_list_and_registered_ones_cite_their_paper():
    from peftlab.methods import METHODS

    assert set(parity.SURVEY) == {"AdaMix", "MerA", "DePT", "SPoT", "ATTEMPT", "InfoPrompt", "SPT", "MEFT"}
    for row in parity.survey_rows():
        if row["in_peftlab"]:
            year = row["paper"].split(",")[1].split("(")[0].strip()
            assert year in METHODS[row["peftlab"]].PAPER, (row, METHODS[row["peftlab"]].PAPER)
        else:
            assert row["note"], f"{row['method']} is missing and should say why"


def test_readme_parity_table_is_generated():
    text = README.read_text()
    found = re.search(r"<!-- parity:start -->\n(.*?)<!-- parity:end -->", text, re.S)
    assert found, "README has no parity block"
    assert found.group(1).strip() == parity.markdown_table(), \
        "run: peftlab methods --compare-hf --markdown, and paste it into README.md"


@pytest.mark.parametrize("peft_type", sorted(OWN_FILES))
def test_prompt_types_have_their_own_peft_tests(peft_type):
    file, config_class = OWN_FILES[peft_type]
    assert config_class in (TESTS / file).read_text()


FILE_OPTIONS = [o for o in parity.LORA_OPTIONS if o.files and parity.option_present(o)]


@pytest.mark.parametrize("option", FILE_OPTIONS, ids=[o.hf.split(",")[0] for o in FILE_OPTIONS])
def test_lora_options_marked_as_files_go_through_peft(option, ids, tmp_path):
    """A spec the tiny Llama can take saves a file peft reads with the same logits; the others name
    the test file that runs them through peft."""
    if option.tested_in:
        text = (TESTS / option.tested_in).read_text()
        value = re.search(r"'(\w+)'", option.hf)  # init_lora_weights='eva': the test names eva
        needle = value.group(1) if value else option.hf.split()[0]
        assert "peft." in text and (needle in text or "Conv" in needle), option
        return
    if option.spec.startswith("TrainConfig("):
        pytest.fail(f"{option.hf}: a trainer setting is not a file option")
    if option.spec.startswith("LoraConfig("):
        from peftlab.methods.lora import LoraConfig

        spec = eval(option.spec, {"LoraConfig": LoraConfig})  # the row's own literal, e.g. rank_pattern={...}
    else:
        spec = option.spec
    ours = peftlab.attach(make_llama(), spec)
    moved([p for _, a in core.all_adapters(ours) for p in a.parameters() if p.requires_grad])
    peftlab.save(ours, tmp_path)
    torch.testing.assert_close(peft_logits(make_llama, tmp_path, ids), logits(ours, ids), rtol=1e-5, atol=1e-5)


def factory(method):
    return lambda: make_llama(**getattr(METHODS[method], "EXAMPLE_MODEL_SETTINGS", {}))


def moved(parameters, seed=0, std=0.02):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


@pytest.mark.parametrize("peft_type,method", [(r["hf"], r["peftlab"]) for r in WEIGHT_TYPES],
                         ids=[r["hf"] for r in WEIGHT_TYPES])
def test_files_move_both_ways_at_the_twins_settings(peft_type, method, ids, tmp_path):
    make = factory(method)
    spec = TINY_SETTINGS.get(method, method)
    ours = peftlab.attach(make(), spec)
    moved([p for _, a in core.all_adapters(ours) for p in a.parameters() if p.requires_grad])
    peftlab.save(ours, tmp_path / "ours")
    if method == "poly":  # PEFT's Poly layers want task ids in every call
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.PeftModel.from_pretrained(make(), str(tmp_path / "ours")).eval()
        loaded = logits(theirs, ids, task_ids=torch.zeros(ids.shape[0], dtype=torch.long))
    else:
        loaded = peft_logits(make, tmp_path / "ours", ids)
    torch.testing.assert_close(loaded, logits(ours, ids), rtol=1e-5, atol=1e-5)

    task = SimpleNamespace(kind="causal-lm", total_steps=100)
    twin = hf_twin(make(), method, task, spec)  # the PeftModel the benchmark trains
    trainable = [p for p in twin.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == sum(p.numel() for p in ours.parameters() if p.requires_grad)
    moved(trainable, seed=1)
    twin.save_pretrained(tmp_path / "twin")
    expected = logits(twin.eval(), ids)
    torch.testing.assert_close(logits(peftlab.load(make(), tmp_path / "twin"), ids), expected, rtol=1e-5, atol=1e-5)
