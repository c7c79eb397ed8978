"""BitFit: bias deltas on linear layers and norms, against hand computations, merging (including
layers that have no bias), training and checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import BUILDERS, logits, tiny_gpt2, tiny_llama
import method_checks
from method_checks import (assert_fresh_adapter_is_base, assert_save_load_bit_exact, base_params,
                           check_merge_unmerge_and_disable, check_training_beside_other, with_adapter)
from torch import nn

import peftlab
from peftlab.methods import get_method
from peftlab.methods.bitfit import BitFitConfig

ARCHS = ["llama", "gpt2", "bert"]
# Llama's RMSNorms have no bias term in their forward, so a merge there is refused: merge tests
# on Llama use the linear layers only.
MERGEABLE = {"llama": dict(targets="all-linear"), "gpt2": dict(), "bert": dict()}


def perturb(am, name: str, seed: int = 0) -> None:
    method_checks.perturb(am, name, seed, scale=0.5)


# ---- sites and the no-op start ------------------------------------------------------------------
def test_default_sites_cover_linear_layers_and_norms():
    am = peftlab.adapt(tiny_llama())
    a = am.add_adapter("a", BitFitConfig())
    kinds = {am.model.get_submodule(s.path).kind for s in a.sites}
    assert kinds == {"linear", "norm"}
    assert not any(s.role == "head" for s in a.sites)
    # per layer q,k,v,o (32,16,16,32), gate,up,down (48,48,32), two norms (32,32); + the final norm
    assert am.num_parameters("a") == 2 * (32 + 16 + 16 + 32 + 48 + 48 + 32 + 32 + 32) + 32
    assert {t for _, t in am.adapter_tensors("a")} == {"bias"}


@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_adapter_is_bit_identical_to_base(arch, ids):
    assert_fresh_adapter_is_base(BUILDERS[arch], BitFitConfig(), ids)


# ---- the definition --------------------------------------------------------------------------------
def test_bias_is_added_to_linear_and_layernorm_outputs():
    torch.manual_seed(0)
    lin, ln, nobias = nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 4, bias=False)
    am = peftlab.adapt(nn.Sequential(lin, ln, nobias))
    am.add_adapter("a", BitFitConfig(targets=["0", "1", "2"]))
    am.set_active("a")
    perturb(am, "a")
    b = [am.model[i].deltas["a"].bias for i in range(3)]
    x = torch.randn(3, 6)
    h = F.linear(x, lin.weight, lin.bias + b[0])
    h = F.layer_norm(h, (5,), ln.weight, ln.bias + b[1])
    torch.testing.assert_close(am(x), F.linear(h, nobias.weight) + b[2], rtol=0, atol=1e-6)


def test_rmsnorm_gains_a_bias():
    am = peftlab.adapt(tiny_llama())
    am.add_adapter("a", BitFitConfig(targets="norm"))
    am.set_active("a")
    perturb(am, "a")
    norm = am.model.model.norm
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(norm(x), norm.base_layer(x) + norm.deltas["a"].bias, rtol=0, atol=0)


# ---- merging ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_merge_unmerge_and_disable(arch, ids):
    am, before = check_merge_unmerge_and_disable(BUILDERS[arch], BitFitConfig(**MERGEABLE[arch]), ids,
                                                 perturb, base_atol=1e-6)
    # weights untouched bit-exactly; existing biases within 1e-6 (b0 + b − b); biases the merge
    # created are removed again, so bias-free layers are bit-exactly bias-free
    after = base_params(am)
    assert sorted(after) == sorted(before)
    for k, v in after.items():
        if k.endswith("bias"):
            torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6, msg=k)
        else:
            assert torch.equal(v, before[k]), k


def test_merge_creates_a_frozen_bias_and_unmerge_removes_it(ids):
    model = tiny_llama()
    q = model.model.layers[0].self_attn.q_proj
    assert q.bias is None
    am = peftlab.adapt(model)
    am.add_adapter("a", BitFitConfig(targets="attn.q"))
    am.set_active("a")
    perturb(am, "a")
    b = am.model.model.layers[0].self_attn.q_proj.deltas["a"].bias
    am.merge("a")
    assert isinstance(q.bias, nn.Parameter) and not q.bias.requires_grad
    assert torch.equal(q.bias, b)
    am.unmerge("a")
    assert q.bias is None and "bias" in q._parameters
    assert "model.layers.0.self_attn.q_proj.base_layer.bias" not in dict(am.named_parameters())


def test_two_bitfit_adapters_share_a_created_bias(ids):
    """Unmerging the adapter that created the bias while another stays merged keeps the bias;
    unmerging both removes it."""
    model = tiny_llama()
    q = model.model.layers[0].self_attn.q_proj
    am = peftlab.adapt(model)
    am.add_adapter("a", BitFitConfig(targets="attn.q"))
    am.add_adapter("b", BitFitConfig(targets="attn.q"))
    perturb(am, "a", 1)
    perturb(am, "b", 2)
    am.set_active(["a", "b"])
    out = logits(am, ids)
    am.merge("a")
    am.merge("b")
    am.unmerge("a")                 # bias-adding deltas commute: either may leave first
    torch.testing.assert_close(logits(am, ids), out, rtol=0, atol=1e-5)
    torch.testing.assert_close(q.bias, am.model.model.layers[0].self_attn.q_proj.deltas["b"].bias,
                               rtol=0, atol=1e-6)
    am.unmerge("b")
    assert q.bias is None
    torch.testing.assert_close(logits(am, ids), out, rtol=0, atol=1e-5)


def test_merge_into_rmsnorm_is_refused(ids):
    am = peftlab.adapt(tiny_llama())
    am.add_adapter("a", BitFitConfig())
    am.set_active("a")
    perturb(am, "a")
    out = logits(am, ids)
    with pytest.raises(peftlab.CapabilityError, match="LlamaRMSNorm.*no bias term"):
        am.merge("a")
    assert not am.adapters["a"].merged
    # the layers merged before the refusal keep the outputs right, and unmerge() clears them
    torch.testing.assert_close(logits(am, ids), out, rtol=0, atol=1e-5)
    am.unmerge()
    assert all(not layer.merged for layer in am.adapters["a"].layers.values())
    assert am.model.model.layers[0].self_attn.q_proj.base_layer.bias is None
    torch.testing.assert_close(logits(am, ids), out, rtol=0, atol=1e-5)


def test_bitfit_and_ia3_output_scaling_merge_together(ids):
    from peftlab.methods.ia3 import IA3Config
    am = peftlab.adapt(tiny_llama())
    am.add_adapter("bias", BitFitConfig(targets="attn.v"))
    am.add_adapter("ia3", IA3Config(targets="attn.v", feedforward=[]))
    perturb(am, "bias")
    with torch.no_grad():
        for t in am.adapter_tensors("ia3").values():
            t.uniform_(0.5, 1.5)
    am.set_active(["bias", "ia3"])            # (W x + b) scaled by l
    v = am.model.model.layers[0].self_attn.v_proj
    x = torch.randn(3, 32)
    torch.testing.assert_close(v(x), (v.base_layer(x) + v.deltas["bias"].bias) * v.deltas["ia3"].ia3_l)
    out = logits(am, ids)
    with pytest.raises(peftlab.AdapterError, match="does not commute"):
        am.merge("bias")
    am.merge()
    torch.testing.assert_close(logits(am, ids), out, rtol=0, atol=1e-5)
    am.unmerge()
    assert v.base_layer.bias is None
    torch.testing.assert_close(logits(am, ids), out, rtol=0, atol=1e-5)


# ---- training ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_training_lowers_loss_and_touches_only_the_adapter(arch, ids):
    check_training_beside_other(BUILDERS[arch], BitFitConfig, ids, changed="nonzero")


# ---- checkpoints ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch, tmp_path, ids):
    am = with_adapter(BUILDERS[arch], "a", BitFitConfig())
    perturb(am, "a")
    saved, _ = assert_save_load_bit_exact(am, "a", BUILDERS[arch], tmp_path, ids, load_as="b")
    assert {k[1] for k in saved} == {"bias"}


def test_load_onto_a_different_model_fails_cleanly(tmp_path):
    am = peftlab.adapt(tiny_gpt2())
    am.add_adapter("a", BitFitConfig())
    am.save_adapter(tmp_path / "a", "a")
    other = peftlab.adapt(tiny_llama())
    with pytest.raises(peftlab.CheckpointError):
        other.load_adapter(tmp_path / "a", "a")
    assert other.adapters == {}


# ---- config errors and the record ------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(targets=[]), "targets is empty"),
    (dict(targets=["norm", None]), "targets must be a list of roles"),
    (dict(targets=["embed"]), "BitFit cannot attach to Embedding"),
])
def test_config_errors(kw, match):
    am = peftlab.adapt(tiny_llama())
    with pytest.raises(peftlab.ConfigError, match=match):
        am.add_adapter("a", BitFitConfig(**kw))
    assert am.adapters == {}


def test_unknown_field_is_a_config_error():
    with pytest.raises(peftlab.ConfigError, match="no field"):
        BitFitConfig.from_dict({"targets": ["norm"], "r": 4})


def test_method_record():
    m = get_method("bitfit")
    assert m.typology.form == "bias" and m.typology.adaptation == "selection"
    assert m.typology.mergeable and m.supports("merge")
    assert set(m.layer_kinds) == {"linear", "conv1d", "norm", "conv"}
    am = peftlab.adapt(tiny_gpt2())
    am.add_adapter("a", BitFitConfig())
    assert "biases of all-linear, norm" in am.card("a")
