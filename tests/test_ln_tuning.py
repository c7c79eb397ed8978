"""LayerNorm tuning: additive deltas on the norms' weights and biases, against hand computations,
merging, training and checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import BUILDERS, logits, tiny_gpt2, tiny_llama
from torch import nn

import peftlab
from peftlab.methods import get_method
from peftlab.methods.ln_tuning import LNTuningConfig

ARCHS = ["llama", "gpt2", "bert"]


def perturb(am, name: str, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in am.adapter_tensors(name).values():
            t.copy_(0.3 * torch.randn(t.shape, generator=g))


def hidden(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-1]


def base_params(am) -> dict[str, torch.Tensor]:
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in am.model.named_parameters()
            if ".deltas." not in k}


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
    model = BUILDERS[arch]()
    base = logits(model, ids)
    am = peftlab.adapt(model)
    am.add_adapter("a", LNTuningConfig())
    am.set_active("a")
    assert torch.equal(logits(am, ids), base)


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
    model = BUILDERS[arch]()
    base = logits(model, ids)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    am = peftlab.adapt(model)
    am.add_adapter("a", LNTuningConfig())
    am.set_active("a")
    perturb(am, "a")
    out, out_h = logits(am, ids), hidden(am, ids)
    with am.disabled():
        assert torch.equal(logits(am, ids), base)
        assert (hidden(am, ids) - out_h).abs().max() > 1e-2
    am.merge("a")
    torch.testing.assert_close(logits(am, ids), out, rtol=0, atol=1e-5)
    torch.testing.assert_close(hidden(am, ids), out_h, rtol=0, atol=1e-5)
    am.unmerge("a")
    torch.testing.assert_close(hidden(am, ids), out_h, rtol=0, atol=1e-5)
    # p + d − d: within 1e-6 of the original norm parameters (not bit-exact); the rest untouched
    after = base_params(am)
    for k, v in after.items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6, msg=k)
        if "norm" not in k.lower() and "ln_" not in k:
            assert torch.equal(v, before[k]), k
    with am.disabled():
        torch.testing.assert_close(logits(am, ids), base, rtol=0, atol=1e-5)


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
    am = peftlab.adapt(BUILDERS[arch]())
    am.add_adapter("a", LNTuningConfig())
    am.add_adapter("other", LNTuningConfig())
    am.set_active("a")
    am.set_trainable("a")
    base = base_params(am)
    other = {k: t.clone() for k, t in am.adapter_tensors("other").items()}
    opt = torch.optim.Adam(list(am.adapter_parameters("a")), lr=1e-2)
    labels = torch.tensor([0, 2]) if arch == "bert" else ids
    am.eval()
    losses = []
    for _ in range(5):
        loss = am(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for k, v in base_params(am).items():
        assert torch.equal(v, base[k]), k
    assert all(torch.equal(t, other[k]) for k, t in am.adapter_tensors("other").items())
    assert all(t.abs().max() > 0 for t in am.adapter_tensors("a").values())


# ---- checkpoints ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch, tmp_path, ids):
    am = peftlab.adapt(BUILDERS[arch]())
    am.add_adapter("a", LNTuningConfig())
    am.set_active("a")
    perturb(am, "a")
    out = logits(am, ids)
    am.save_adapter(tmp_path / "a", "a")
    fresh = peftlab.adapt(BUILDERS[arch]())
    fresh.load_adapter(tmp_path / "a", "b")
    fresh.set_active("b")
    mine, theirs = am.adapter_tensors("a"), fresh.adapter_tensors("b")
    assert sorted(mine) == sorted(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(logits(fresh, ids), out)


def test_checkpoint_with_bias_does_not_load_into_bias_free_config(tmp_path):
    am = peftlab.adapt(tiny_gpt2())
    am.add_adapter("a", LNTuningConfig())
    am.save_adapter(tmp_path / "a", "a")
    cfg_file = tmp_path / "a" / "adapter_config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"bias": true', '"bias": false'))
    fresh = peftlab.adapt(tiny_gpt2())
    with pytest.raises(peftlab.CheckpointError, match="does not produce"):
        fresh.load_adapter(tmp_path / "a", "a")
    assert fresh.adapters == {}


# ---- config errors and the record ------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(targets=[]), "targets is empty"),
    (dict(targets=[1]), "targets must be a role"),
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
