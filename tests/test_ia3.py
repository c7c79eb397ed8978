"""(IA)³ against hand computations, merging, training, checkpoints and the real `peft` package."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import BUILDERS, logits, tiny_gpt2, tiny_llama
import method_checks
from method_checks import (QUIET, assert_fresh_adapter_is_base, assert_save_load_bit_exact, base_params,
                           check_merge_unmerge_and_disable, check_training_beside_other, hidden,
                           with_adapter)
from safetensors import safe_open
from torch import nn

import peftlab
from peftlab.methods import get_method
from peftlab.methods.ia3 import IA3Config

pytestmark = QUIET

PREFIX = "base_model.model."
ARCHS = ["llama", "gpt2", "bert"]


def perturb(am, name: str, seed: int = 0) -> None:
    """Move every ia3_l off its initial ones (kept away from 0, so merges are invertible)."""
    method_checks.perturb(am, name, seed, scale=0.3, offset=1)


# ---- sites and the no-op start ----------------------------------------------------------------
def test_default_sites_and_scaling_sides():
    am = peftlab.adapt(tiny_llama())
    a = am.add_adapter("a", IA3Config())
    roles = {s.role for s in a.sites}
    assert roles == {"attn.k", "attn.v", "ffn.down"} and len(a.sites) == 6
    for s in a.sites:
        d = am.model.get_submodule(s.path).deltas["a"]
        assert d.scale_input == (s.role == "ffn.down")
        assert d.stage == ("input" if d.scale_input else "output")
        assert tuple(d.ia3_l.shape) == ((48,) if d.scale_input else (16,))   # down in=48; k,v out=16
        assert torch.equal(d.ia3_l, torch.ones_like(d.ia3_l)) and not d.ia3_l.requires_grad
    # (2·16 + 48) per layer
    assert am.num_parameters("a") == 2 * (2 * 16 + 48)


def test_gpt2_uses_fused_c_attn_and_mlp_c_proj_input():
    am = peftlab.adapt(tiny_gpt2())
    a = am.add_adapter("a", IA3Config())
    paths = [s.path for s in a.sites]
    assert paths == ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj",
                     "transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_proj"]
    c_attn = am.model.transformer.h[0].attn.c_attn.deltas["a"]
    c_proj = am.model.transformer.h[0].mlp.c_proj.deltas["a"]
    # attn.k, attn.v: the key and value thirds of c_attn's 3·d outputs, the query third untouched
    assert [sl.role for sl in a.sites[0].slices] == ["attn.k", "attn.v"] and a.sites[0].rows == list(range(32, 96))
    assert tuple(c_attn.ia3_l.shape) == (64,) and not c_attn.scale_input
    assert torch.equal(c_attn.scale_vector()[:32], torch.ones(32))
    assert tuple(c_proj.ia3_l.shape) == (128,) and c_proj.scale_input         # 4·d inputs


@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_adapter_is_bit_identical_to_base(arch, ids):
    assert_fresh_adapter_is_base(BUILDERS[arch], IA3Config(), ids)


# ---- the definition ------------------------------------------------------------------------------
def test_linear_output_and_input_scaling_match_definition():
    torch.manual_seed(0)
    out_lin, in_lin = nn.Linear(6, 5), nn.Linear(5, 4)
    am = peftlab.adapt(nn.Sequential(out_lin, in_lin))
    am.add_adapter("a", IA3Config(targets=["0", "1"], feedforward=["1"]))
    am.set_active("a")
    perturb(am, "a")
    l0 = am.model[0].deltas["a"].ia3_l
    l1 = am.model[1].deltas["a"].ia3_l
    assert l0.shape == (5,) and l1.shape == (5,)
    x = torch.randn(3, 6)
    h = l0 * F.linear(x, out_lin.weight, out_lin.bias)
    torch.testing.assert_close(am(x), F.linear(l1 * h, in_lin.weight, in_lin.bias), rtol=0, atol=1e-6)


def test_conv1d_scaling_matches_definition():
    model = tiny_gpt2()
    am = peftlab.adapt(model)
    am.add_adapter("a", IA3Config(targets=["attn.qkv", "ffn.down"], feedforward=["mlp.c_proj"]))
    am.set_active("a")
    perturb(am, "a")
    c_attn = am.model.transformer.h[0].attn.c_attn
    c_proj = am.model.transformer.h[0].mlp.c_proj
    x = torch.randn(2, 3, 32)
    ref = (x @ c_attn.base_layer.weight + c_attn.base_layer.bias) * c_attn.deltas["a"].ia3_l
    torch.testing.assert_close(c_attn(x), ref, rtol=0, atol=1e-6)
    h = torch.randn(2, 3, 128)
    ref = (h * c_proj.deltas["a"].ia3_l) @ c_proj.base_layer.weight + c_proj.base_layer.bias
    torch.testing.assert_close(c_proj(h), ref, rtol=0, atol=1e-6)


# ---- merging ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_merge_unmerge_and_disable(arch, ids):
    am, before = check_merge_unmerge_and_disable(BUILDERS[arch], IA3Config(), ids, perturb)
    # unmerge divides the scale back out: within 1e-6 of the original weights, not bit-exact
    for k, v in base_params(am).items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6, msg=k)


def test_merge_writes_rows_and_columns_of_conv1d():
    am = peftlab.adapt(tiny_gpt2())
    am.add_adapter("a", IA3Config())
    am.set_active("a")
    perturb(am, "a")
    c_attn = am.model.transformer.h[0].attn.c_attn
    c_proj = am.model.transformer.h[0].mlp.c_proj
    w_attn, b_attn = c_attn.base_layer.weight.detach().clone(), c_attn.base_layer.bias.detach().clone()
    w_proj, b_proj = c_proj.base_layer.weight.detach().clone(), c_proj.base_layer.bias.detach().clone()
    # c_attn's vector covers its k and v thirds (the default attn.k, attn.v), ones on the q third
    l_attn, l_proj = c_attn.deltas["a"].scale_vector().detach(), c_proj.deltas["a"].ia3_l
    am.merge("a")
    # Conv1D stores (in, out): output scaling multiplies columns, input scaling rows
    assert torch.equal(c_attn.base_layer.weight, w_attn * l_attn[None, :])
    assert torch.equal(c_attn.base_layer.bias, b_attn * l_attn)
    assert torch.equal(c_proj.base_layer.weight, w_proj * l_proj[:, None])
    assert torch.equal(c_proj.base_layer.bias, b_proj)                 # input scaling leaves b alone


def test_zero_scale_merges_and_unmerges_exactly(ids):
    """A zero entry of l erases a weight row when merged; unmerge still restores it, bit for bit,
    from the copy merge keeps (it used to be refused: dividing back could not recover it)."""
    model = tiny_llama()
    am = peftlab.adapt(model)
    am.add_adapter("a", IA3Config(targets="attn.v", feedforward=[]))
    am.set_active("a")
    perturb(am, "a")
    with torch.no_grad():
        am.model.model.layers[0].self_attn.v_proj.deltas["a"].ia3_l[3] = 0.0
    out = logits(am, ids)
    w = model.model.layers[0].self_attn.v_proj.weight.detach().clone()
    am.merge("a")
    assert not model.model.layers[0].self_attn.v_proj.weight[3].any()     # row 3 erased
    torch.testing.assert_close(logits(am, ids), out, rtol=0, atol=1e-5)
    am.unmerge("a")
    assert torch.equal(model.model.layers[0].self_attn.v_proj.weight, w)
    assert torch.equal(logits(am, ids), out)


# ---- LoRA and IA3 on the same layers -------------------------------------------------------------
def test_lora_and_ia3_together_match_hand_computation_and_merge(ids):
    model = tiny_llama()
    am = peftlab.adapt(model)
    am.add_adapter("lora", peftlab.LoraConfig(r=2, targets=["attn.v", "ffn.down"], init="random"))
    am.add_adapter("ia3", IA3Config(targets=["attn.v", "ffn.down"]))
    perturb(am, "ia3")
    am.set_active(["lora", "ia3"])

    v = am.model.model.layers[0].self_attn.v_proj
    down = am.model.model.layers[0].mlp.down_proj
    x, h = torch.randn(2, 5, 32), torch.randn(2, 5, 48)
    lv, ld = v.deltas["lora"], down.deltas["lora"]
    with torch.no_grad():
        # output scaling after LoRA in activation order: l ⊙ (W + sBA) x
        ref_v = v.deltas["ia3"].ia3_l * F.linear(x, v.base_layer.weight + lv.delta_weight())
        # input scaling feeds both the base and LoRA: (W + sBA)(l ⊙ h)
        ref_d = F.linear(down.deltas["ia3"].ia3_l * h, down.base_layer.weight + ld.delta_weight())
        torch.testing.assert_close(v(x), ref_v, rtol=0, atol=1e-5)
        torch.testing.assert_close(down(h), ref_d, rtol=0, atol=1e-5)

    unmerged = logits(am, ids)
    am.merge()                                   # both, in an order that is exact
    torch.testing.assert_close(logits(am, ids), unmerged, rtol=0, atol=1e-5)
    am.unmerge()
    torch.testing.assert_close(logits(am, ids), unmerged, rtol=0, atol=1e-5)


@pytest.mark.parametrize("alone", ["lora", "ia3"])
@pytest.mark.parametrize("role", ["attn.v", "ffn.down"])
def test_merging_one_of_lora_and_ia3_alone_is_refused(alone, role, ids):
    model = tiny_llama()
    am = peftlab.adapt(model)
    am.add_adapter("lora", peftlab.LoraConfig(r=2, targets=role, init="random"))
    am.add_adapter("ia3", IA3Config(targets=role))
    perturb(am, "ia3")
    am.set_active(["lora", "ia3"])
    out = logits(am, ids)
    with pytest.raises(peftlab.AdapterError, match="does not commute"):
        am.merge(alone)
    assert not any(a.merged for a in am.adapters.values())
    assert torch.equal(logits(am, ids), out)


def test_two_ia3_adapters_merge_alone():
    """Output scalings commute with each other: merging one while the other stays active is exact."""
    am = peftlab.adapt(tiny_llama())
    am.add_adapter("a", IA3Config())
    am.add_adapter("b", IA3Config())
    perturb(am, "a", 1)
    perturb(am, "b", 2)
    am.set_active(["a", "b"])
    ids = torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    out = logits(am, ids)
    am.merge("b")
    torch.testing.assert_close(logits(am, ids), out, rtol=0, atol=1e-5)


# ---- training ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_training_lowers_loss_and_touches_only_the_adapter(arch, ids):
    check_training_beside_other(BUILDERS[arch], IA3Config, ids, changed="any")


# ---- checkpoints ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch, tmp_path, ids):
    am = with_adapter(BUILDERS[arch], "a", IA3Config())
    perturb(am, "a")
    saved, _ = assert_save_load_bit_exact(am, "a", BUILDERS[arch], tmp_path, ids, load_as="b")
    assert all(k[1] == "ia3_l" for k in saved)


# ---- peft interop ------------------------------------------------------------------------------
peft = pytest.importorskip("peft")

EXPORT = {
    "llama": ("llama", dict(targets=["attn.k", "attn.v", "ffn.down"], feedforward=["ffn.down"])),
    "gpt2": ("gpt2", dict(targets=["attn.qkv", "ffn.down"], feedforward=["mlp.c_proj"])),
    "bert": ("bert", dict()),
    "bert-classifier": ("bert", dict(modules_to_save=["classifier"])),
}


def _read(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("case", list(EXPORT))
def test_export_loads_in_peft_with_equal_logits(case, tmp_path, ids):
    arch, kw = EXPORT[case]
    am = peftlab.adapt(BUILDERS[arch]())
    adapter = am.add_adapter("a", IA3Config(**kw))
    am.set_active("a")
    perturb(am, "a")
    with torch.no_grad():
        for path in adapter.copies:     # the trained head copy differs from the original
            for p in am.model.get_submodule(path).copies["a"].parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
    ours = logits(am, ids)
    assert (hidden(am, ids) - hidden(BUILDERS[arch](), ids)).abs().max() > 1e-2

    d = peftlab.export_peft(am, "a", tmp_path / "exp")
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "IA3" and cfg["init_ia3_weights"] is True
    assert cfg["target_modules"] == [s.path for s in adapter.sites]
    ff = [s.path for s in adapter.sites if am.model.get_submodule(s.path).deltas["a"].scale_input]
    assert cfg["feedforward_modules"] == ff and ff
    tensors = _read(d / "adapter_model.safetensors")
    assert len(tensors) == len(adapter.sites) + 2 * len(adapter.copies)
    for s in adapter.sites:
        l = am.model.get_submodule(s.path).deltas["a"].ia3_l
        t = tensors[f"{PREFIX}{s.path}.ia3_l"]
        assert tuple(t.shape) == ((1, l.numel()) if s.path in ff else (l.numel(), 1))
        assert torch.equal(t.flatten(), l)

    pm = peft.PeftModel.from_pretrained(BUILDERS[arch](), str(d)).eval()
    torch.testing.assert_close(logits(pm, ids), ours, rtol=0, atol=1e-5)
    torch.testing.assert_close(hidden(pm, ids), hidden(am, ids), rtol=0, atol=1e-5)
    held = peft.get_peft_model_state_dict(pm)
    assert sorted(held) == sorted(tensors)
    assert cfg["modules_to_save"] == (kw.get("modules_to_save") and ["classifier"])


IMPORT = {
    "llama": ("llama", dict(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                            feedforward_modules=["down_proj"])),
    "llama-regex": ("llama", dict(target_modules=r".*\.(k_proj|v_proj|down_proj)",
                                  feedforward_modules=r".*\.down_proj")),
    "gpt2": ("gpt2", dict(task_type="CAUSAL_LM", target_modules=["c_attn", "mlp.c_proj"],
                          feedforward_modules=["mlp.c_proj"])),
    # peft's SEQ_CLS also trains and saves the classifier (modules_to_save)
    "bert-seqcls": ("bert", dict(task_type="SEQ_CLS",
                                 target_modules=r".*\.(key|value|layer\.\d+\.output\.dense)",
                                 feedforward_modules=r".*\.layer\.\d+\.output\.dense")),
}


@pytest.mark.parametrize("case", list(IMPORT))
def test_peft_save_imports_with_equal_logits_and_round_trips(case, tmp_path, ids):
    arch, kw = IMPORT[case]
    pm = peft.get_peft_model(BUILDERS[arch](), peft.IA3Config(init_ia3_weights=False, **kw)).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
    theirs = logits(pm, ids)
    assert (hidden(pm, ids) - hidden(BUILDERS[arch](), ids)).abs().max() > 1e-2   # random ia3_l
    pm.save_pretrained(str(tmp_path / "peft"))

    am = peftlab.adapt(BUILDERS[arch]())
    adapter = peftlab.import_peft(am, tmp_path / "peft", "x")
    am.set_active("x")
    torch.testing.assert_close(logits(am, ids), theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(hidden(am, ids), hidden(pm, ids), rtol=0, atol=1e-5)
    assert list(adapter.copies) == (["classifier"] if arch == "bert" else [])
    inputs = {s.role for s in adapter.sites if am.model.get_submodule(s.path).deltas["x"].scale_input}
    assert inputs == {"ffn.down"}

    # peftlab -> peft format -> peftlab is bit-exact
    peftlab.export_peft(am, "x", tmp_path / "again")
    am2 = peftlab.adapt(BUILDERS[arch]())
    peftlab.import_peft(am2, tmp_path / "again", "y")
    am2.set_active("y")
    a, b = am.adapter_tensors("x"), am2.adapter_tensors("y")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(logits(am2, ids), logits(am, ids))


def test_import_onto_a_different_model_fails_cleanly(tmp_path, ids):
    pm = peft.get_peft_model(tiny_llama(), peft.IA3Config(target_modules=["k_proj", "down_proj"],
                                                          feedforward_modules=["down_proj"]))
    pm.save_pretrained(str(tmp_path / "peft"))
    am = peftlab.adapt(tiny_gpt2())
    with pytest.raises(peftlab.CheckpointError, match="does not exist"):
        peftlab.import_peft(am, tmp_path / "peft", "x")
    assert am.adapters == {}


# ---- config errors and the record ------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(targets=[]), "targets is empty"),
    (dict(targets=["attn.k", 3]), "targets must be a list"),
    (dict(feedforward=[""]), "feedforward must be a list"),
    (dict(feedforward="ffn.down("), "not a valid regex|neither a role nor a valid regex"),
])
def test_config_errors(kw, match):
    am = peftlab.adapt(tiny_llama())
    with pytest.raises(peftlab.ConfigError, match=match):
        am.add_adapter("a", IA3Config(**kw))
    assert am.adapters == {}


def test_norm_or_embedding_sites_are_refused():
    am = peftlab.adapt(tiny_llama())
    with pytest.raises(peftlab.ConfigError, match="attaches to Linear, Conv1D"):
        am.add_adapter("a", IA3Config(targets=["attn.k", "norm"]))
    with pytest.raises(peftlab.ConfigError, match="cannot attach to Embedding"):
        am.add_adapter("a", IA3Config(targets=["embed"]))
    assert am.adapters == {}


def test_method_record_and_card():
    m = get_method("ia3")
    assert m.typology.form == "vector" and m.typology.adaptation == "rescaling"
    assert m.typology.mergeable and m.supports("merge") and m.peft_type == "IA3"
    am = peftlab.adapt(tiny_llama())
    am.add_adapter("a", IA3Config())
    card = am.card("a")
    assert "input scaling at ffn.down" in card and "160" in card
