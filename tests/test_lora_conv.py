"""LoRA (and DoRA) on nn.Conv1d / Conv2d / Conv3d, as HF PEFT adapts convolutions: lora_A a convolution
with the base's kernel into r channels, lora_B a 1x1 convolution back; golden-tested against peft."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftlab
from peftlab.core.layer import AdapterLayer
from peftlab.errors import ConfigError, StateError, TargetError
from peftlab.methods import lora as lora_mod

from conftest import randomize_adapters

CONVS = ["conv1", "conv2", "vol", "seq"]


class TinyCNN(nn.Module):
    """Every convolution kind: a plain and a strided grouped Conv2d, a Conv3d, a Conv1d, then a linear head."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.vol = nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1), bias=False)
        self.seq = nn.Conv1d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        n = x.shape[0]
        h = F.relu(self.conv2(F.relu(self.conv1(x))))  # (n, 8, 4, 4)
        v = F.relu(self.vol(h.view(n, 2, 4, 4, 4)))  # (n, 4, 4, 4, 4)
        s = self.seq(v.reshape(n, 8, 32))  # (n, 6, 32)
        return self.head(s.mean(-1))


@pytest.fixture
def images():
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def out(model, x):
    with torch.no_grad():
        return model(x)


def _peft(model, **kwargs):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.LoraConfig(**kwargs)).eval()


def _peft_load(folder, model=None):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(model if model is not None else TinyCNN(), str(folder)).eval()


# ---- the defining property -------------------------------------------------------------------

@pytest.mark.parametrize("conv,shape", [
    (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2), (2, 4, 11)),
    (lambda: nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=1), (2, 4, 7, 6)),
    (lambda: nn.Conv2d(4, 6, 3, dilation=2, padding=2, padding_mode="reflect"), (2, 4, 7, 7)),
    (lambda: nn.Conv3d(4, 6, 3, padding=1), (2, 4, 3, 4, 5)),
])
def test_update_is_a_convolution_with_kernel_s_BA(conv, shape):
    torch.manual_seed(0)
    base = conv()
    a = lora_mod.LoraConv(base, r=3, alpha=6)
    with torch.no_grad():
        a.lora_B.weight.normal_()
    x = torch.randn(shape)
    A, B = a.lora_A.weight, a.lora_B.weight
    assert A.shape == (3, 4, *base.kernel_size) and B.shape == (6, 3, *([1] * len(base.kernel_size)))
    # by hand: the kernel s * sum_c B[o, c] A[c, i, k...], applied with the base's geometry
    kernel = 2.0 * torch.einsum("oc,cik->oik", B.flatten(1), A.flatten(2)).reshape(base.weight.shape)
    torch.testing.assert_close(a.delta_weight(), kernel, rtol=0, atol=1e-6)
    expected = base._conv_forward(x, base.weight + kernel, base.bias)
    torch.testing.assert_close(base(x) + a(x, base(x)), expected, rtol=0, atol=1e-5)


def test_attach_wraps_named_convs_and_all_linear_stays_linear(images):
    model = peftlab.attach(TinyCNN(), f"lora[r=4,targets=[{','.join(CONVS)}]]")
    assert all(isinstance(model.get_submodule(n), AdapterLayer) for n in CONVS)
    assert not isinstance(model.head, AdapterLayer)
    torch.testing.assert_close(out(model, images), out(TinyCNN(), images), rtol=0, atol=0)  # B = 0: the base
    plain = peftlab.attach(TinyCNN(), "lora[r=4]")  # all-linear
    assert isinstance(plain.head, AdapterLayer) and not any(isinstance(plain.get_submodule(n), AdapterLayer) for n in CONVS)
    container = peftlab.attach(nn.ModuleDict({"net": TinyCNN()}), "lora[r=4,targets=net]")  # what lora can wrap inside
    assert all(isinstance(container["net"].get_submodule(n), AdapterLayer) for n in [*CONVS, "head"])


def test_gradients_reach_only_the_adapter(images):
    model = randomize_adapters(peftlab.attach(TinyCNN(), "lora[r=4,targets=[conv1,conv2,vol,seq]]"))
    model(images).square().sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name
    assert model.conv1.adapters["default"].lora_A.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("spec", ["lora[r=4,targets=[conv1,vol,seq]]", "lora[r=2,alpha=8,rslora=true,lora_bias=true,targets=[conv1,seq]]",
                                  "dora[r=4,targets=[conv1,vol,seq]]", "lora[r=4,init=gaussian,targets=[conv1,vol,seq,head]]"])
def test_merge_equals_unmerged_and_unmerge_restores(spec, images):
    model = randomize_adapters(peftlab.attach(TinyCNN(), spec))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    unmerged = out(model, images)
    assert not torch.allclose(unmerged, out(TinyCNN(), images), atol=1e-3)
    peftlab.merge(model)
    torch.testing.assert_close(out(model, images), unmerged, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=1e-5)
    peftlab.merge(model)
    merged = peftlab.unload(model)
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    torch.testing.assert_close(out(merged, images), unmerged, rtol=0, atol=1e-5)


def test_dilated_and_reflect_padded_convs_merge_exactly(images):
    class Dilated(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, dilation=2, padding=2, padding_mode="reflect")

        def forward(self, x):
            return self.c(x)

    model = randomize_adapters(peftlab.attach(Dilated(), "lora[r=2,targets=c]"))
    unmerged = out(model, images)
    peftlab.merge(model)
    torch.testing.assert_close(out(model, images), unmerged, rtol=0, atol=1e-5)


def test_grouped_conv_runs_but_refuses_to_merge(images):
    model = randomize_adapters(peftlab.attach(TinyCNN(), "lora[r=4,targets=conv2]"))
    a = model.conv2.adapters["default"]
    assert a.lora_B.groups == 2 and a.lora_B.weight.shape == (8, 2, 1, 1)
    h = F.relu(model.conv1(images))
    base = model.conv2.base_layer
    torch.testing.assert_close(model.conv2(h), base(h) + a.scaling * a.lora_B(a.lora_A(h)), rtol=0, atol=1e-6)
    with pytest.raises(StateError, match="groups=2 cannot be merged"):
        peftlab.merge(model)
    with pytest.raises(ConfigError, match="divisible by its groups"):
        peftlab.attach(TinyCNN(), "lora[r=3,targets=conv2]")
    with pytest.raises(ConfigError, match="groups=2 cannot take DoRA"):
        peftlab.attach(TinyCNN(), "dora[r=4,targets=conv2]")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_rewriting_inits_refuse_convs(init):
    with pytest.raises(ConfigError, match=f"init={init} applies to linear layers only"):
        peftlab.attach(TinyCNN(), f"lora[r=2,init={init},targets=conv1]")


def test_other_methods_still_refuse_convs():
    with pytest.raises(TargetError, match="Conv2d, which vera cannot wrap"):
        peftlab.attach(TinyCNN(), "vera[r=2,targets=conv1]")
    for method in ("loha", "lokr"):  # Conv1d and Conv2d only, as in PEFT
        with pytest.raises(TargetError, match=f"Conv3d, which {method} cannot wrap"):
            peftlab.attach(TinyCNN(), f"{method}[r=2,targets=vol]")


def test_routing_rows_are_batch_items(images):
    model = TinyCNN()
    peftlab.attach(model, "lora[r=4,targets=[conv1,seq]]", name="a")
    peftlab.attach(model, "lora[r=2,targets=[conv1,vol]]", name="b")
    randomize_adapters(model)
    alone = {}
    for name in ("a", "b"):
        peftlab.set_active(model, name)
        alone[name] = out(model, images)
    with peftlab.disabled(model):
        alone[None] = out(model, images)
    rows = ["a", None, "b", "a"]
    with peftlab.routing(model, rows):
        routed = out(model, images)
    for i, name in enumerate(rows):
        torch.testing.assert_close(routed[i], alone[name][i], rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", ["lora[r=4,targets=[conv1,conv2,vol,seq]]", "dora[r=4,targets=[conv1,vol,seq]]"])
def test_save_load_exact(spec, images, tmp_path):
    model = randomize_adapters(peftlab.attach(TinyCNN(), spec))
    expected = out(model, images)
    peftlab.save(model, tmp_path)
    loaded = peftlab.load(TinyCNN(), tmp_path)
    torch.testing.assert_close(out(loaded, images), expected, rtol=0, atol=0)


# ---- HF PEFT both ways -------------------------------------------------------------------------

PEFT_CASES = [
    (dict(r=4, lora_alpha=8, target_modules=["conv1", "conv2", "vol", "seq"]), "lora[r=4,alpha=8,targets=[conv1,conv2,vol,seq]]"),
    (dict(r=4, lora_alpha=16, use_rslora=True, lora_bias=True, target_modules=["conv1", "seq", "head"]),
     "lora[r=4,alpha=16,rslora=true,lora_bias=true,targets=[conv1,seq,head]]"),
    (dict(r=2, lora_alpha=4, use_dora=True, target_modules=["conv1", "vol", "seq"]), "dora[r=2,alpha=4,targets=[conv1,vol,seq]]"),
    (dict(r=4, target_modules=["conv1", "conv2"], rank_pattern={"conv2": 2}), None),
]


@pytest.mark.parametrize("kwargs,_", PEFT_CASES)
def test_peft_conv_adapter_loads_here_and_goes_back(kwargs, _, images, tmp_path):
    theirs = randomize_adapters(_peft(TinyCNN(), **kwargs))
    expected = out(theirs, images)
    assert not torch.allclose(expected, out(TinyCNN(), images), atol=1e-3)
    theirs.save_pretrained(tmp_path)
    ours = peftlab.load(TinyCNN(), tmp_path)
    torch.testing.assert_close(out(ours, images), expected, rtol=0, atol=1e-5)
    peftlab.save(ours, tmp_path / "again")
    torch.testing.assert_close(out(_peft_load(tmp_path / "again"), images), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("_,spec", PEFT_CASES[:3])
def test_our_conv_adapter_loads_in_peft(_, spec, images, tmp_path):
    model = randomize_adapters(peftlab.attach(TinyCNN(), spec))
    expected = out(model, images)
    peftlab.save(model, tmp_path)
    theirs = _peft_load(tmp_path)
    torch.testing.assert_close(out(theirs, images), expected, rtol=0, atol=1e-5)
    if "dora" in spec:
        magnitude = theirs.base_model.model.conv1.lora_magnitude_vector["default"].weight
        assert magnitude.shape == model.conv1.adapters["default"].lora_magnitude_vector.shape == (1, 8, 1, 1)


def test_conv_file_for_another_base_is_refused(images, tmp_path):
    model = randomize_adapters(peftlab.attach(TinyCNN(), "lora[r=4,targets=[conv1]]"))
    peftlab.save(model, tmp_path)

    class Wider(TinyCNN):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3, padding=1)

    from peftlab.errors import IncompatibleBaseError

    with pytest.raises(IncompatibleBaseError, match="'conv1' is 8x3, but this model's is 16x3"):
        peftlab.load(Wider(), tmp_path)
    tmp_kernel = tmp_path / "k"

    class OtherKernel(TinyCNN):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 5, padding=2)

    from peftlab.errors import AdapterFormatError

    peftlab.save(model, tmp_kernel)
    with pytest.raises(AdapterFormatError, match="conv1"):
        peftlab.load(OtherKernel(), tmp_kernel, check_base=False)


# ---- LoHa and LoKr on Conv1d / Conv2d (PEFT's default flattened form) ----------------------------

LYCORIS = [("loha", "LoHaConfig", dict(r=2, alpha=4)), ("lokr", "LoKrConfig", dict(r=2, alpha=4)),
           ("lokr", "LoKrConfig", dict(r=1, alpha=2, decompose_both=True, decompose_factor=2))]


def _lycoris_spec(method, settings, targets="[conv1,conv2,seq]"):
    return f"{method}[{','.join(f'{k}={v}' for k, v in settings.items())},targets={targets}]"


@pytest.mark.parametrize("method,_,settings", LYCORIS)
def test_lycoris_conv_update_is_a_kernel_and_merges(method, _, settings, images):
    model = randomize_adapters(peftlab.attach(TinyCNN(), _lycoris_spec(method, settings)), std=0.5)
    adapter, base = model.conv1.adapters["default"], model.conv1.base_layer
    assert adapter.delta_weight().shape == base.weight.shape
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(model.conv1(x), F.conv2d(x, base.weight + adapter.delta_weight(), base.bias, padding=1),
                               rtol=0, atol=1e-5)
    unmerged = out(model, images)
    assert not torch.allclose(unmerged, out(TinyCNN(), images), atol=1e-3)
    peftlab.merge(model)  # grouped conv2 too: the flattened update has the grouped kernel's shape
    torch.testing.assert_close(out(model, images), unmerged, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    torch.testing.assert_close(out(model, images), unmerged, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method,config,settings", LYCORIS)
def test_lycoris_conv_files_both_ways_with_peft(method, config, settings, images, tmp_path):
    peft = pytest.importorskip("peft")
    kwargs = dict(settings, target_modules=["conv1", "conv2", "seq"], init_weights=False)  # PEFT's all-random init
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(TinyCNN(), getattr(peft, config)(**kwargs)).eval()
    with torch.no_grad():  # a product of small factors barely moves the outputs: make the update visible
        for name, p in theirs.named_parameters():
            if "hada_" in name or "lokr_" in name:
                p.mul_(4)
    expected = out(theirs, images)
    assert not torch.allclose(expected, out(TinyCNN(), images), atol=1e-3)
    theirs.save_pretrained(tmp_path)
    ours = peftlab.load(TinyCNN(), tmp_path)
    torch.testing.assert_close(out(ours, images), expected, rtol=0, atol=1e-5)
    peftlab.save(ours, tmp_path / "again")
    torch.testing.assert_close(out(_peft_load(tmp_path / "again"), images), expected, rtol=0, atol=1e-5)
    model = randomize_adapters(peftlab.attach(TinyCNN(), _lycoris_spec(method, settings)), std=0.5)
    peftlab.save(model, tmp_path / "ours")
    torch.testing.assert_close(out(_peft_load(tmp_path / "ours"), images), out(model, images), rtol=0, atol=1e-5)


def test_peft_cp_decomposed_conv_files_are_refused(tmp_path):
    from peftlab.errors import AdapterFormatError

    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(TinyCNN(), peft.LoHaConfig(r=2, target_modules=["conv1"], use_effective_conv2d=True))
    theirs.save_pretrained(tmp_path)
    with pytest.raises(AdapterFormatError, match="use_effective_conv2d"):
        peftlab.load(TinyCNN(), tmp_path)


def _vit(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=37, num_labels=3)
    return transformers.ViTForImageClassification(config).eval()


def test_transformers_vit_patch_embedding_both_ways(tmp_path):
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    logits = lambda m: m(pixel_values=pixels).logits.detach()  # noqa: E731
    targets = ["projection", "query", "value"]
    theirs = randomize_adapters(_peft(_vit(), r=4, lora_alpha=8, target_modules=targets))
    assert type(theirs.base_model.model.vit.embeddings.patch_embeddings.projection.base_layer) is nn.Conv2d
    expected = logits(theirs)
    assert not torch.allclose(expected, logits(_vit()), atol=1e-3)
    theirs.save_pretrained(tmp_path)
    ours = peftlab.load(_vit(), tmp_path)
    assert isinstance(ours.vit.embeddings.patch_embeddings.projection, AdapterLayer)
    torch.testing.assert_close(logits(ours), expected, rtol=0, atol=1e-5)
    peftlab.save(ours, tmp_path / "again")
    torch.testing.assert_close(logits(_peft_load(tmp_path / "again", _vit())), expected, rtol=0, atol=1e-5)
    peftlab.merge(ours)
    torch.testing.assert_close(logits(ours), expected, rtol=0, atol=1e-5)

