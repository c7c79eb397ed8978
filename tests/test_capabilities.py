"""Capabilities are declared once, on each method's record, and the machinery keeps to them.

Conformance over every registered method (`peftlab.methods.METHODS`) on tiny Llama: merging
keeps the outputs iff the method declares MERGE (else CapabilityError); a mixed batch gives
every row what its adapter gives alone iff it declares MIXED_BATCH (else CapabilityError);
a routed backward gives each adapter the gradients of its own rows iff it declares
TRAIN_IN_MIXED_BATCH (else CapabilityError); on an nf4 tiny Llama it trains a step iff it
declares QUANTISED_BASE (else CapabilityError, model unchanged); every peft codec round-trips.
A new method is picked up here with its default config (add an entry to CONFIG when that
default does not meet its merge condition on Llama, and to UNMERGEABLE when it declares a
merge condition). Then the
registry's refusals, the derived `mergeable`, and the deprecated AdapterConfig alias.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from conftest import VOCAB, logits, tiny_llama

import peftlab
from peftlab.core.errors import CapabilityError, ConfigError
from peftlab.core.method import Capability, register
from peftlab.core.typology import Typology
from peftlab.methods import METHODS
from peftlab.methods.bottleneck import BottleneckConfig

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]

# Config fields per method where its default config does not meet its merge condition on Llama.
CONFIG = {"bitfit": {"targets": "all-linear"}}          # Llama's RMSNorms have no bias term
# For every method with a merge condition: a config that breaks it (on Llama).
UNMERGEABLE = {
    "bitfit": {"targets": "norm"},
    "adalink": {"activation": "relu"},
    "context": {"groups": {"image": {"token_ids": [5, 6]}, "text": {"all": True}}},
}
ROUTE = ["a", None, "b", "a"]
ALL = list(METHODS)


def declares(name: str, capability: Capability) -> bool:
    return capability in METHODS[name].capabilities


def adapted(name: str, *adapters: str, **fields) -> peftlab.AdaptedModel:
    """Tiny Llama with adapters of method `name`, each moved off its start (seeded noise), so it
    visibly changes the outputs."""
    am = peftlab.adapt(tiny_llama())
    config_cls = METHODS[name].config_cls
    for seed, adapter in enumerate(adapters):
        am.add_adapter(adapter, config_cls(**{**CONFIG.get(name, {}), **fields}))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in am.adapter_parameters(adapter):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return am


def batch(rows: int = len(ROUTE)) -> torch.Tensor:
    return torch.randint(1, VOCAB, (rows, 9), generator=torch.Generator().manual_seed(4))


def assert_moves_outputs(am: peftlab.AdaptedModel, ids: torch.Tensor, out: torch.Tensor) -> None:
    with am.disabled():
        assert (out - logits(am, ids)).abs().max() > 1e-3, "the adapter does not change the outputs"


# ---- merge -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_merge_keeps_outputs_iff_declared(name, ids):
    am = adapted(name, "a")
    am.set_active("a")
    out = logits(am, ids)
    assert_moves_outputs(am, ids, out)
    if declares(name, Capability.MERGE):
        am.merge("a")
        assert am.adapters["a"].merged
        torch.testing.assert_close(logits(am, ids), out, atol=1e-5, rtol=1e-4)
        am.unmerge("a")
    else:
        with pytest.raises(CapabilityError, match="merge"):
            am.merge("a")
        assert not am.adapters["a"].merged
    torch.testing.assert_close(logits(am, ids), out, atol=1e-5, rtol=1e-4)


def test_every_merge_condition_has_a_refused_config():
    conditional = {n for n, m in METHODS.items() if m.merge_condition}
    assert conditional == set(UNMERGEABLE), "a method with a merge condition needs an UNMERGEABLE config"
    assert conditional >= {"bitfit", "adalink", "context"}


@pytest.mark.parametrize("name", sorted(UNMERGEABLE))
def test_merge_outside_the_condition_is_refused(name, ids):
    am = adapted(name, "a", **UNMERGEABLE[name])
    am.set_active("a")
    out = logits(am, ids)
    with pytest.raises(CapabilityError):
        am.merge("a")
    assert not am.adapters["a"].merged
    assert torch.equal(logits(am, ids), out)


# ---- mixed batches -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_mixed_batch_matches_each_adapter_alone_iff_declared(name):
    ids = batch()
    if not declares(name, Capability.MIXED_BATCH):
        am = adapted(name, "a")            # one adapter: KaSA refuses a second on the same site
        with pytest.raises(CapabilityError):
            am(ids, adapter_ids=["a", None, "a", None])
        assert am.state.routed is None
        return
    am = adapted(name, "a", "b")
    with torch.no_grad():
        mixed = am(ids, adapter_ids=ROUTE).logits
        alone = []
        for i, adapter in enumerate(ROUTE):
            am.set_active([adapter] if adapter else [])
            alone.append(am(ids[i:i + 1]).logits)
        # the same input through a, b and the base: three different outputs
        same = am(ids[:1].expand(3, -1), adapter_ids=["a", "b", None]).logits
    torch.testing.assert_close(mixed, torch.cat(alone), atol=1e-5, rtol=1e-4)
    assert (same[0] - same[1]).abs().max() > 1e-3 and (same[0] - same[2]).abs().max() > 1e-3


def row_losses(out: torch.Tensor) -> torch.Tensor:
    """A sum of per-row losses, so gradients add up the same whatever the batch layout."""
    return out.logits.float().square().mean(dim=(1, 2)).sum()


@pytest.mark.parametrize("name", [n for n in ALL if declares(n, Capability.MIXED_BATCH)])
def test_routed_training_gives_each_adapter_its_rows_gradients_iff_declared(name):
    am = adapted(name, "a", "b")
    am.set_trainable(["a", "b"])
    ids = batch()
    if not declares(name, Capability.TRAIN_IN_MIXED_BATCH):
        with pytest.raises(CapabilityError, match="train-in-mixed-batch"):
            am(ids, adapter_ids=ROUTE)
        assert am.state.routed is None
        with torch.no_grad():                  # routing it for inference stays open
            am(ids, adapter_ids=ROUTE)
        am.set_trainable(None)                 # and so does a frozen adapter with gradients on
        am(ids, adapter_ids=ROUTE)
        return
    row_losses(am(ids, adapter_ids=ROUTE)).backward()
    routed = {(n, i): p.grad.clone() for n in "ab" for i, p in enumerate(am.adapter_parameters(n))}
    am.zero_grad(set_to_none=True)
    for adapter in "ab":
        rows = [i for i, n in enumerate(ROUTE) if n == adapter]
        am.set_active(adapter)
        row_losses(am(ids[rows])).backward()
    for (adapter, i), p in {(n, i): p for n in "ab" for i, p in enumerate(am.adapter_parameters(n))}.items():
        g = p.grad
        assert g.abs().max() > 0, (adapter, i)
        assert (routed[(adapter, i)] - g).abs().max() <= 1e-6 + 1e-4 * g.abs().max(), (adapter, i)


# ---- quantised bases ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_quantised_base_works_iff_declared(name, quantised_llama):
    """On an nf4 tiny Llama a method that declares QUANTISED_BASE trains a step (every adapter
    tensor gets a gradient, the base stays as it was); one that does not is refused with the
    model unchanged. Its default targets are quantised layers (tests/test_quantised.py has the
    numbers)."""
    model = quantised_llama("nf4")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    am = peftlab.adapt(model)
    config = METHODS[name].config_cls(**CONFIG.get(name, {}))
    ids = batch(2)
    if not declares(name, Capability.QUANTISED_BASE):
        with pytest.raises(CapabilityError, match="quantised-base"):
            am.add_adapter("a", config)
        assert not am.adapters and not any(isinstance(m, peftlab.AdaptedLayer) for m in model.modules())
    else:
        am.add_adapter("a", config)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in am.adapter_parameters("a"):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        am.set_active("a")
        am.set_trainable("a")
        am.train()
        out = am(input_ids=ids, labels=ids)
        aux, _ = am.auxiliary_loss()
        (out.loss if aux is None else out.loss + aux).backward()
        for p in am.adapter_parameters("a"):
            assert p.grad is not None and p.grad.abs().max() > 0
        am.unload()
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


# ---- peft codecs --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in ALL if METHODS[n].to_peft])
def test_every_peft_codec_round_trips(name, ids, tmp_path):
    am = adapted(name, "a")
    am.set_active("a")
    out = logits(am, ids)
    peftlab.export_peft(am, "a", tmp_path / "peft")
    fresh = peftlab.adapt(tiny_llama())
    imported = peftlab.import_peft(fresh, tmp_path / "peft", "a")
    fresh.set_active("a")
    assert imported.method.peft_type == METHODS[name].peft_type
    torch.testing.assert_close(logits(fresh, ids), out, atol=1e-5, rtol=1e-4)


def test_balora_exports_as_a_lora_that_peft_loads(ids, tmp_path):
    peft = pytest.importorskip("peft")
    am = adapted("balora", "a", r=2)
    am.set_active("a")
    out = logits(am, ids)
    assert_moves_outputs(am, ids, out)
    peftlab.export_peft(am, "a", tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(logits(theirs, ids), out, atol=1e-5, rtol=1e-4)
    fresh = peftlab.adapt(tiny_llama())
    assert peftlab.import_peft(fresh, tmp_path / "peft", "a").method.name == "lora"


# ---- the registry ---------------------------------------------------------------------------------
@dataclasses.dataclass
class ThrowawayConfig(peftlab.LoraConfig):
    """A config class no method owns yet."""


@pytest.fixture
def registry():
    """The registry as it was, restored after the test."""
    saved = dict(METHODS)
    yield METHODS
    METHODS.clear()
    METHODS.update(saved)


def throwaway(**changes) -> peftlab.Method:
    """LoRA's record under another name, with another config class, and `changes`."""
    return dataclasses.replace(METHODS["lora"], **{"name": "throwaway", "title": "Throwaway",
                                                   "config_cls": ThrowawayConfig, **changes})


def test_the_record_states_the_name_and_register_binds_the_config_class():
    for name, method in METHODS.items():
        assert method.config_cls.__dict__["method"] == name
        assert f'method = "{name}"' not in inspect.getsource(method.config_cls), name
    assert peftlab.BALoraConfig.method == "balora" and peftlab.LoraConfig.method == "lora"


def test_register_binds_a_new_method(registry):
    record = register(throwaway(capabilities=frozenset({"merge"})))   # strings name capabilities too
    assert registry["throwaway"] is record and ThrowawayConfig.method == "throwaway"
    assert record.capabilities == {Capability.MERGE} and record.mergeable == "yes"
    assert peftlab.get_method("throwaway") is record
    del ThrowawayConfig.method                          # unbind again for the other tests


@pytest.mark.parametrize("changes, match", [
    ({"capabilities": frozenset({"merge", "teleport"})}, "unknown capabilities.*teleport"),
    ({"capabilities": frozenset({"quantized-base"})}, "unknown capabilities"),
    ({"capabilities": frozenset({Capability.TRAIN_IN_MIXED_BATCH})}, "without 'mixed-batch'"),
    ({"capabilities": frozenset(), "merge_condition": "never"}, "does not declare 'merge'"),
    ({"peft_type": None}, "no peft_type"),
    ({"config_cls": peftlab.LoraConfig}, "LoraConfig belongs to method 'lora'"),
    ({"config_cls": peftlab.BALoraConfig}, "BALoraConfig belongs to method 'balora'"),
    ({"name": "ia3"}, "already registered"),
])
def test_register_refuses_and_registers_nothing(registry, changes, match):
    before = dict(registry)
    with pytest.raises(ConfigError, match=match):
        register(throwaway(**changes))
    assert registry == before
    assert "method" not in ThrowawayConfig.__dict__
    assert peftlab.LoraConfig.method == "lora" and peftlab.BALoraConfig.method == "balora"


def test_a_config_class_declaring_another_method_is_refused(registry):
    @dataclasses.dataclass
    class Claimed(peftlab.LoraConfig):
        method = "ia3"          # the old way of naming the method, and the wrong name

    with pytest.raises(ConfigError, match="Claimed belongs to method 'ia3'"):
        register(throwaway(config_cls=Claimed))
    assert "throwaway" not in registry


def test_supports_takes_capabilities_and_their_names_and_refuses_others():
    lora = METHODS["lora"]
    assert lora.supports(Capability.MERGE) and lora.supports("mixed-batch")
    assert not METHODS["prompt"].supports("merge")
    assert lora.supports(Capability.QUANTISED_BASE) and not METHODS["kasa"].supports("quantised-base")
    with pytest.raises(ConfigError, match="not a capability"):
        lora.supports("quantized-base")


# ---- mergeable, derived ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_mergeable_is_derived_from_the_merge_capability(name):
    method = METHODS[name]
    merge = Capability.MERGE in method.capabilities
    assert method.typology.mergeable is merge
    assert method.typology.merge_condition == method.merge_condition
    assert method.mergeable == ("no" if not merge else "conditional" if method.merge_condition else "yes")
    rows = dict(method.typology.rows())
    assert rows["mergeable"] == ("yes" if merge else "no")
    assert rows.get("merge condition") == method.merge_condition


def test_mergeable_cannot_be_declared():
    fields = {f.name: "x" for f in dataclasses.fields(Typology) if f.init}
    fields.update(site_roles=("attn.q",), form="lowrank", integration="weight-delta",
                  inter_connectivity="fixed (x)")
    assert not Typology(**fields).mergeable
    with pytest.raises(TypeError):
        Typology(**fields, mergeable=True)


def test_context_peft_is_conditionally_mergeable():
    """Its record used to say not mergeable while declaring merge; its merge folds one all-token group."""
    context = METHODS["context"]
    assert context.mergeable == "conditional" and "single all-token group" in context.merge_condition


# ---- renamed config -------------------------------------------------------------------------------
def test_adapter_config_is_a_deprecated_alias_of_bottleneck_config():
    with pytest.warns(DeprecationWarning, match="BottleneckConfig"):
        old = peftlab.AdapterConfig
    assert old is peftlab.BottleneckConfig is BottleneckConfig
    with pytest.warns(DeprecationWarning, match="BottleneckConfig"):
        from peftlab.methods.bottleneck import AdapterConfig
    assert AdapterConfig is BottleneckConfig
    assert BottleneckConfig.method == "adapter" and METHODS["adapter"].config_cls is BottleneckConfig
    with pytest.raises(AttributeError):
        peftlab.NoSuchConfig  # noqa: B018
