"""No dead adapters (issue 22, item 4; acceptance 2): a layer whose forward never runs (its weight
read directly, as Mamba's dt_proj, or a fused path in training) is refused when named, left out
with a warning when a role or `all-linear` found it, and caught at the first forward where no
probe inputs can be built. On Mamba, every adapter tensor gets a gradient under every target
choice, and merged equals unmerged."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from method_checks import QUIET, perturb
from test_family_maps import mamba
from torch import nn

import peftlab
from peftlab.core.errors import CapabilityError
from peftlab.core.layer import AdaptedLayer
from peftlab.core.probe import DeadSiteWarning

pytestmark = QUIET
IDS = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(1))
DT = "backbone.layers.{0-1}.mixer.dt_proj"

MAMBA_CONFIGS = {
    "lora-all-linear": lambda: peftlab.LoraConfig(r=4, targets="all-linear"),
    "lora-default": lambda: peftlab.LoraConfig(r=4),
    "lora-ssm-group": lambda: peftlab.LoraConfig(r=4, targets=["ssm"]),
    "ia3-all-linear": lambda: peftlab.IA3Config(targets="all-linear", feedforward=["ssm.out"]),
    "ia3-default": lambda: peftlab.IA3Config(),
    "bitfit-default": lambda: peftlab.BitFitConfig(),
    "bitfit-all-linear": lambda: peftlab.BitFitConfig(targets="all-linear"),
}


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("choice", sorted(MAMBA_CONFIGS))
def test_mamba_every_adapter_tensor_trains_and_merges(choice: str) -> None:
    am = peftlab.adapt(mamba().eval())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = am.add_adapter("a", MAMBA_CONFIGS[choice]())
    left_out = [str(w.message) for w in caught if issubclass(w.category, DeadSiteWarning)]
    if "all-linear" in choice or "ssm" in choice or choice == "bitfit-default":
        assert len(left_out) == 1 and DT in left_out[0]       # named, never silent
    else:
        assert not left_out
    assert not any("dt_proj" in s.path or "conv1d" in s.path for s in adapter.sites)
    am.set_active("a")
    perturb(am, "a", scale=0.2, offset=1.0 if choice.startswith("ia3") else 0.0)
    adapted = logits(am)
    with am.disabled():
        assert (logits(am) - adapted).abs().max() > 1e-3
    am.set_trainable("a")
    am.train()
    am(input_ids=IDS).logits.pow(2).mean().backward()
    am.eval()
    for key, p in zip(am.adapter_tensors("a"), am.adapter_parameters("a"), strict=True):
        assert p.grad is not None and p.grad.abs().max() > 0, f"no gradient reached {key}"
    if choice == "bitfit-default":    # a bias on MambaRMSNorm, which has none: refused, with why
        with pytest.raises(CapabilityError, match="MambaRMSNorm: that norm has no bias term"):
            am.merge("a")
        return
    am.merge("a")
    torch.testing.assert_close(logits(am), adapted, rtol=0, atol=1e-5)
    am.unmerge("a")
    torch.testing.assert_close(logits(am), adapted, rtol=0, atol=1e-5)


@pytest.mark.parametrize("targets", [["dt_proj"], ["backbone.layers.1.mixer.dt_proj"], ["*.dt_proj"],
                                     ["re:.*\\.dt_proj"], ["ssm.in", "mixer.dt_proj"]])
def test_a_named_dead_layer_is_refused_before_anything_changes(targets: list[str]) -> None:
    model = mamba()
    am = peftlab.adapt(model)
    with pytest.raises(CapabilityError, match=r"dt_proj'.*forward never ran during a probe forward.*"
                                              r"reads its weight directly.*exclude=\['mixer.dt_proj'\]"):
        am.add_adapter("a", peftlab.LoraConfig(targets=targets))
    assert not am.adapters and not any(isinstance(m, AdaptedLayer) for m in model.modules())
    with pytest.raises(CapabilityError, match="find only layers LoRA cannot use.*dt_proj"):
        am.add_adapter("a", peftlab.LoraConfig(targets=["ssm.dt"]))      # a role finding only dead ones
    with pytest.raises(CapabilityError, match="conv1d"):                 # read by the scan, too
        am.add_adapter("a", peftlab.LoraConfig(targets=["conv1d"]))


def test_a_checkpoint_placing_an_adapter_on_a_dead_layer_is_refused() -> None:
    am = peftlab.adapt(mamba())
    with pytest.raises(CapabilityError, match="'backbone.layers.0.mixer.dt_proj'.*cannot be loaded"):
        am.install("a", peftlab.LoraConfig(), sites=["backbone.layers.0.mixer.in_proj",
                                                     "backbone.layers.0.mixer.dt_proj"])
    assert not am.adapters


def test_the_warning_lists_the_left_out_layers_and_exclude_silences_it() -> None:
    am = peftlab.adapt(mamba())
    with pytest.warns(DeadSiteWarning, match=r"left out 2 of the 8 sites.*backbone\.layers\.\{0-1\}\."
                                             r"mixer\.dt_proj.*exclude=\['mixer.dt_proj'\]"):
        am.add_adapter("a", peftlab.LoraConfig(targets="all-linear"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeadSiteWarning)
        adapter = am.add_adapter("b", peftlab.LoraConfig(targets="all-linear", exclude=["mixer.dt_proj"]))
    assert len(adapter.sites) == 6


class ReadsWeight(nn.Module):
    """`read`'s weight is multiplied directly, its forward never called; `used` runs. With a
    config (vocabulary only), the probe can build input_ids for it."""

    def __init__(self, with_config: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        if with_config:
            self.config = types.SimpleNamespace(vocab_size=16)
        self.embed = nn.Embedding(16, 8)
        self.used = nn.Linear(8, 8)
        self.read = nn.Linear(8, 8)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.used(self.embed(input_ids)) @ self.read.weight.T


class FusedInTraining(ReadsWeight):
    """Like a fused kernel path: `read` runs through its forward in eval, its weight is read
    directly in training."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.used(self.embed(input_ids))
        return h @ self.read.weight.T if self.training else self.read(h)


def test_a_custom_module_reading_a_child_weight_directly() -> None:
    model = ReadsWeight()
    am = peftlab.adapt(model)
    with pytest.raises(CapabilityError, match="cannot attach to 'read'"):
        am.add_adapter("a", peftlab.LoraConfig(targets=["read"]))
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    with pytest.warns(DeadSiteWarning, match=r"left out 1 of the 2 sites.*read"):
        adapter = am.add_adapter("a", peftlab.LoraConfig(targets="all-linear"))
    assert [s.path for s in adapter.sites] == ["used"]
    # eval mode probed: no hook on the forward until training mode is entered (then checked once)
    am.eval()
    assert not am.forward_check._hooks
    am.train()
    assert am.forward_check._hooks
    am.eval()
    assert not am.forward_check._hooks
    am.train()
    am(torch.tensor([[1, 2]]))
    assert not am.forward_check._hooks and am.forward_check.ran[True] is not None


def test_without_probe_inputs_the_first_forward_checks() -> None:
    """No config: the probe cannot build inputs, so the first forward records which layers ran
    and raises naming the dead one; what it recorded then refuses later adapters up front."""
    model = ReadsWeight(with_config=False).eval()
    am = peftlab.adapt(model)
    am.add_adapter("a", peftlab.LoraConfig(targets=["used", "read"]))
    ids = torch.tensor([[1, 2, 3]])
    for _ in range(2):       # every forward raises while the dead adapter is there
        with pytest.raises(CapabilityError, match=r"adapters \['a'\].*did not run in this eval-mode "
                                                  r"forward of ReadsWeight: read\b"):
            am(ids)
    am.delete_adapter("a")
    am.add_adapter("a", peftlab.LoraConfig(targets=["used"]))
    am.set_active("a")
    base = am(ids)
    with pytest.raises(CapabilityError, match="cannot attach to 'read'"):
        am.add_adapter("b", peftlab.LoraConfig(targets=["read"]))
    assert torch.equal(am(ids), base) and list(am.adapters) == ["a"]


def test_a_layer_read_directly_only_in_training_is_caught_at_the_first_training_forward() -> None:
    model = FusedInTraining().eval()
    am = peftlab.adapt(model)
    am.add_adapter("a", peftlab.LoraConfig(targets=["read"]))       # the eval probe sees it run
    am.set_active("a")
    ids = torch.tensor([[1, 2, 3]])
    am(ids)
    am.train()
    with pytest.raises(CapabilityError, match=r"did not run in this training-mode forward.*: read\b"):
        am(ids)
    am.delete_adapter("a")
    am(ids).sum()                                                   # recorded now
    with pytest.raises(CapabilityError, match="cannot attach to 'read'"):
        am.add_adapter("b", peftlab.LoraConfig(targets=["read"]))
    assert not am.forward_check._hooks                              # both modes known: unhooked


def test_layerdrop_is_not_a_dead_layer() -> None:
    """BART with LayerDrop skips encoder layers at random while training: that is no dead layer
    (its kind runs in other layers), so the first training forward passes even when it skipped
    one, and adapters added later on that layer are not refused."""
    from test_family_maps import bart
    model = bart().train()
    model.model.encoder.layerdrop = 0.5
    ran: list[int] = []
    for i, layer in enumerate(model.model.encoder.layers):
        layer.register_forward_pre_hook(lambda module, args, kwargs, i=i: ran.append(i), with_kwargs=True)

    def forward(m: nn.Module, seed: int) -> None:
        ran.clear()
        torch.manual_seed(seed)
        m(input_ids=IDS, decoder_input_ids=IDS[:, :3])

    seed = next(s for s in range(100) if forward(model, s) or len(ran) == 1)   # one layer skipped
    am = peftlab.adapt(model.eval())
    am.add_adapter("a", peftlab.LoraConfig(targets="all-linear"))
    am.train()
    forward(am, seed)
    assert len(ran) == 1 and am.forward_check.ran[True] is not None
    skipped = f"model.encoder.layers.{1 - ran[0]}.fc1"
    assert [s.path for s in am.add_adapter("b", peftlab.LoraConfig(targets=[skipped])).sites] == [skipped]


def test_the_probe_runs_once_and_leaves_the_model_as_it_was() -> None:
    model = mamba().train()
    model.backbone.layers[0].eval()
    modules = list(model.modules())
    modes = [m.training for m in modules]
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    am = peftlab.adapt(model)
    hooks = sum(len(m._forward_pre_hooks) for m in model.modules())
    rng = torch.get_rng_state()
    assert am.forward_check.live(model)                 # what add_adapter runs first
    assert torch.equal(torch.get_rng_state(), rng)      # no random numbers drawn (LoRA's init stays)
    assert [m.training for m in modules] == modes
    am.add_adapter("a", peftlab.LoraConfig())
    am.add_adapter("b", peftlab.IA3Config())
    assert len(calls) == 1
    assert [m.training for m in modules] == modes
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == hooks
