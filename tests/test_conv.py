"""LoRA, IA3 and BitFit on torch convolutions (nn.Conv1d / Conv2d / Conv3d, methods/_conv.py):
a fresh adapter is a no-op, gradients reach every tensor, merge / unmerge, save / load, mixed
batches, and peft export / import against the real peft with the same tensors in both."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import peftlab
from peftlab.core.errors import CapabilityError, ConfigError
from peftlab.core.geometry import conv_geometry, dims, weight_axes
from peftlab.core.sites import resolve_sites

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]

DIMS = (1, 2, 3)
SIZES = {1: (12,), 2: (8, 8), 3: (5, 6, 6)}
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
POOLS = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
TARGETS = ["conv1", "conv2"]


class ConvNet(nn.Module):
    """conv1 (3 → 8, 3, padding 1, bias) → ReLU → conv2 (8 → 6, 3, stride 2, no bias) → global
    pool → Linear head (4 classes)."""

    def __init__(self, dim: int, conv2: dict | None = None) -> None:
        super().__init__()
        conv = CONVS[dim]
        self.conv1 = conv(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = conv(8, 6, 3, **(conv2 or {"stride": 2, "bias": False}))
        self.pool = POOLS[dim](1)
        self.head = nn.Linear(self.conv2.out_channels, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.conv2(self.act(self.conv1(x)))).flatten(1))


def net(dim: int, seed: int = 0, **kw) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet(dim, **kw).eval()


def images(dim: int, n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, *SIZES[dim], generator=torch.Generator().manual_seed(seed))


CONFIGS = {
    "lora": lambda **kw: peftlab.LoraConfig(**{"r": 4, "alpha": 8, "targets": TARGETS, **kw}),
    "ia3": lambda **kw: peftlab.IA3Config(targets=TARGETS, feedforward=["conv2"], **kw),
    "bitfit": lambda **kw: peftlab.BitFitConfig(targets=TARGETS, **kw),
}


def adapted(dim: int, method: str, name: str = "a", seed: int = 0, **kw) -> peftlab.AdaptedModel:
    am = peftlab.adapt(net(dim, seed))
    am.add_adapter(name, CONFIGS[method](**kw))
    am.set_active(name)
    return am


def perturb(am: peftlab.AdaptedModel, name: str, seed: int = 0, scale: float = 0.3) -> None:
    """Every tensor of the adapter moved off its identity (IA3 vectors around 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for (_, tname), t in am.adapter_tensors(name).items():
            offset = 1.0 if tname in ("ia3_l", "magnitude") else 0.0
            t.copy_(offset + scale * torch.randn(t.shape, generator=g))


def params(am: peftlab.AdaptedModel, name: str) -> dict[tuple[str, str], nn.Parameter]:
    """(site path, tensor name) -> the adapter's parameter there (adapter_tensors are detached)."""
    return {(path, tname): p for path, part in am.adapter(name).parts().items()
            for tname, p in part.named_parameters()}


def outputs(am, x: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return am(x, **kw)


# ---- geometry and targets --------------------------------------------------------------------------
def test_geometry_reads_channels_kernel_and_sliding():
    conv = nn.Conv2d(4, 6, (3, 5), stride=2, padding=1, dilation=(1, 2), groups=2, padding_mode="reflect")
    g = conv_geometry(conv)
    assert (g.in_channels, g.out_channels, g.kernel, g.stride, g.padding, g.dilation, g.groups,
            g.padding_mode, g.spatial) == (4, 6, (3, 5), (2, 2), (1, 1), (1, 2), 2, "reflect", 2)
    assert dims(conv) == (4, 6) and weight_axes(conv) == (0, 1)
    assert peftlab.core.layer.layer_kind(conv) == "conv"
    assert peftlab.core.layer.layer_kind(nn.ConvTranspose2d(2, 3, 3)) is None   # weight (in, out, *k)


def test_all_linear_leaves_convolutions_out_as_peft_does():
    sites = resolve_sites(net(2), "all-linear")
    assert [s.path for s in sites] == ["head"]


# ---- the behaviour every method shares --------------------------------------------------------------
@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("dim", DIMS)
def test_fresh_adapter_is_the_base_model(dim, method):
    x = images(dim)
    base = outputs(net(dim), x)
    assert torch.equal(outputs(adapted(dim, method), x), base)


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("dim", DIMS)
def test_gradients_reach_every_adapter_tensor(dim, method):
    am = adapted(dim, method)
    perturb(am, "a")
    am.set_trainable("a")
    am.train()
    am(images(dim)).square().sum().backward()
    assert params(am, "a").keys() == am.adapter_tensors("a").keys()
    for key, p in params(am, "a").items():
        assert p.grad is not None and p.grad.abs().sum() > 0, key


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("dim", DIMS)
def test_merge_equals_unmerged_and_unmerge_restores_the_bits(dim, method):
    am = adapted(dim, method)
    perturb(am, "a")
    x = images(dim)
    live = outputs(am, x)
    before = {k: v.clone() for k, v in am.model.state_dict().items() if "base_layer" in k}
    assert not torch.allclose(live, outputs(net(dim), x), atol=1e-3)   # the adapter does something
    am.merge("a")
    torch.testing.assert_close(outputs(am, x), live, atol=1e-5, rtol=0)
    if method == "bitfit":       # conv2 had no bias: merging made one
        assert am.model.conv2.base_layer.bias is not None
    am.unmerge("a")
    after = {k: v for k, v in am.model.state_dict().items() if "base_layer" in k}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(outputs(am, x), live)
    plain = am.merge_and_unload()
    torch.testing.assert_close(outputs(plain, x), live, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("dim", DIMS)
def test_save_and_load_are_bit_exact(dim, method, tmp_path):
    am = adapted(dim, method)
    perturb(am, "a")
    x = images(dim)
    am.save_adapter(tmp_path / "a", "a")
    again = peftlab.adapt(net(dim))
    again.load_adapter(tmp_path / "a", "a")
    again.set_active("a")
    saved, loaded = am.adapter_tensors("a"), again.adapter_tensors("a")
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert torch.equal(outputs(again, x), outputs(am, x))


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("dim", DIMS)
def test_mixed_batch_equals_each_adapter_alone(dim, method):
    am = peftlab.adapt(net(dim))
    extra = {"lora": {"r": 2}, "ia3": {}, "bitfit": {}}[method]     # LoRA: two ranks in one stack
    am.add_adapter("a", CONFIGS[method]())
    am.add_adapter("b", CONFIGS[method](**extra))
    perturb(am, "a", seed=1)
    perturb(am, "b", seed=2)
    x = images(dim, n=5)
    route = ["a", "b", None, "b", "a"]
    mixed = outputs(am, x, adapter_ids=route)
    for i, name in enumerate(route):
        if name is None:
            with am.disabled():
                alone = outputs(am, x[i:i + 1])
        else:
            am.set_active(name)
            alone = outputs(am, x[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_training_in_a_mixed_batch_gives_each_adapter_its_own_gradients(method):
    am = peftlab.adapt(net(2))
    am.add_adapter("a", CONFIGS[method]())
    am.add_adapter("b", CONFIGS[method]())
    perturb(am, "a", seed=1)
    perturb(am, "b", seed=2)
    am.set_trainable(["a", "b"])
    x, route = images(2, n=4), ["a", "b", "b", "a"]
    am(x, adapter_ids=route).square().sum().backward()
    routed = {(n, k): p.grad.clone() for n in "ab" for k, p in params(am, n).items()}
    am.zero_grad()
    for name in "ab":
        rows = [i for i, r in enumerate(route) if r == name]
        am.set_active(name)
        am(x[rows]).square().sum().backward()
        for k, p in params(am, name).items():
            torch.testing.assert_close(routed[(name, k)], p.grad, atol=1e-5, rtol=1e-5)


# ---- LoRA: peft's conv LoRA ----------------------------------------------------------------------
def peft_lora(dim: int, seed: int = 0, **kw) -> peft.PeftModel:
    return peft.get_peft_model(net(dim, seed), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                               init_lora_weights=False, **kw))


@pytest.mark.parametrize("variant", [{}, {"rslora": True}, {"dora": True}])
@pytest.mark.parametrize("dim", DIMS)
def test_lora_export_loads_in_peft_with_equal_logits(dim, variant, tmp_path):
    am = adapted(dim, "lora", **variant)
    perturb(am, "a")
    x = images(dim)
    peftlab.export_peft(am, "a", tmp_path)
    theirs = peft.PeftModel.from_pretrained(net(dim), tmp_path).eval()
    torch.testing.assert_close(outputs(theirs, x), outputs(am, x), atol=1e-6, rtol=1e-6)
    am.merge("a")     # and merged, as peft merges
    torch.testing.assert_close(outputs(theirs.merge_and_unload(), x), outputs(am, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", [{}, {"use_rslora": True}, {"use_dora": True}])
@pytest.mark.parametrize("dim", DIMS)
def test_lora_imports_peft_s_own_conv_save_with_equal_outputs(dim, variant, tmp_path):
    theirs = peft_lora(dim, **variant).eval()
    with torch.no_grad():    # DoRA's magnitude off its start too
        for name, p in theirs.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.1)
    theirs.save_pretrained(tmp_path)
    am = peftlab.adapt(net(dim))
    am.load_adapter(tmp_path, "p")
    am.set_active("p")
    x = images(dim)
    torch.testing.assert_close(outputs(am, x), outputs(theirs, x), atol=1e-6, rtol=1e-6)
    lora_B = am.adapter_tensors("p")[("conv1", "lora_B")]
    assert torch.equal(lora_B, theirs.base_model.model.conv1.lora_B["default"].weight)   # the same tensors


def test_lora_mixed_batch_with_dora_and_rslora():
    am = peftlab.adapt(net(2))
    am.add_adapter("d", CONFIGS["lora"](dora=True))
    am.add_adapter("s", CONFIGS["lora"](rslora=True, r=3))
    perturb(am, "d", seed=1)
    perturb(am, "s", seed=2)
    x, route = images(2, n=3), ["d", "s", "d"]
    mixed = outputs(am, x, adapter_ids=route)
    for i, name in enumerate(route):
        am.set_active(name)
        torch.testing.assert_close(mixed[i:i + 1], outputs(am, x[i:i + 1]), atol=1e-5, rtol=0)


def test_acceptance_conv2d_lora_on_a_small_cnn(tmp_path):
    """Issue 22, acceptance 5: merged == unmerged, export → peft loads with equal logits."""
    am = adapted(2, "lora")
    am.set_trainable("a")
    opt = torch.optim.SGD([p for p in am.parameters() if p.requires_grad], lr=0.1)
    x, labels = images(2, n=8), torch.arange(8) % 4
    am.train()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(am(x), labels).backward()
        opt.step()
    am.eval()
    trained = outputs(am, x)
    assert not torch.allclose(trained, outputs(net(2), x), atol=1e-4)
    peftlab.export_peft(am, "a", tmp_path)
    theirs = peft.PeftModel.from_pretrained(net(2), tmp_path).eval()
    torch.testing.assert_close(outputs(theirs, x), trained, atol=1e-6, rtol=1e-6)
    am.merge("a")
    torch.testing.assert_close(outputs(am, x), trained, atol=1e-5, rtol=0)


@pytest.mark.parametrize("conv2", [{"dilation": 2, "padding": 2}, {"padding": 1, "padding_mode": "reflect"}])
def test_dilated_or_reflect_padded_convs_merge_exactly_but_have_no_peft_form(conv2, tmp_path):
    am = peftlab.adapt(net(2, conv2=conv2))
    am.add_adapter("a", CONFIGS["lora"]())
    am.set_active("a")
    perturb(am, "a")
    x = images(2)
    live = outputs(am, x)
    am.merge("a")          # A slides like the base, so B(A(x)) is conv(x, ΔW)
    torch.testing.assert_close(outputs(am, x), live, atol=1e-5, rtol=0)
    am.unmerge("a")
    mixed = outputs(am, x, adapter_ids=["a", None, "a", None])    # the grouped conv slides alike
    torch.testing.assert_close(mixed[::2], live[::2], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1::2], outputs(net(2, conv2=conv2), x)[1::2], atol=1e-5, rtol=0)
    with pytest.raises(CapabilityError, match="conv2.*peft 0.21's conv LoRA builds A without"):
        peftlab.export_peft(am, "a", tmp_path / "peft")
    am.save_adapter(tmp_path / "own", "a")        # kept in peftlab's layout instead
    assert not (tmp_path / "own" / "adapter_config.json").exists()
    again = peftlab.adapt(net(2, conv2=conv2))
    again.load_adapter(tmp_path / "own", "a")
    again.set_active("a")
    assert torch.equal(outputs(again, x), live)


def test_an_unbatched_input_gets_the_same_deltas():
    for method in CONFIGS:
        am = adapted(2, method, **({"dora": True} if method == "lora" else {}))
        perturb(am, "a")
        x = images(2, n=1)
        for path in TARGETS:
            layer = am.model.get_submodule(path)
            torch.testing.assert_close(outputs(layer, x[0]), outputs(layer, x)[0], atol=1e-6, rtol=1e-6)
            x = torch.randn(1, 8, *SIZES[2])


def test_lora_refuses_grouped_convs_and_pissa_before_changing_anything():
    am = peftlab.adapt(net(2, conv2={"groups": 2}))
    with pytest.raises(ConfigError, match="grouped convolution at 'conv2' \\(groups=2\\)"):
        am.add_adapter("a", CONFIGS["lora"]())
    with pytest.raises(ConfigError, match="pissa.*convolution at 'conv1'"):
        am.add_adapter("a", peftlab.LoraConfig(targets=["conv1"], init="pissa"))
    assert am.adapters == {} and isinstance(am.model.conv1, nn.Conv2d)


@pytest.mark.parametrize("rank", [None, 3])
def test_composed_conv_lora_adds_the_deltas(rank):
    """peftlab.add on conv LoRA: the concatenated (or SVD re-factored) A and B keep conv shapes."""
    am = peftlab.adapt(net(2))
    for name, seed in (("a", 1), ("b", 2)):
        am.add_adapter(name, CONFIGS["lora"]())
        perturb(am, name, seed=seed)
    peftlab.add(am, ["a", "b"], [1.0, 1.0], name="ab", rank=rank)
    for path in TARGETS:
        deltas = am.model.get_submodule(path).deltas
        expected = deltas["a"].delta_weight() + deltas["b"].delta_weight()
        if rank is None:
            torch.testing.assert_close(deltas["ab"].delta_weight(), expected, atol=1e-5, rtol=0)
        else:
            assert deltas["ab"].lora_A.shape[:2] == (3, expected.shape[1])
    am.set_active("ab")
    assert outputs(am, images(2)).shape == (4, 4)


# ---- IA3: peft has Conv2d / Conv3d ------------------------------------------------------------------
@pytest.mark.parametrize("dim", [2, 3])
def test_ia3_export_and_import_match_peft(dim, tmp_path):
    am = adapted(dim, "ia3")
    perturb(am, "a")
    x = images(dim)
    peftlab.export_peft(am, "a", tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(net(dim), tmp_path / "ours").eval()
    torch.testing.assert_close(outputs(theirs, x), outputs(am, x), atol=1e-6, rtol=1e-6)

    own = peft.get_peft_model(net(dim), peft.IA3Config(target_modules=TARGETS, feedforward_modules=["conv2"],
                                                       init_ia3_weights=False)).eval()
    own.save_pretrained(tmp_path / "peft")
    am.load_adapter(tmp_path / "peft", "p")
    am.set_active("p")
    torch.testing.assert_close(outputs(am, x), outputs(own, x), atol=1e-6, rtol=1e-6)
    assert torch.equal(am.adapter_tensors("p")[("conv2", "ia3_l")],
                       own.base_model.model.conv2.ia3_l["default"].flatten())


def test_ia3_on_conv1d_has_no_peft_form_and_saves_in_peftlab_layout(tmp_path):
    am = adapted(1, "ia3")
    with pytest.raises(CapabilityError, match="but not the nn.Conv1d at 'conv1'"):
        peftlab.export_peft(am, "a", tmp_path / "peft")
    am.save_adapter(tmp_path / "own", "a")
    assert not (tmp_path / "own" / "adapter_config.json").exists()


def test_ia3_input_scaling_merges_into_a_grouped_conv():
    am = peftlab.adapt(net(2, conv2={"groups": 2, "bias": True}))
    am.add_adapter("a", CONFIGS["ia3"]())
    am.set_active("a")
    perturb(am, "a")
    x = images(2)
    live = outputs(am, x)
    am.merge("a")
    torch.testing.assert_close(outputs(am, x), live, atol=1e-5, rtol=0)
