"""peftlab checkpoints: bit-exact reload, fit checks, damaged files, interrupted saves."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

import peftlab
import peftlab.core.io

from conftest import logits, tiny_bert, tiny_llama


def saved_adapter(tmp_path, **cfg):
    am = peftlab.adapt(tiny_llama())
    cfg = {"r": 4, "targets": ["attn.q", "attn.v", "embed", "ffn.down"], "init": "random", **cfg}
    am.add_adapter("a", peftlab.LoraConfig(**cfg))
    am.set_active("a")
    am.save_adapter(tmp_path / "ad", "a")
    return am


@pytest.mark.parametrize("cfg", [{}, {"dora": True, "targets": "all-linear"}, {"init": "pissa"},
                                 {"rank_pattern": {"attn.v": 2}, "rslora": True}])
def test_save_load_is_bit_exact(tmp_path, ids, cfg):
    am = saved_adapter(tmp_path, **cfg)
    if cfg.get("init") == "pissa":
        with torch.no_grad():
            for p in am.adapter_parameters("a"):
                p.add_(0.01)
    am.save_adapter(tmp_path / "ad", "a")          # overwrite in place
    expected = logits(am, ids)
    fresh = peftlab.adapt(tiny_llama())
    fresh.load_adapter(tmp_path / "ad", "a", trainable=True)
    fresh.set_active("a")
    saved, loaded = am.adapter_tensors("a"), fresh.adapter_tensors("a")
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert torch.equal(logits(fresh, ids), expected)
    assert fresh.trainable_parameters() == fresh.num_parameters("a")


def test_checkpoint_files(tmp_path):
    saved_adapter(tmp_path)
    meta = json.loads((tmp_path / "ad" / "peftlab.json").read_text())
    assert meta["format"] == "peftlab-adapter" and meta["format_version"] == 2 and meta["method"] == "lora"
    assert meta["config"]["r"] == 4 and meta["base_model"]["class"] == "LlamaForCausalLM"
    assert len(meta["base_model"]["site_shapes_sha256"]) == 64
    # LoRA's peft encoding gives its tensors back exactly: peft's files are the only copy
    assert meta["tensors"] == {"file": "adapter_model.safetensors", "layout": "peft"}
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    with safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in f.keys()
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "peftlab.json"]


def test_modules_to_save_round_trip(tmp_path, ids):
    am = peftlab.adapt(tiny_bert())
    am.add_adapter("c", peftlab.LoraConfig(targets=["attn.q"], init="random", modules_to_save=["classifier"]))
    am.set_active("c")
    with torch.no_grad():
        am.model.classifier.copies["c"].bias.add_(1.0)
    am.save_adapter(tmp_path / "c", "c")
    fresh = peftlab.adapt(tiny_bert())
    fresh.load_adapter(tmp_path / "c", "c")
    fresh.set_active("c")
    assert torch.equal(logits(fresh, ids), logits(am, ids))


def test_wrong_base_is_refused_and_model_unchanged(tmp_path, ids):
    saved_adapter(tmp_path)
    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2)).eval()
    before = logits(other, ids)
    am = peftlab.adapt(other)
    with pytest.raises(peftlab.CheckpointError, match=r"tensor 'lora_A' of site 'model.embed_tokens' is \[4, 96\]|"
                                                       r"tensor 'lora_\w' of site '[\w.]+' is \["):
        am.load_adapter(tmp_path / "ad", "a")
    assert not am.adapters and not any(isinstance(m, peftlab.AdaptedLayer) for m in am.modules())
    assert torch.equal(logits(am, ids), before)


def test_missing_site_names_the_module(tmp_path):
    saved_adapter(tmp_path)
    from transformers import GPT2Config, GPT2LMHeadModel
    am = peftlab.adapt(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=96)))
    with pytest.raises(peftlab.CheckpointError, match="model.embed_tokens' does not exist"):
        am.load_adapter(tmp_path / "ad", "a")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_tensor_file_gives_clear_error(tmp_path, damage):
    saved_adapter(tmp_path)
    f = tmp_path / "ad" / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x07" * 64, "empty": b""}[damage])
    am = peftlab.adapt(tiny_llama())
    with pytest.raises(peftlab.CheckpointError, match="truncated or corrupted") as info:
        am.load_adapter(tmp_path / "ad", "a")
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert not am.adapters


def test_damaged_config_names_file_and_line(tmp_path):
    saved_adapter(tmp_path)
    f = tmp_path / "ad" / "peftlab.json"
    f.write_text(f.read_text().replace('"method": "lora"', '"method": lora'))
    with pytest.raises(peftlab.CheckpointError, match=r"peftlab.json, line \d+: not valid JSON"):
        peftlab.adapt(tiny_llama()).load_adapter(tmp_path / "ad", "a")


def test_interrupted_save_keeps_previous_adapter(tmp_path, ids, monkeypatch):
    am = saved_adapter(tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir()}
    with torch.no_grad():
        for p in am.adapter_parameters("a"):
            p.mul_(2)

    real_save = peftlab.core.io.save_file

    def crash_midway(tensors, path, metadata=None):   # write half the file, then fail
        real_save(tensors, path, metadata)
        with open(path, "r+b") as fh:
            fh.truncate(fh.seek(0, 2) // 2)
        raise OSError("disk full")

    monkeypatch.setattr(peftlab.core.io, "save_file", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        am.save_adapter(tmp_path / "ad", "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir()} == before   # no temp left
    fresh = peftlab.adapt(tiny_llama())
    fresh.load_adapter(tmp_path / "ad", "a")
    assert fresh.num_parameters("a") == am.num_parameters("a")


def test_incomplete_peft_directory_names_the_missing_file(tmp_path):
    # load_adapter imports peft directories (tests/test_files_layout.py); one without its tensors
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(peftlab.CheckpointError, match="adapter_model.safetensors does not exist"):
        peftlab.adapt(tiny_llama()).load_adapter(tmp_path, "a")
