"""Parameters as sites (issue 22, item 3): MoE expert weights (3-D nn.Parameters on an experts
module, Mixtral and Qwen3-MoE under transformers 5) and Mamba's A_log / D, targeted by the roles
ffn.experts / ssm.A / ssm.D or by parameter path. LoRA per expert with peft 0.21's
`target_parameters` semantics: training, merge / unmerge, save / load, peft export and import
against the real peft; all-linear's warning; the refusals (other methods, routed batches)."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from torch import nn
from transformers import (
    MambaConfig,
    MambaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

import peftlab
from peftlab import CapabilityError, ConfigError
from peftlab.core.errors import TargetWarning
from peftlab.core.sites import describe_sites, resolve_sites
from peftlab.interop.peft_format import export_peft, import_peft
from peftlab.methods.ia3 import IA3Config
from peftlab.methods.lora import LoraConfig

VOCAB = 64
IDS = torch.tensor([[3, 17, 42, 5, 9, 11, 60], [1, 2, 33, 40, 8, 12, 50]])


def tiny_mixtral(seed: int = 0) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                        num_experts_per_tok=2, max_position_embeddings=64)
    return MixtralForCausalLM(cfg).eval()


def tiny_qwen3_moe(seed: int = 0) -> Qwen3MoeForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                         max_position_embeddings=64)
    return Qwen3MoeForCausalLM(cfg).eval()


def tiny_mamba(seed: int = 0) -> MambaForCausalLM:
    torch.manual_seed(seed)
    cfg = MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                      conv_kernel=4, use_mambapy=False)
    return MambaForCausalLM(cfg).eval()


MOE = {"mixtral": tiny_mixtral, "qwen3_moe": tiny_qwen3_moe}
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def experts_adapter(build, name="e", **kw):
    model = build()
    am = peftlab.adapt(model)
    am.add_adapter(name, LoraConfig(**{"targets": ["ffn.experts"], "r": 2, "alpha": 4.0, "init": "random", **kw}))
    am.set_active(name)
    return am


# ---- sites ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", MOE)
def test_experts_role_names_one_site_per_experts_module(family):
    model = MOE[family]()
    sites = resolve_sites(model, ["ffn.experts"])
    assert [s.path for s in sites] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert all(s.params == EXPERT_PARAMS and s.role == "ffn.experts" for s in sites)
    # a parameter path (suffix, glob, regex) names the parameters; a module name stands for its
    # expert weights
    assert [s.params for s in resolve_sites(model, ["mlp.experts.down_proj"])] == [("down_proj",)] * 2
    assert [s.params for s in resolve_sites(model, ["re:.*layers\\.1\\.mlp\\.experts\\.gate_up_proj"])] == [
        ("gate_up_proj",)]
    assert [s.params for s in resolve_sites(model, ["*.experts.*_proj"], layers=0)] == [EXPERT_PARAMS]
    assert [s.params for s in resolve_sites(model, ["experts"])] == [EXPERT_PARAMS] * 2
    assert [s.params for s in resolve_sites(model, ["ffn.experts"], exclude=["down_proj"])] == [
        ("gate_up_proj",)] * 2
    described = describe_sites(model)["ffn.experts"]
    assert described == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in EXPERT_PARAMS]


@pytest.mark.parametrize("family", MOE)
def test_all_linear_warns_naming_the_expert_parameters(family):
    model = MOE[family]()
    with pytest.warns(TargetWarning) as caught:
        sites = resolve_sites(model, "all-linear")
    assert not any(s.params for s in sites)
    text = str(caught[0].message)
    for i in (0, 1):
        for p in EXPERT_PARAMS:
            assert f"model.layers.{i}.mlp.experts.{p}" in text
    assert "'ffn.experts'" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error", TargetWarning)      # asked for: no warning
        both = resolve_sites(model, ["all-linear", "ffn.experts"])
        resolve_sites(model, "all-linear", exclude=["ffn.experts"])
    assert sum(1 for s in both if s.params) == 2
    # with the experts, the trainable parameters are peft's for the same targets
    am = peftlab.adapt(model)
    with pytest.warns(TargetWarning):
        am.add_adapter("lin", LoraConfig(targets="all-linear", r=2))
    am.add_adapter("all", LoraConfig(targets=["all-linear", "ffn.experts"], r=2))
    ours = sum(p.numel() for p in am.adapter("all").parameters())
    pm = peft.get_peft_model(MOE[family](), peft.LoraConfig(
        r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    assert ours == sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
    assert ours > sum(p.numel() for p in am.adapter("lin").parameters())


# ---- LoRA per expert ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", MOE)
def test_expert_lora_trains_every_tensor(family):
    am = experts_adapter(MOE[family])
    am.set_trainable("e")
    am.train()
    out = am(input_ids=IDS, labels=IDS)
    out.loss.backward()
    tensors = dict(am.adapter("e").tensors())
    assert len(tensors) == 8                               # 2 sites × 2 parameters × (A, B)
    params = {n: p for n, p in am.model.named_parameters() if "deltas.e." in n}
    assert len(params) == 8
    for n, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    # the base stays frozen
    assert not any(p.requires_grad for n, p in am.model.named_parameters() if "deltas" not in n)


@pytest.mark.parametrize("family", MOE)
def test_expert_lora_merge_unmerge(family):
    am = experts_adapter(MOE[family])
    experts = am.model.model.layers[0].mlp.experts
    before = {p: experts.base_layer.get_parameter(p).detach().clone() for p in EXPERT_PARAMS}
    am.set_active(None)
    base = logits(am)
    am.set_active("e")
    unmerged = logits(am)
    assert (unmerged - base).abs().max() > 1e-3            # the adapter acts
    am.merge("e")
    merged = logits(am)
    assert torch.allclose(merged, unmerged, atol=1e-5, rtol=0)
    assert not torch.equal(experts.base_layer.gate_up_proj, before["gate_up_proj"])
    am.unmerge("e")
    for p in EXPERT_PARAMS:                               # bit-exact: the kept copy
        assert torch.equal(experts.base_layer.get_parameter(p), before[p])
    assert torch.equal(logits(am), unmerged)


@pytest.mark.parametrize("family", MOE)
def test_expert_lora_delta_is_per_expert(family):
    """The forward equals the base model whose expert weights carry s·B_e A_e per expert."""
    am = experts_adapter(MOE[family])
    delta = am.model.model.layers[1].mlp.experts.deltas["e"]
    reference = MOE[family]()
    with torch.no_grad():
        for layer in (0, 1):
            d = am.model.model.layers[layer].mlp.experts.deltas["e"]
            ex = reference.model.layers[layer].mlp.experts
            for p in EXPERT_PARAMS:
                f = d._modules[p]
                dw = torch.einsum("eor,eri->eoi", f.lora_B, f.lora_A) * (4.0 / 2)
                ex.get_parameter(p).add_(dw)
    assert delta._modules["gate_up_proj"].lora_A.shape == (4, 2, 32)
    assert torch.allclose(logits(am), logits(reference), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", MOE)
def test_expert_lora_save_load_bit_exact(family, tmp_path):
    am = experts_adapter(MOE[family])
    expected = logits(am)
    am.save_adapter(tmp_path / "a", "e")
    record = json.loads((tmp_path / "a" / "peftlab.json").read_text())
    assert record["sites"] == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in EXPERT_PARAMS]
    fresh = peftlab.adapt(MOE[family]())
    fresh.load_adapter(tmp_path / "a", "e")
    fresh.set_active("e")
    saved, loaded = am.adapter("e").tensors(), fresh.adapter("e").tensors()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert torch.equal(logits(fresh), expected)


@pytest.mark.parametrize("family", MOE)
def test_expert_lora_peft_export_loads_in_peft(family, tmp_path):
    """Acceptance 3: our export in peft's target_parameters layout loads in the real peft with
    equal logits, and imports back exactly."""
    am = experts_adapter(MOE[family], rank_pattern={"layers\\.1\\.mlp\\.experts\\.down_proj": 3})
    expected = logits(am)
    export_peft(am, "e", tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == []
    assert cfg["target_parameters"] == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in EXPERT_PARAMS]
    theirs = peft.PeftModel.from_pretrained(MOE[family](), str(tmp_path / "p")).eval()
    assert torch.allclose(logits(theirs), expected, atol=1e-5, rtol=0)
    back = peftlab.adapt(MOE[family]())
    import_peft(back, tmp_path / "p", "e")
    back.set_active("e")
    assert all(torch.equal(am.adapter("e").tensors()[k], t) for k, t in back.adapter("e").tensors().items())
    assert torch.equal(logits(back), expected)


@pytest.mark.parametrize("family", MOE)
def test_peft_saved_expert_lora_loads_with_equal_logits(family, tmp_path):
    """peft's own target_parameters adapter (with attention LoRA beside it) loads in peftlab."""
    torch.manual_seed(1)
    pm = peft.get_peft_model(MOE[family](), peft.LoraConfig(
        r=2, lora_alpha=6, target_modules=["q_proj"], init_lora_weights=False,
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])).eval()
    expected = logits(pm)
    pm.save_pretrained(str(tmp_path / "theirs"))
    am = peftlab.adapt(MOE[family]())
    am.load_adapter(tmp_path / "theirs", "p")
    am.set_active("p")
    sites = am.adapter("p").sites
    assert sum(1 for s in sites if s.params == EXPERT_PARAMS) == 2 and sum(1 for s in sites if not s.params) == 2
    assert torch.allclose(logits(am), expected, atol=1e-5, rtol=0)


class TransposedExperts(nn.Module):
    """Experts stored (experts, in, out), as transformers' `is_transposed` implementations do."""

    is_transposed = True

    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(4, 8, 6) / 3)      # (experts, in 8, out 6)
        self.down_proj = nn.Parameter(torch.randn(4, 6, 8) / 3)         # (experts, in 6, out 8)

    def forward(self, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("ti,tio->to", x, self.gate_up_proj[expert]).relu()
        return torch.einsum("ti,tio->to", h, self.down_proj[expert])


class TransposedMoE(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList([nn.ModuleDict({"experts": TransposedExperts()})])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expert = torch.arange(x.shape[0]) % 4
        return x + self.layers[0]["experts"](x, expert)


def test_transposed_experts_match_peft(tmp_path):
    """An experts module storing (experts, in, out) gets ΔW_e = (s·B_e A_e)ᵀ, as peft does: our
    export loads in peft with equal outputs, and peft's adapter loads in peftlab."""
    x = torch.randn(8, 8)
    am = peftlab.adapt(TransposedMoE())
    am.add_adapter("t", LoraConfig(targets=["ffn.experts"], r=2, init="random"))
    am.set_active("t")
    f = am.model.layers[0]["experts"].deltas["t"]._modules["gate_up_proj"]
    assert f.lora_A.shape == (4, 2, 8) and f.lora_B.shape == (4, 6, 2)
    with torch.no_grad():
        ours = am(x)
        am.merge("t")
        assert torch.allclose(am(x), ours, atol=1e-5, rtol=0)
        am.unmerge("t")
    export_peft(am, "t", tmp_path / "p")
    theirs = peft.PeftModel.from_pretrained(TransposedMoE(), str(tmp_path / "p")).eval()
    with torch.no_grad():
        assert torch.allclose(theirs(x), ours, atol=1e-5, rtol=0)
    pm = peft.get_peft_model(TransposedMoE(), peft.LoraConfig(
        r=2, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "theirs"))
    back = peftlab.adapt(TransposedMoE())
    import_peft(back, tmp_path / "theirs", "t")
    back.set_active("t")
    with torch.no_grad():
        assert torch.allclose(back(x), pm(x), atol=1e-5, rtol=0)
        assert not torch.allclose(back(x), TransposedMoE()(x), atol=1e-3)


def test_inspect_lists_parameter_sites(tmp_path, capsys):
    from peftlab.apps.cli import main
    tiny_mixtral().save_pretrained(tmp_path / "m")
    assert main(["inspect", "--model", str(tmp_path / "m"), "--full"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "ffn.experts" in ln)
    assert "model.layers.0.mlp.experts.gate_up_proj" in line
    assert "model.layers.1.mlp.experts.down_proj" in out


# ---- refusals -------------------------------------------------------------------------------------
def test_other_methods_refuse_parameter_sites():
    am = peftlab.adapt(tiny_mixtral())
    with pytest.raises(CapabilityError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj.*parameter-site.*LoRA"):
        am.add_adapter("i", IA3Config(targets=["ffn.experts"], feedforward=[]))
    assert not am.adapters and not any(type(m).__name__ == "AdaptedLayer" for m in am.model.modules())


def test_param_site_lora_refuses_dropout_and_dora():
    am = peftlab.adapt(tiny_mixtral())
    with pytest.raises(ConfigError, match="dropout.*model.layers.0.mlp.experts"):
        am.add_adapter("d", LoraConfig(targets=["ffn.experts"], dropout=0.1))
    with pytest.raises(ConfigError, match="DoRA"):
        am.add_adapter("d", LoraConfig(targets=["ffn.experts"], dora=True))
    assert not am.adapters


def test_routed_batch_with_expert_lora_is_refused_before_the_forward():
    am = experts_adapter(tiny_mixtral)
    am.add_adapter("q", LoraConfig(targets=["attn.q"], init="random"))
    with pytest.raises(CapabilityError, match=r"'e'.*model\.layers\.0\.mlp\.experts"), torch.no_grad():
        am(input_ids=IDS, adapter_ids=["e", "q"])
    with torch.no_grad():                                  # adapters on layers still route
        am(input_ids=IDS, adapter_ids=["q", None])


# ---- Mamba ------------------------------------------------------------------------------------------
def test_mamba_A_log_and_D_roles():
    model = tiny_mamba()
    described = describe_sites(model)
    assert described["ssm.A"] == [f"backbone.layers.{i}.mixer.A_log" for i in (0, 1)]
    assert described["ssm.D"] == [f"backbone.layers.{i}.mixer.D" for i in (0, 1)]
    am = peftlab.adapt(model)
    with pytest.raises(ConfigError, match="2-D or 3-D.*'D'"):      # D is a vector
        am.add_adapter("d", LoraConfig(targets=["ssm.D"]))


def test_mamba_A_log_lora_trains_merges_and_round_trips(tmp_path):
    model = tiny_mamba()
    am = peftlab.adapt(model)
    base = logits(am)
    # A_log beside the mixer's own in_proj: the mixer is wrapped for its parameter, its layers
    # stay sites
    am.add_adapter("a", LoraConfig(targets=["ssm.A", "in_proj"], r=2, init="random"))
    am.set_active("a")
    am.set_trainable("a")
    am.train()
    am(input_ids=IDS, labels=IDS).loss.backward()
    grads = {n: p.grad for n, p in am.model.named_parameters() if "deltas.a." in n}
    assert len(grads) == 8 and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    am.eval()
    am.set_trainable(None)
    unmerged = logits(am)
    assert (unmerged - base).abs().max() > 1e-4
    mixer = am.model.backbone.layers[0].mixer
    a_log = mixer.base_layer.A_log.detach().clone()
    am.merge("a")
    assert torch.allclose(logits(am), unmerged, atol=1e-5, rtol=0)
    am.unmerge("a")
    assert torch.equal(mixer.base_layer.A_log, a_log)
    am.save_adapter(tmp_path / "a", "a")
    fresh = peftlab.adapt(tiny_mamba())
    fresh.load_adapter(tmp_path / "a", "a")
    fresh.set_active("a")
    assert torch.equal(logits(fresh), unmerged)
    theirs = peft.PeftModel.from_pretrained(tiny_mamba(), str(tmp_path / "a")).eval()
    assert torch.allclose(logits(theirs), unmerged, atol=1e-5, rtol=0)
    am.delete_adapter("a")
    assert type(am.model.backbone.layers[0].mixer).__name__ == "MambaMixer"
    assert type(am.model.backbone.layers[0].mixer.in_proj).__name__ == "Linear"
    assert torch.equal(logits(am), base)


def test_composition_and_pruning_refuse_parameter_sites():
    from peftlab.compose import scale
    from peftlab.training.pruning import prune_adapter
    am = experts_adapter(tiny_mixtral)
    with pytest.raises(CapabilityError, match="parameter site"):
        scale(am, "e", 0.5, name="half")
    with pytest.raises(CapabilityError, match=r"model\.layers\.0\.mlp\.experts.*layers only"):
        prune_adapter(am, "e", drop=["model.layers.0.mlp.experts"])
    assert list(am.adapters) == ["e"]


def test_bf16_experts_merge_equals_unmerged_bit_for_bit():
    """On a bf16 base the fp32 factors' ΔW is added in fp32 and rounded once, in the forward and
    in the merge alike, so merging changes no output bit."""
    am = experts_adapter(lambda: tiny_mixtral().to(torch.bfloat16))
    delta = am.model.model.layers[0].mlp.experts.deltas["e"]
    assert delta._modules["down_proj"].lora_A.dtype == torch.float32
    unmerged = logits(am)
    am.merge("e")
    assert torch.equal(logits(am), unmerged)
