"""Prefix tuning on tiny random models (Llama with GQA, GPT-2), checked against the real `peft`."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama
from method_checks import (QUIET, adapted_with, assert_changes_outputs_and_disable_restores_base,
                           assert_generate_matches_greedy_loop, assert_left_padded_call_matches_unpadded,
                           assert_save_load_bit_exact, check_training, forward_logits, greedy, no_eos,
                           peft_load, rand_ids)

import peftlab
from peftlab.core.errors import CapabilityError, ConfigError
from peftlab.methods.prefix_tuning import PrefixTuningConfig

peft = pytest.importorskip("peft")

pytestmark = QUIET

N = 3
ATOL = 1e-5
_prefixed = adapted_with(PrefixTuningConfig, num_virtual_tokens=N)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_prefix_changes_outputs_and_disable_restores_base(build):
    assert_changes_outputs_and_disable_restores_base(_prefixed(build), build)


def test_gqa_shapes_and_every_layer_required():
    am = _prefixed(tiny_llama)   # 4 heads, 2 kv heads, head_dim 8 -> kv_dim 16
    shapes = {k: tuple(t.shape) for k, t in am.adapter_tensors("p").items()}
    assert shapes == {(f"model.layers.{i}.self_attn", t): (N, 16) for i in range(2) for t in ("key", "value")}
    with pytest.raises(ConfigError, match="one attention site per layer"):
        am.add_adapter("q", PrefixTuningConfig(layers=[1]))
    assert "q" not in am.adapters


def test_encoder_is_refused():
    am = peftlab.adapt(tiny_bert())
    with pytest.raises(CapabilityError, match="encoder"):
        am.add_adapter("p", PrefixTuningConfig())
    assert not am.adapters


@pytest.mark.parametrize("projection", [None, 16])
def test_training_lowers_loss_and_touches_only_the_adapter(projection):
    am = _prefixed(tiny_llama, projection_hidden=projection)
    am.set_trainable("p")
    ids = rand_ids(2, 8, seed=5)
    check_training(am, "p", ids, ids, attention_mask=torch.ones_like(ids), steps=6, lr=0.1,
                   margin=0.02)


def test_fold_projection_keeps_outputs(tmp_path):
    am = _prefixed(tiny_llama, projection_hidden=16)
    ids = rand_ids()
    before = forward_logits(am, ids)
    am.save_adapter(tmp_path / "mlp", "p")           # keeps the MLP: training can resume
    assert any(t.startswith("projection.") for _, t in am.adapter_tensors("p"))
    am.hooks["p"].fold_projection()
    assert am.adapters["p"].config.projection_hidden is None
    assert sorted({t for _, t in am.adapter_tensors("p")}) == ["key", "value"]
    torch.testing.assert_close(forward_logits(am, ids), before, atol=1e-6, rtol=0)
    resumed = peftlab.adapt(tiny_llama())
    resumed.load_adapter(tmp_path / "mlp", "p")
    resumed.set_active("p")
    assert torch.equal(forward_logits(resumed, ids), before)


def test_save_load_roundtrip(tmp_path):
    am = _prefixed(tiny_llama)
    assert_save_load_bit_exact(am, "p", tiny_llama, tmp_path, rand_ids())


def _export_matches_peft(am, build, tmp_path):
    """Export adapter "p" and load it in peft on `build()`: the same logits within ATOL. Returns
    the export's folder."""
    ids = rand_ids()
    mask = torch.ones_like(ids)
    ours = forward_logits(am, ids, attention_mask=mask)
    d = peftlab.export_peft(am, "p", tmp_path / "e")
    pm = peft_load(build, d)
    torch.testing.assert_close(forward_logits(pm, ids, attention_mask=mask), ours, atol=ATOL, rtol=0)
    return d


@pytest.mark.parametrize("projection", [None, 16])
def test_export_llama_matches_peft(tmp_path, projection):
    d = _export_matches_peft(_prefixed(tiny_llama, projection_hidden=projection), tiny_llama, tmp_path)
    back = peftlab.import_peft(peftlab.adapt(tiny_llama()), d, "q")
    assert back.config.projection_hidden is None


def test_export_gpt2_matches_peft(tmp_path):
    _export_matches_peft(_prefixed(tiny_gpt2), tiny_gpt2, tmp_path)


def test_import_peft_saved_prefix(tmp_path):
    torch.manual_seed(11)
    pm = peft.get_peft_model(tiny_llama(), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                   num_virtual_tokens=N)).eval()
    pm.save_pretrained(tmp_path / "s")
    ids = rand_ids()
    mask = torch.ones_like(ids)
    positions = torch.arange(ids.shape[1]).expand(2, -1)
    theirs = forward_logits(pm, ids, attention_mask=mask, position_ids=positions)
    am = peftlab.adapt(tiny_llama())
    peftlab.import_peft(am, tmp_path / "s", "p")
    am.set_active("p")
    torch.testing.assert_close(forward_logits(am, ids, attention_mask=mask, position_ids=positions), theirs,
                               atol=ATOL, rtol=0)
    # bit-exact back to peft's layout
    d = peftlab.export_peft(am, "p", tmp_path / "e")
    from safetensors.torch import load_file
    assert torch.equal(load_file(d / "adapter_model.safetensors")["prompt_embeddings"],
                       load_file(tmp_path / "s" / "adapter_model.safetensors")["prompt_embeddings"])


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_generate_matches_greedy_loop(build):
    assert_generate_matches_greedy_loop(_prefixed(build))


def test_generate_left_padded_matches_unpadded():
    am = no_eos(_prefixed(tiny_llama))
    short = rand_ids(1, 4, seed=2)
    ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(short)], dim=1)
    padded = am.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    alone = am.generate(short, attention_mask=torch.ones_like(short), max_new_tokens=3, do_sample=False)
    assert torch.equal(padded[:, -3:], alone[:, -3:])


def test_left_padded_instruction_call_matches_unpadded():
    assert_left_padded_call_matches_unpadded(_prefixed(tiny_llama))


def test_generate_matches_peft_forward_greedy(tmp_path):
    """peft's own greedy loop over its forward is the reference. (peft 0.21.2's `generate` with a
    prefix disagrees with its forward under transformers 5: its generation glue looks for
    `past_key_values`/`cache_position`, which transformers 5 renamed, and re-injects the prefix.)"""
    am = no_eos(_prefixed(tiny_llama))
    d = peftlab.export_peft(am, "p", tmp_path / "e")
    pm = peft_load(tiny_llama, d)
    ids = rand_ids(2, 5)
    ours = am.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert torch.equal(ours, greedy(pm, ids, 4))
