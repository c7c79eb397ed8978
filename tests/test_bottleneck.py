"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) against hand computations."""

import pytest
import torch
import torch.nn.functional as F

import peftlab
from peftlab.methods.bottleneck import BottleneckConfig as AdapterConfig

from conftest import BUILDERS, logits, tiny_bert, tiny_gpt2, tiny_llama
from method_checks import (adapter_and_other, assert_fresh_adapter_is_base, assert_save_load_bit_exact,
                           assert_trainable_is_exactly, check_training, labels_for, with_adapter)

PLACEMENTS = ["houlsby", "pfeiffer", "parallel"]
# Per arch: (ffn.up path, ffn.down path, the FFN module whose input is the FFN input) in layer 0.
FFN = {
    "llama": ("model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj", "model.layers.0.mlp"),
    "gpt2": ("transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "transformer.h.0.mlp"),
    "bert": ("bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.0.output.dense",
             "bert.encoder.layer.0.intermediate"),
}


def delta_of(am, path, name):
    return am.model.get_submodule(path).deltas[name]


def capture(module, store, key, *, pre=False):
    """A hook storing the module's input (pre) or output under store[key]."""
    if pre:
        return module.register_forward_pre_hook(lambda m, args: store.__setitem__(key, args[0]))
    return module.register_forward_hook(lambda m, args, out: store.__setitem__(key, out))


def adapter_formula(d, h):
    return d.up(d.act(d.down(h)))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_fresh_adapter_is_bit_identical_to_base(arch, placement, ids):
    base = logits(BUILDERS[arch](), ids)
    am = assert_fresh_adapter_is_base(BUILDERS[arch], AdapterConfig(placement=placement, bottleneck=8), ids)
    with am.disabled():
        assert torch.equal(logits(am, ids), base)


def test_defaults_follow_placement():
    assert AdapterConfig().targets == ["ffn.down"] and AdapterConfig().placement == "pfeiffer"
    assert AdapterConfig(placement="houlsby").targets == ["attn.o", "ffn.down"]
    assert AdapterConfig(placement="parallel").targets == ["ffn.down"]
    assert AdapterConfig().scale == 1.0 and AdapterConfig(placement="houlsby").scale == 1.0
    assert AdapterConfig(placement="parallel").scale == 0.1
    assert AdapterConfig(placement="parallel", scale=2.0, targets=["attn.o"]).scale == 2.0
    cfg = AdapterConfig(placement="houlsby")
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg
    am = peftlab.adapt(tiny_llama())
    am.add_adapter("h", AdapterConfig(placement="houlsby", bottleneck=4))
    roles = sorted({s.role for s in am.adapters["h"].sites})
    assert roles == ["attn.o", "ffn.down"] and len(am.adapters["h"].sites) == 4
    assert am.num_parameters("h") == 4 * (2 * 4 * 32 + 4 + 32)


@pytest.mark.parametrize("arch,placement", [("llama", "pfeiffer"), ("gpt2", "houlsby"),
                                            ("bert", "houlsby")])
def test_serial_matches_hand_computation(arch, placement, ids):
    am = peftlab.adapt(BUILDERS[arch]())
    am.add_adapter("a", AdapterConfig(placement=placement, bottleneck=6, activation="gelu",
                                      scale=0.7, init="random"))
    am.set_active("a")
    with am.disabled():
        base = logits(am, ids)
    paths = [s.path for s in am.adapters["a"].sites]
    seen = {}
    hooks = []
    for p in paths:
        layer = am.model.get_submodule(p)
        hooks += [capture(layer, seen, (p, "out")), capture(layer.base_layer, seen, (p, "base"))]
    out = logits(am, ids)
    for h in hooks:
        h.remove()
    assert (out - base).abs().max() > 1e-4
    for p in paths:
        d = delta_of(am, p, "a")
        o = seen[(p, "base")]
        expected = o + 0.7 * (F.linear(F.gelu(F.linear(o, d.down.weight, d.down.bias)), d.up.weight, d.up.bias))
        torch.testing.assert_close(seen[(p, "out")], expected)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_parallel_reads_ffn_input(arch, ids):
    up_path, down_path, ffn_path = FFN[arch]
    am = peftlab.adapt(BUILDERS[arch]())
    am.add_adapter("p", AdapterConfig(placement="parallel", bottleneck=5, activation="silu",
                                      scale=0.3, init="random"))
    am.set_active("p")
    d = delta_of(am, down_path, "p")
    assert d.reader_path == up_path
    up = am.model.get_submodule(up_path)
    # the pre-hook stores exactly the tensor the FFN's up projection is called with
    x = torch.randn(3, up.in_features if hasattr(up, "in_features") else up.weight.shape[0])
    up(x)
    assert d._sublayer_input is x
    # in a full forward, the contribution is scale·up(act(down(FFN input)))
    seen = {}
    layer = am.model.get_submodule(down_path)
    hooks = [capture(am.model.get_submodule(ffn_path), seen, "ffn_in", pre=True),
             capture(layer, seen, "out"), capture(layer.base_layer, seen, "base")]
    logits(am, ids)
    for h in hooks:
        h.remove()
    expected = seen["base"] + 0.3 * F.linear(F.silu(F.linear(seen["ffn_in"], d.down.weight, d.down.bias)),
                                             d.up.weight, d.up.bias)
    torch.testing.assert_close(seen["out"], expected)
    assert d._sublayer_input is None           # not kept alive after use
    with am.disabled():                         # inactive: nothing captured
        up(x)
    am.set_active([])
    up(x)
    assert d._sublayer_input is None


def test_parallel_at_attention_reads_attention_input(ids):
    am = peftlab.adapt(tiny_gpt2())
    am.add_adapter("p", AdapterConfig(placement="parallel", targets=["attn.o"], bottleneck=4,
                                      init="random", scale=1.0))
    am.set_active("p")
    d = delta_of(am, "transformer.h.1.attn.c_proj", "p")
    assert d.reader_path == "transformer.h.1.attn.c_attn"
    seen = {}
    layer = am.model.get_submodule("transformer.h.1.attn.c_proj")
    hooks = [capture(am.model.transformer.h[1].ln_1, seen, "attn_in"), capture(layer, seen, "out"),
             capture(layer.base_layer, seen, "base")]
    logits(am, ids)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(seen["out"], seen["base"] + adapter_formula(d, seen["attn_in"]))


def test_parallel_hooks_survive_wrapping_and_are_removed(ids):
    model = tiny_llama()
    up_base = model.model.layers[0].mlp.up_proj
    am = peftlab.adapt(model)
    # up_proj wrapped before (lora "x") and after (lora "y") the parallel adapter is added
    am.add_adapter("x", peftlab.LoraConfig(r=2, targets=["ffn.up"], init="random"))
    am.add_adapter("p", AdapterConfig(placement="parallel", bottleneck=4, init="random"))
    am.add_adapter("y", peftlab.LoraConfig(r=2, targets=["ffn.up"], init="random"))
    assert len(up_base._forward_pre_hooks) == 1
    am.set_active(["x", "p", "y"])
    seen = {}
    layer = am.model.get_submodule("model.layers.0.mlp.down_proj")
    hooks = [capture(am.model.model.layers[0].mlp, seen, "ffn_in", pre=True), capture(layer, seen, "out"),
             capture(layer.base_layer, seen, "base")]
    logits(am, ids)
    for h in hooks:
        h.remove()
    d = layer.deltas["p"]
    torch.testing.assert_close(seen["out"], seen["base"] + 0.1 * adapter_formula(d, seen["ffn_in"]))
    am.delete_adapter("x")
    am.delete_adapter("y")
    assert len(up_base._forward_pre_hooks) == 1     # the adapter's hook stays with the adapter
    am.delete_adapter("p")
    # only adapt()'s own hook on the output head is left (it lives until unload)
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules() if m is not model.lm_head)
    assert len(model.lm_head._forward_pre_hooks) == 1
    # unload releases the hooks too
    am.add_adapter("q", AdapterConfig(placement="parallel", bottleneck=4))
    am.add_adapter("r", AdapterConfig(placement="parallel", bottleneck=4))
    assert len(up_base._forward_pre_hooks) == 2
    plain = am.unload()
    assert all(len(m._forward_pre_hooks) == 0 for m in plain.modules())


def test_not_mergeable_and_serial_blocks_merging_its_layer():
    am = peftlab.adapt(tiny_llama())
    am.add_adapter("a", AdapterConfig(bottleneck=4, init="random"))
    am.add_adapter("l", peftlab.LoraConfig(r=2, targets=["ffn.down"], init="random"))
    am.set_active(["l", "a"])
    with pytest.raises(peftlab.CapabilityError, match="cannot be merged"):
        am.merge("a")
    with pytest.raises(peftlab.AdapterError, match="does not commute"):
        am.merge("l")       # the serial adapter reads LoRA's output: merging LoRA alone is refused


@pytest.mark.parametrize("arch,placement", [("llama", "parallel"), ("gpt2", "houlsby"), ("bert", "pfeiffer")])
def test_training_changes_only_adapter_and_lowers_loss(arch, placement, ids):
    am = adapter_and_other(BUILDERS[arch], AdapterConfig(placement=placement, bottleneck=8),
                           AdapterConfig(placement=placement, bottleneck=8, init="random"))
    assert_trainable_is_exactly(am, "a")
    # eval mode: no dropout, so the losses compare exactly
    check_training(am, "a", ids, labels_for(am, ids), others=["other"], steps=4, lr=1e-2)


@pytest.mark.parametrize("arch,placement", [("llama", "parallel"), ("gpt2", "houlsby"), ("bert", "pfeiffer")])
def test_save_load_is_bit_exact(arch, placement, tmp_path, ids):
    am = with_adapter(BUILDERS[arch], "a",
                      AdapterConfig(placement=placement, bottleneck=8, activation="tanh", init="random"))
    saved, _ = assert_save_load_bit_exact(am, "a", BUILDERS[arch], tmp_path, ids)
    assert {k[1] for k in saved} == {"down.weight", "down.bias", "up.weight", "up.bias"}


@pytest.mark.parametrize("fields,match", [
    ({"placement": "sideways"}, "placement"),
    ({"bottleneck": 0}, "bottleneck"),
    ({"bottleneck": 2.5}, "bottleneck"),
    ({"activation": "softmax"}, "activation"),
    ({"scale": float("nan")}, "scale"),
    ({"scale": "1"}, "scale"),
    ({"init": "ones"}, "init"),
    ({"targets": []}, "targets"),
])
def test_config_errors(fields, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        AdapterConfig(**fields).validate()


def test_bad_sites_are_refused_and_model_unchanged():
    am = peftlab.adapt(tiny_bert())
    with pytest.raises(peftlab.ConfigError, match="parallel adapter attaches"):
        am.add_adapter("p", AdapterConfig(placement="parallel", targets=["attn.q"]))
    with pytest.raises(peftlab.ConfigError, match="cannot attach"):
        am.add_adapter("p", AdapterConfig(targets=["embed"]))
    with pytest.raises(peftlab.ConfigError, match="no field"):
        AdapterConfig.from_dict({"width": 3})
    assert not am.adapters
    assert all(len(m._forward_pre_hooks) == 0 for m in am.model.modules())
