"""LayerNorm tuning: additive deltas on the norms' weights and biases, against hand computations,
merging, training and checkpoints."""

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
from peftlab.methods.ln_tuning import LNTuningConfig

ARCHS = ["llama", "gpt2", "bert"]


def perturb(am, name: str, seed: int = 0) -> None:
    method_checks.perturb(am, name, seed, scale=0.3)


# ---- sites and the no-op start ------------------------------------------------------------------
@pytest.mark.parametrize("arch, sites, params", [
    ("llama", 5, 5 * 32),             # 2 RMSNorms per layer + final, weight only
    ("gpt2", 5, 5 * 2 * 32),          # ln_1, ln_2 per layer + ln_f, weight and bias
    ("bert", 5, 5 * 2 * 32),          # embeddings.LayerNorm + 2 per layer
])
def test_default_sites_and_tensors(arch, sites, params):
    am = peftlab.adapt(BUILDERS[arch]())
    a = am.add_adapter("a", LNTuningConfig())
    assert len(a.sites) == sites and {s.role for s in a.sites} == {"norm"}
    assert am.num_parameters("a") == params
    names = {t for _, t in am.adapter_tensors("a")}
    assert names == ({"weight"} if arch == "llama" else {"weight", "bias"})
    assert all(not p.requires_grad for p in am.adapter_parameters("a"))


def test_bias_false_trains_weights_only():
    am = peftlab.adapt(tiny_gpt2())
    am.add_adapter("a", LNTuningConfig(bias=False))
    assert {t for _, t in am.adapter_tensors("a")} == {"weight"}
    assert am.num_parameters("a") == 5 * 32


@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_adapter_is_bit_identical_to_base(arch, ids):
    assert_fresh_adapter_is_base(BUILDERS[arch], LNTuningConfig(), ids)


# ---- the definition --------------------------------------------------------------------------------
def test_layernorm_uses_shifted_parameters():
    torch.manual_seed(0)
    ln = nn.LayerNorm(6)
    am = peftlab.adapt(nn.Sequential(ln))
    am.add_adapter("a", LNTuningConfig(targets="0"))
    am.set_active("a")
    perturb(am, "a")
    d = am.model[0].deltas["a"]
    x = torch.randn(3, 6)
    torch.testing.assert_close(am(x), F.layer_norm(x, (6,), ln.weight + d.weight, ln.bias + d.bias),
                               rtol=0, atol=1e-6)
    assert torch.equal(ln.weight, torch.ones(6))        # the base parameters stay untouched


def test_rmsnorm_uses_shifted_weight():
    am = peftlab.adapt(tiny_llama())
    am.add_adapter("a", LNTuningConfig())
    am.set_active("a")
    perturb(am, "a")
    norm = am.model.model.norm
    x = torch.randn(2, 3, 32)
    rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.base_layer.variance_epsilon)
    torch.testing.assert_close(norm(x), (norm.base_layer.weight + norm.deltas["a"].weight) * rms,
                               rtol=0, atol=1e-5)


# ---- merging ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_merge_unmerge_and_disable(arch, ids):
    am, before = check_merge_unmerge_and_disable(BUILDERS[arch], LNTuningConfig(), ids, perturb)
    # p + d − d: within 1e-6 of the original norm parameters (not bit-exact); the rest untouched
    after = base_params(am)
    for k, v in after.items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6, msg=k)
        if "norm" not in k.lower() and "ln_" not in k:
            assert torch.equal(v, before[k]), k


def test_ln_tuning_and_bitfit_on_the_same_norms_merge_alone(ids):
    """Both are additive: merging either one while the other stays active is exact."""
    from peftlab.methods.bitfit import BitFitConfig
    am = peftlab.adapt(tiny_gpt2())
    am.add_adapter("ln", LNTuningConfig())
    am.add_adapter("bias", BitFitConfig(targets="norm"))
    perturb(am, "ln", 1)
    perturb(am, "bias", 2)
    am.set_active(["ln", "bias"])
    out = logits(am, ids)
    am.merge("ln")
    torch.testing.assert_close(logits(am, ids), out, rtol=0, atol=1e-5)
    am.merge("bias")
    torch.testing.assert_close(logits(am, ids), out, rtol=0, atol=1e-5)
    am.unmerge("ln")
    torch.testing.assert_close(logits(am, ids), out, rtol=0, atol=1e-5)


# ---- training ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_training_lowers_loss_and_touches_only_the_adapter(arch, ids):
    check_training_beside_other(BUILDERS[arch], LNTuningConfig, ids, changed="nonzero")


# ---- checkpoints ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch, tmp_path, ids):
    am = with_adapter(BUILDERS[arch], "a", LNTuningConfig())
    perturb(am, "a")
    assert_save_load_bit_exact(am, "a", BUILDERS[arch], tmp_path, ids, load_as="b")


def test_checkpoint_with_bias_does_not_load_into_bias_free_config(tmp_path):
    am = peftlab.adapt(tiny_gpt2())
    am.add_adapter("a", LNTuningConfig())
    perturb(am, "a")       # deltas that peft's whole-norm copies do not give back exactly: ours are kept
    am.save_adapter(tmp_path / "a", "a")
    cfg_file = tmp_path / "a" / "peftlab.json"
    cfg_file.write_text(cfg_file.read_text().replace('"bias": true', '"bias": false'))
    fresh = peftlab.adapt(tiny_gpt2())
    with pytest.raises(peftlab.CheckpointError, match="does not produce"):
        fresh.load_adapter(tmp_path / "a", "a")
    assert fresh.adapters == {}


# ---- config errors and the record ------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(targets=[]), "targets is empty"),
    (dict(targets=[1]), "targets must be a list of roles"),
    (dict(bias="yes"), "bias must be True or False"),
    (dict(targets=["attn.q"]), "LayerNorm tuning cannot attach to Linear.*attaches to a norm"),
])
def test_config_errors(kw, match):
    am = peftlab.adapt(tiny_llama())
    with pytest.raises(peftlab.ConfigError, match=match):
        am.add_adapter("a", LNTuningConfig(**kw))
    assert am.adapters == {}


def test_method_record():
    m = get_method("ln-tuning")
    assert m.layer_kinds == ("norm",) and m.typology.site_roles == ("norm",)
    assert m.typology.adaptation == "selection" and m.typology.mergeable and m.supports("merge")
    am = peftlab.adapt(tiny_llama())
    am.add_adapter("a", LNTuningConfig())
    assert "norm weights and biases" in am.card("a")
