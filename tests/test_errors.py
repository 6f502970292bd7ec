"""Bad input: wrong bases, damaged files, pickles, missing folders, a full disk."""
from __future__ import annotations

import errno
import json
import os
import stat

import pytest
import torch
from conftest import logits, make_gpt2, make_llama, randomize_adapters
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import peftlab
from peftlab.core.layer import AdapterLayer
from peftlab.formats import files


@pytest.fixture
def saved(tmp_path):
    model = peftlab.attach(make_llama(), "lora[r=4,targets=[q_proj,v_proj]]")
    randomize_adapters(model)
    folder = tmp_path / "adapter"
    peftlab.save(model, folder)
    return folder


def _untouched(model):
    return not any(isinstance(m, AdapterLayer) for m in model.modules()) and all(p.requires_grad for p in model.parameters())


def test_wrong_hidden_size(saved):
    other = make_llama(hidden_size=48)
    with pytest.raises(peftlab.IncompatibleBaseError, match="wrong base model") as info:
        peftlab.load(other, saved)
    assert "q_proj" in str(info.value) and "32" in str(info.value) and "48" in str(info.value)
    assert _untouched(other)


def test_wrong_hidden_size_without_fingerprint(saved):
    """An adapter written by peft carries no fingerprint: the shapes still catch a wrong base."""
    from safetensors import safe_open

    with safe_open(str(saved / "adapter_model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(saved / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(peftlab.IncompatibleBaseError):
        peftlab.load(make_llama(hidden_size=48), saved)
    peftlab.load(make_llama(vocab_size=100), saved)  # same shapes and no fingerprint: nothing to object to


def test_same_shapes_different_base(saved, ids):
    other = make_llama(vocab_size=100)
    with pytest.raises(peftlab.IncompatibleBaseError, match="fingerprint") as info:
        peftlab.load(other, saved)
    assert "check_base=False" in str(info.value)
    assert _untouched(other)
    peftlab.load(other, saved, check_base=False)  # the user knows better
    assert peftlab.summary(other)["active"] == ["default"]


def test_head_for_a_different_number_of_labels(tmp_path):
    import warnings

    import peft
    from conftest import make_bert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_bert(), peft.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
        theirs.save_pretrained(str(tmp_path / "peft"))
    other = make_bert(num_labels=2)
    with pytest.raises(peftlab.IncompatibleBaseError, match="classifier"):
        peftlab.load(other, tmp_path / "peft")
    assert _untouched(other)
    ours = peftlab.attach(make_bert(), "lora[r=2,targets=query,modules_to_save=classifier]")
    peftlab.save(ours, tmp_path / "ours")
    with pytest.raises(peftlab.IncompatibleBaseError):
        peftlab.load(make_bert(num_labels=2), tmp_path / "ours")


def test_different_architecture(saved):
    with pytest.raises(peftlab.IncompatibleBaseError, match="does not have"):
        peftlab.load(make_gpt2(), saved)


@pytest.mark.parametrize("keep", [0, 7, 8, 40, 0.5, -1])
def test_truncated_weights(saved, keep):
    path = saved / "adapter_model.safetensors"
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    path.write_bytes(data[:n])
    model = make_llama()
    with pytest.raises(peftlab.AdapterFormatError, match="corrupt or truncated"):
        peftlab.load(model, saved)
    assert _untouched(model)


@settings(max_examples=30, deadline=None)
@given(cut=st.floats(0, 1, exclude_max=True), flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                                                          st.integers(1, 255)), max_size=3))
def test_damaged_weights_never_crash_obscurely(tmp_path_factory, cut, flips):
    """Whatever happens to the bytes, loading either works or raises a PeftlabError."""
    folder = tmp_path_factory.mktemp("adapter")
    model = peftlab.attach(make_llama(), "lora[r=2,targets=q_proj]")
    peftlab.save(model, folder)
    path = folder / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    for where, value in flips:
        data[int(where * len(data))] ^= value
    data = data[: max(1, int(len(data) * (1 - cut / 4)))]
    path.write_bytes(bytes(data))
    try:
        peftlab.load(make_llama(), folder)
    except peftlab.PeftlabError:
        pass


@pytest.mark.parametrize("content", [b"{\"r\": 4,", b"", b"\xff\xfe\x00garbage", b"[1, 2]", b"nul"])
def test_corrupt_config(saved, content):
    (saved / "adapter_config.json").write_bytes(content)
    with pytest.raises(peftlab.AdapterFormatError, match="adapter_config.json"):
        peftlab.load(make_llama(), saved)


@pytest.mark.parametrize("change,match", [
    ({"r": "four"}, "invalid values"),
    ({"lora_alpha": -1}, "invalid values"),
    ({"peft_type": "XLORA"}, "not supported"),
    ({"init_lora_weights": "pissa"}, "path_initial_model_for_weight_conversion"),
    ({"r": 8}, "do not belong together"),
    ({"use_dora": True}, "do not belong together"),
])
def test_config_that_does_not_fit(saved, change, match):
    config = json.loads((saved / "adapter_config.json").read_text())
    config.update(change)
    (saved / "adapter_config.json").write_text(json.dumps(config))
    model = make_llama()
    with pytest.raises(peftlab.AdapterFormatError, match=match):
        peftlab.load(model, saved)
    assert _untouched(model)


def test_corrupt_peftlab_metadata(saved):
    from safetensors import safe_open

    with safe_open(str(saved / "adapter_model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(saved / "adapter_model.safetensors"), metadata={"peftlab": "{not json"})
    with pytest.raises(peftlab.AdapterFormatError, match="metadata is corrupt"):
        peftlab.load(make_llama(), saved)


def test_foreign_tensor_names(saved):
    save_file({"something.else": torch.zeros(2)}, str(saved / "adapter_model.safetensors"))
    with pytest.raises(peftlab.AdapterFormatError, match="base_model.model."):
        peftlab.load(make_llama(), saved)
    save_file({"base_model.model.lm_head.weight": torch.zeros(2)}, str(saved / "adapter_model.safetensors"))
    with pytest.raises(peftlab.AdapterFormatError, match="no LoRA tensors"):
        peftlab.load(make_llama(), saved)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)},
              str(saved / "adapter_model.safetensors"))
    with pytest.raises(peftlab.AdapterFormatError, match="incomplete"):
        peftlab.load(make_llama(), saved)


def test_pickle_only_folder(tmp_path):
    torch.save({"base_model.model.x.lora_A.weight": torch.zeros(2, 2)}, tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(peftlab.AdapterFormatError, match="pickle") as info:
        peftlab.load(make_llama(), tmp_path)
    assert "adapter_model.bin" in str(info.value) and "safetensors" in str(info.value)


def test_missing_files(tmp_path, saved):
    with pytest.raises(peftlab.AdapterFormatError, match="does not exist"):
        peftlab.load(make_llama(), tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(peftlab.AdapterFormatError, match="no adapter_model.safetensors"):
        peftlab.load(make_llama(), tmp_path / "empty")
    (saved / "adapter_config.json").unlink()
    with pytest.raises(peftlab.AdapterFormatError, match="no adapter_config.json"):
        peftlab.load(make_llama(), saved)


def _disk_full_on(monkeypatch, call):
    """From the ``call``-th fsync on, report a full disk (where a real full disk would surface)."""
    calls = []
    real = os.fsync

    def fsync(fd):
        calls.append(fd)
        if len(calls) >= call:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("failing_file", [1, 2])
def test_disk_full_keeps_the_previous_adapter(saved, monkeypatch, failing_file, ids):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    expected = logits(peftlab.load(make_llama(), saved), ids)
    model = peftlab.attach(make_llama(), "lora[r=8,targets=[k_proj]]")  # a different adapter
    randomize_adapters(model, seed=8)
    _disk_full_on(monkeypatch, failing_file)
    with pytest.raises(peftlab.PeftlabError, match="no space left") as info:
        peftlab.save(model, saved)
    assert "untouched" in str(info.value)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before, "the previous files must stay, with no leftovers"
    torch.testing.assert_close(logits(peftlab.load(make_llama(), saved), ids), expected, rtol=0, atol=0)


def test_disk_full_in_plain_writers(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    files.write_json(path, {"step": 1})
    _disk_full_on(monkeypatch, 1)
    with pytest.raises(peftlab.PeftlabError, match="no space left"):
        files.write_json(path, {"step": 2})
    with pytest.raises(peftlab.PeftlabError, match="no space left"):
        files.write_tensors(tmp_path / "t.safetensors", {"a": torch.zeros(3)})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_saved_files_are_readable_by_others(saved):
    mask = os.umask(0)
    os.umask(mask)
    for p in saved.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p.name


def test_other_write_errors_pass_through(tmp_path, monkeypatch):
    def denied(fd):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "fsync", denied)
    with pytest.raises(OSError) as info:
        files.write_json(tmp_path / "x.json", {})
    assert info.value.errno == errno.EACCES
    assert not list(tmp_path.iterdir())
