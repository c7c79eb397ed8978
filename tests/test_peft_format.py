"""peft-format interop against the real `peft` package (shared/specs/peft-format.md).

Every comparison is on real numbers from tiny random models: what peftlab exports must load in
`peft.PeftModel.from_pretrained` and give the same logits; what `peft` saves must import into
peftlab and give the same logits; peftlab -> peft format -> peftlab is bit-exact; bad directories
raise a clear error and leave the model untouched.
"""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
import torch.nn as nn
from conftest import BUILDERS, VOCAB, logits, tiny_llama
from safetensors import safe_open
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import peftlab

peft = pytest.importorskip("peft")

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

PREFIX = "base_model.model."
ATOL = 1e-5
LLAMA_ALL = ["attn.q", "attn.k", "attn.v", "attn.o", "ffn.gate", "ffn.up", "ffn.down"]
LLAMA_ALL_PEFT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---- helpers ------------------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _base_logits(kind: str, ids: torch.Tensor) -> torch.Tensor:
    return logits(BUILDERS[kind](0), ids)


def _assert_not_base(out: torch.Tensor, kind: str, ids: torch.Tensor) -> None:
    """The adapter really changes the output, so equality checks are not vacuous."""
    diff = (out - _base_logits(kind, ids)).abs().max().item()
    assert diff > 1e-3, f"adapter output equals the base model's (max diff {diff:g})"


def _module_io(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a plain base layer, in peft's convention."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    assert type(module).__name__ == "Conv1D"
    return module.weight.shape[0], module.weight.shape[1]   # Conv1D stores (in, out)


def _read_safetensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _no_peftlab_modules(model: nn.Module) -> bool:
    return not any(isinstance(m, (peftlab.AdaptedLayer, peftlab.ModuleCopies))
                   for m in model.modules())


# ---- peftlab side -------------------------------------------------------------------------------
EXPORT_CASES = {
    "llama": ("llama", dict(targets=LLAMA_ALL)),
    "llama-rslora": ("llama", dict(targets=LLAMA_ALL, rslora=True)),
    "llama-dora": ("llama", dict(targets=LLAMA_ALL, dora=True)),
    "gpt2-c_attn": ("gpt2", dict(targets=["attn.qkv"])),
    "gpt2-c_attn-dora": ("gpt2", dict(targets=["c_attn"], dora=True)),
    "bert-qv-classifier": ("bert", dict(targets=["attn.q", "attn.v"], modules_to_save=["classifier"])),
    "llama-embed": ("llama", dict(targets=["embed", "attn.q", "attn.v"])),
    "llama-patterns": ("llama", dict(targets=LLAMA_ALL, rank_pattern={"attn.v": 2},
                                     alpha_pattern={"ffn.down": 3.0})),
    "llama-rslora-patterns": ("llama", dict(targets=LLAMA_ALL, rslora=True, rank_pattern={"attn.v": 2},
                                            alpha_pattern={"ffn.down": 3.0})),
    "llama-pissa": ("llama", dict(targets=LLAMA_ALL, init="pissa")),
    "llama-pissa-rslora-dora": ("llama", dict(targets=["attn.q", "attn.v", "ffn.down"], init="pissa",
                                              rslora=True, dora=True)),
}


def make_peftlab(kind: str, kw: dict, name: str = "a") -> peftlab.AdaptedModel:
    """A peftlab adapter with every tensor it exports made to matter: random B, DoRA magnitudes
    off their initial norms, PiSSA B moved off its start, modules_to_save copy off the original."""
    kw = dict(kw)
    init = kw.pop("init", "random")
    am = peftlab.adapt(BUILDERS[kind](0))
    am.add_adapter(name, peftlab.LoraConfig(r=4, alpha=8, init=init, **kw))
    g = _gen(123)
    with torch.no_grad():
        for (path, tname), t in am.adapter_tensors(name).items():
            if tname == "lora_B" and init == "pissa":   # else the PiSSA delta starts at 0
                t.add_(0.1 * torch.randn(t.shape, generator=g))
            elif tname == "magnitude":
                t.mul_(1 + 0.2 * torch.randn(t.shape, generator=g))
        for path, copy in ((p, am.model.get_submodule(p).copies[name])
                           for p in am.adapters[name].copies):
            for p in copy.parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    am.set_active([name])
    return am


# ---- 1. peftlab export -> peft ------------------------------------------------------------------
@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_loads_in_peft_with_equal_logits(case, tmp_path, ids):
    kind, kw = EXPORT_CASES[case]
    am = make_peftlab(kind, kw)
    am.eval()
    ours = logits(am, ids)
    _assert_not_base(ours, kind, ids)

    out = peftlab.export_peft(am, "a", tmp_path / "exp")
    assert out == tmp_path / "exp"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(BUILDERS[kind](0), str(out)).eval()
    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    assert not missing, missing
    theirs = logits(pm, ids)
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)

    # peft holds exactly the tensors of the file (nothing missing, nothing unexpected).
    on_disk = _read_safetensors(out / "adapter_model.safetensors")
    held = peft.get_peft_model_state_dict(pm)
    assert sorted(held) == sorted(on_disk)
    for k, t in on_disk.items():
        assert torch.equal(held[k], t), k


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_files_follow_the_spec(case, tmp_path):
    kind, kw = EXPORT_CASES[case]
    am = make_peftlab(kind, kw)
    adapter = am.adapters["a"]
    d = peftlab.export_peft(am, "a", tmp_path / "exp")
    assert sorted(p.name for p in d.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    text = (d / "adapter_config.json").read_text()
    cfg = json.loads(text)
    assert list(cfg) == sorted(cfg), "keys must be sorted"
    assert cfg["peft_type"] == "LORA"
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["inference_mode"] is True
    assert cfg["bias"] == "none"
    assert cfg["use_rslora"] is kw.get("rslora", False)
    assert cfg["use_dora"] is kw.get("dora", False)
    assert cfg["fan_in_fan_out"] is (kind == "gpt2")
    for field in ("base_model_name_or_path", "peft_version"):
        assert field in cfg
    site_paths = [s.path for s in adapter.sites]
    targets = cfg["target_modules"]
    assert isinstance(targets, list) and sorted(targets) == sorted(site_paths)
    assert cfg["modules_to_save"] == (kw.get("modules_to_save") and ["classifier"])
    # peft can parse the config (unknown keys would only warn).
    parsed = peft.LoraConfig.from_pretrained(str(d))
    assert parsed.r == 4 and parsed.lora_alpha == 8

    fresh = BUILDERS[kind](0)
    pissa = kw.get("init") == "pissa"
    expected: dict[str, tuple[int, ...]] = {}
    for path in site_paths:
        module = fresh.get_submodule(path)
        d_in, d_out = _module_io(module)
        r = 4
        for key, value in kw.get("rank_pattern", {}).items():
            r = value if adapter.sites[site_paths.index(path)].role == key else r
        r = 2 * r if pissa else r
        if isinstance(module, nn.Embedding):
            expected[f"{PREFIX}{path}.lora_embedding_A"] = (r, d_in)
            expected[f"{PREFIX}{path}.lora_embedding_B"] = (d_out, r)
        else:
            expected[f"{PREFIX}{path}.lora_A.weight"] = (r, d_in)
            expected[f"{PREFIX}{path}.lora_B.weight"] = (d_out, r)
        if kw.get("dora"):
            expected[f"{PREFIX}{path}.lora_magnitude_vector"] = (d_out,)
    for path in kw.get("modules_to_save") or []:
        for pname, t in fresh.get_submodule(path).state_dict().items():
            expected[f"{PREFIX}{path}.{pname}"] = tuple(t.shape)
    tensors = _read_safetensors(d / "adapter_model.safetensors")
    assert all(k.startswith(PREFIX) for k in tensors)
    assert {k: tuple(t.shape) for k, t in tensors.items()} == expected
    assert all(t.dtype == torch.float32 for t in tensors.values())
    if "rank_pattern" in kw or pissa:
        assert cfg["rank_pattern"], "per-site ranks must be written"
    if "alpha_pattern" in kw or pissa:
        assert cfg["alpha_pattern"], "per-site alphas must be written"


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_export_causal_lm_task_type(kind, tmp_path):
    """GPT2LMHeadModel is a causal LM as much as LlamaForCausalLM is: peft's CAUSAL_LM, so that
    peft rebuilds a PeftModelForCausalLM."""
    am = make_peftlab(kind, dict(targets=["attn.qkv"] if kind == "gpt2" else ["attn.q"]))
    d = peftlab.export_peft(am, "a", tmp_path / "exp")
    assert json.loads((d / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    pm = peft.PeftModel.from_pretrained(BUILDERS[kind](0), str(d))
    assert isinstance(pm, peft.PeftModelForCausalLM)


def test_export_seq_cls_without_head_copy_loads_in_peft(tmp_path, ids):
    """A BERT classifier adapter whose head was not trained (no modules_to_save) must still load
    in peft: peft's SEQ_CLS adds the classifier to modules_to_save and expects its tensors."""
    am = make_peftlab("bert", dict(targets=["attn.q", "attn.v"]))
    am.eval()
    ours = logits(am, ids)
    _assert_not_base(ours, "bert", ids)
    d = peftlab.export_peft(am, "a", tmp_path / "exp")
    pm = peft.PeftModel.from_pretrained(BUILDERS["bert"](0), str(d)).eval()
    torch.testing.assert_close(logits(pm, ids), ours, atol=ATOL, rtol=0)


def test_export_bert_copy_is_the_trained_one(tmp_path):
    """The exported classifier is the adapter's copy, not the original head."""
    am = make_peftlab("bert", EXPORT_CASES["bert-qv-classifier"][1])
    d = peftlab.export_peft(am, "a", tmp_path / "exp")
    tensors = _read_safetensors(d / "adapter_model.safetensors")
    copy = am.model.classifier.copies["a"]
    original = am.model.classifier.original_module
    assert torch.equal(tensors[f"{PREFIX}classifier.weight"], copy.weight)
    assert not torch.equal(tensors[f"{PREFIX}classifier.weight"], original.weight)


# ---- 2. peft save -> peftlab import -------------------------------------------------------------
IMPORT_CASES = {
    "llama": ("llama", dict(target_modules=LLAMA_ALL_PEFT)),
    "llama-rslora": ("llama", dict(target_modules=LLAMA_ALL_PEFT, use_rslora=True)),
    "llama-dora": ("llama", dict(target_modules=LLAMA_ALL_PEFT, use_dora=True)),
    "gpt2-c_attn": ("gpt2", dict(target_modules=["c_attn"], fan_in_fan_out=True)),
    "gpt2-c_attn-dora": ("gpt2", dict(target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True)),
    "bert-qv-seqcls": ("bert", dict(target_modules=["query", "value"], task_type="SEQ_CLS")),
    "llama-patterns": ("llama", dict(target_modules=LLAMA_ALL_PEFT, rank_pattern={"v_proj": 2},
                                     alpha_pattern={"down_proj": 3.0})),
    "llama-rslora-patterns": ("llama", dict(target_modules=LLAMA_ALL_PEFT, use_rslora=True,
                                            rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3.0})),
    "llama-regex": ("llama", dict(target_modules=r".*\.(q_proj|v_proj|down_proj)")),
    # peft's default save_embedding_layers="auto" also writes the base embedding weight
    # (`embed_tokens.base_layer.weight`) whenever an embedding is targeted.
    "llama-embed": ("llama", dict(target_modules=["embed_tokens", "q_proj", "v_proj"])),
    "llama-embed-no-base": ("llama", dict(target_modules=["embed_tokens", "q_proj", "v_proj"]),
                            dict(save_embedding_layers=False)),
}


def make_peft(kind: str, kw: dict):
    """A real peft LoRA model whose every saved tensor matters (random B, DoRA magnitudes and the
    modules_to_save copy moved off their initial values)."""
    pm = peft.get_peft_model(BUILDERS[kind](0), peft.LoraConfig(r=4, lora_alpha=8,
                                                                 init_lora_weights=False, **kw))
    g = _gen(321)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "modules_to_save" in n:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return pm.eval()


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_peft_save_imports_with_equal_logits(case, tmp_path, ids):
    kind, kw, *save_kw = IMPORT_CASES[case]
    pm = make_peft(kind, kw)
    theirs = logits(pm, ids)
    _assert_not_base(theirs, kind, ids)
    pm.save_pretrained(str(tmp_path / "peft"), **(save_kw[0] if save_kw else {}))

    am = peftlab.adapt(BUILDERS[kind](0))
    adapter = peftlab.import_peft(am, tmp_path / "peft", "p")
    assert am.active == [], "imported adapters start inactive"
    am.eval()
    torch.testing.assert_close(logits(am, ids), _base_logits(kind, ids), atol=0, rtol=0)
    am.set_active(["p"])
    ours = logits(am, ids)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)

    # The adapter's tensors are peft's, one for one.
    saved = _read_safetensors(tmp_path / "peft" / "adapter_model.safetensors")
    n_lora = sum(1 for k in saved if "lora_" in k)
    ours_t = am.adapter_tensors("p")
    assert len([k for k in ours_t if k[1] in ("lora_A", "lora_B", "magnitude")]) == n_lora
    if kind == "bert":
        assert list(adapter.copies) == ["classifier"]
        assert torch.equal(ours_t[("classifier", "weight")], saved[f"{PREFIX}classifier.weight"])


# ---- 3. peftlab -> peft format -> peftlab ---------------------------------------------------------
@pytest.mark.parametrize("case", [c for c in EXPORT_CASES if "pissa" not in c])
def test_round_trip_is_bit_exact(case, tmp_path, ids):
    kind, kw = EXPORT_CASES[case]
    am = make_peftlab(kind, kw)
    am.eval()
    before = logits(am, ids)
    peftlab.export_peft(am, "a", tmp_path / "exp")

    am2 = peftlab.adapt(BUILDERS[kind](0))
    peftlab.import_peft(am2, tmp_path / "exp", "b")
    am2.set_active(["b"])
    am2.eval()
    a, b = am.adapter_tensors("a"), am2.adapter_tensors("b")
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key
    assert sorted(s.path for s in am.adapters["a"].sites) == sorted(s.path for s in am2.adapters["b"].sites)
    assert list(am.adapters["a"].copies) == list(am2.adapters["b"].copies)
    for site in am.adapters["a"].sites:
        s1 = am.model.get_submodule(site.path).deltas["a"].scaling
        s2 = am2.model.get_submodule(site.path).deltas["b"].scaling
        assert s1 == s2, site.path
    assert torch.equal(logits(am2, ids), before)


@pytest.mark.parametrize("case", [c for c in EXPORT_CASES if "pissa" in c])
def test_round_trip_pissa_becomes_rank_2r_lora(case, tmp_path, ids):
    """PiSSA exports as s·[B, −B0]·[A; A0]; importing it gives that plain LoRA, same outputs."""
    kind, kw = EXPORT_CASES[case]
    am = make_peftlab(kind, kw)
    am.eval()
    before = logits(am, ids)
    peftlab.export_peft(am, "a", tmp_path / "exp")
    am2 = peftlab.adapt(BUILDERS[kind](0))
    peftlab.import_peft(am2, tmp_path / "exp", "b")
    am2.set_active(["b"])
    am2.eval()
    a, b = am.adapter_tensors("a"), am2.adapter_tensors("b")
    for site in am.adapters["a"].sites:
        p = site.path
        assert torch.equal(b[(p, "lora_A")], torch.cat([a[(p, "lora_A")], a[(p, "pissa_A0")]]))
        assert torch.equal(b[(p, "lora_B")], torch.cat([a[(p, "lora_B")], -a[(p, "pissa_B0")]], dim=1))
        if kw.get("dora"):
            assert torch.equal(b[(p, "magnitude")], a[(p, "magnitude")])
        assert (p, "pissa_A0") not in b
    torch.testing.assert_close(logits(am2, ids), before, atol=ATOL, rtol=0)


# ---- 4. errors ------------------------------------------------------------------------------------
def _save_non_lora(kind: str, directory) -> None:
    base = tiny_llama(0)
    if kind == "LOHA":
        config = peft.LoHaConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"])
    else:
        config = peft.BOFTConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], boft_block_size=4)
    peft.get_peft_model(base, config).save_pretrained(str(directory))


@pytest.mark.parametrize("peft_type", ["LOHA", "BOFT"])
def test_import_of_non_lora_is_a_capability_error(peft_type, tmp_path, ids):
    _save_non_lora(peft_type, tmp_path / "d")
    assert json.loads((tmp_path / "d" / "adapter_config.json").read_text())["peft_type"] == peft_type
    am = peftlab.adapt(tiny_llama(0))
    with pytest.raises(peftlab.CapabilityError, match=peft_type):
        peftlab.import_peft(am, tmp_path / "d", "x")
    assert am.adapters == {}
    assert _no_peftlab_modules(am.model)
    assert torch.equal(logits(am, ids), _base_logits("llama", ids))


def _wide_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _bert_five_labels() -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, num_labels=5)
    return BertForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("source", ["peftlab", "peft"])
@pytest.mark.parametrize("target", ["wide-llama", "bert-5-labels"])
def test_import_onto_other_shapes_fails_cleanly(source, target, tmp_path, ids):
    """Shapes that do not fit: CheckpointError naming the tensor, and nothing changed."""
    kind = "llama" if target == "wide-llama" else "bert"
    d = tmp_path / "d"
    if source == "peftlab":
        peftlab.export_peft(make_peftlab(kind, EXPORT_CASES["llama" if kind == "llama"
                                                            else "bert-qv-classifier"][1]), "a", d)
    else:
        make_peft(kind, IMPORT_CASES["llama" if kind == "llama" else "bert-qv-seqcls"][1]).save_pretrained(str(d))
    model = _wide_llama() if target == "wide-llama" else _bert_five_labels()
    base = logits(model, ids)
    am = peftlab.adapt(model)
    with pytest.raises(peftlab.CheckpointError) as err:
        peftlab.import_peft(am, d, "x")
    msg = str(err.value)
    if target == "wide-llama":
        # A LoRA tensor of a real site is named, with both shapes.
        assert re.search(r"'lora_[AB]'", msg), msg
        assert re.search(r"model\.layers\.\d\.(self_attn|mlp)\.\w+_proj", msg), msg
    else:
        # LoRA tensors fit; the classifier copy does not.
        assert "'classifier'" in msg and re.search(r"'(weight|bias)'", msg), msg
    assert "[" in msg and "]" in msg, "message should give the shapes"
    assert am.adapters == {}
    assert _no_peftlab_modules(am.model)
    assert torch.equal(logits(am, ids), base)
