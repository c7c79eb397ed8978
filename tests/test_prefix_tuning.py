"""Prefix tuning on tiny random models (Llama with GQA, GPT-2), checked against the real `peft`."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import VOCAB, tiny_bert, tiny_gpt2, tiny_llama

import peftlab
from peftlab.errors import CapabilityError, ConfigError
from peftlab.methods.prefix_tuning import PrefixTuningConfig

peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]

N = 3
ATOL = 1e-5


def _ids(b: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (b, length), generator=torch.Generator().manual_seed(seed))


def _prefixed(build, n: int = N, **kw) -> peftlab.AdaptedModel:
    am = peftlab.adapt(build())
    am.add_adapter("p", PrefixTuningConfig(num_virtual_tokens=n, **kw))
    am.set_active("p")
    return am


@torch.no_grad()
def _logits(model, ids, **kw) -> torch.Tensor:
    return model(input_ids=ids, **kw).logits


def _peft_load(build, directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(build(), str(directory)).eval()


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_prefix_changes_outputs_and_disable_restores_base(build):
    ids = _ids()
    am = _prefixed(build)
    base = _logits(build(), ids)
    ours = _logits(am, ids, attention_mask=torch.ones_like(ids))
    assert ours.shape == base.shape and torch.isfinite(ours).all()
    assert (ours - base).abs().max() > 1e-3
    with am.disabled():
        assert torch.equal(_logits(am, ids), base)


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
    base_before = {k: v.clone() for k, v in am.model.state_dict().items()}
    adapter_before = {k: v.clone() for k, v in am.adapter_tensors("p").items()}
    ids = _ids(2, 8, seed=5)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    opt = torch.optim.Adam(list(am.adapter_parameters("p")), lr=0.1)
    losses = []
    for _ in range(6):
        loss = am(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.02, losses
    for k, v in am.model.state_dict().items():
        assert torch.equal(v, base_before[k]), k
    assert all(not torch.equal(v, adapter_before[k]) for k, v in am.adapter_tensors("p").items())


def test_fold_projection_keeps_outputs(tmp_path):
    am = _prefixed(tiny_llama, projection_hidden=16)
    ids = _ids()
    before = _logits(am, ids)
    am.save_adapter(tmp_path / "mlp", "p")           # keeps the MLP: training can resume
    assert any(t.startswith("projection.") for _, t in am.adapter_tensors("p"))
    am.hooks["p"].fold_projection()
    assert am.adapters["p"].config.projection_hidden is None
    assert sorted({t for _, t in am.adapter_tensors("p")}) == ["key", "value"]
    torch.testing.assert_close(_logits(am, ids), before, atol=1e-6, rtol=0)
    resumed = peftlab.adapt(tiny_llama())
    resumed.load_adapter(tmp_path / "mlp", "p")
    resumed.set_active("p")
    assert torch.equal(_logits(resumed, ids), before)


def test_save_load_roundtrip(tmp_path):
    am = _prefixed(tiny_llama)
    ids = _ids()
    ours = _logits(am, ids)
    am.save_adapter(tmp_path / "a", "p")
    fresh = peftlab.adapt(tiny_llama())
    fresh.load_adapter(tmp_path / "a", "p")
    fresh.set_active("p")
    for k, t in am.adapter_tensors("p").items():
        assert torch.equal(fresh.adapter_tensors("p")[k], t)
    assert torch.equal(_logits(fresh, ids), ours)


@pytest.mark.parametrize("projection", [None, 16])
def test_export_llama_matches_peft(tmp_path, projection):
    am = _prefixed(tiny_llama, projection_hidden=projection)
    ids = _ids()
    mask = torch.ones_like(ids)
    ours = _logits(am, ids, attention_mask=mask)
    d = peftlab.export_peft(am, "p", tmp_path / "e")
    pm = _peft_load(tiny_llama, d)
    torch.testing.assert_close(_logits(pm, ids, attention_mask=mask), ours, atol=ATOL, rtol=0)
    back = peftlab.import_peft(peftlab.adapt(tiny_llama()), d, "q")
    assert back.config.projection_hidden is None


def test_export_gpt2_matches_peft(tmp_path):
    am = _prefixed(tiny_gpt2)
    ids = _ids()
    mask = torch.ones_like(ids)
    ours = _logits(am, ids, attention_mask=mask)
    d = peftlab.export_peft(am, "p", tmp_path / "e")
    pm = _peft_load(tiny_gpt2, d)
    torch.testing.assert_close(_logits(pm, ids, attention_mask=mask), ours, atol=ATOL, rtol=0)


def test_import_peft_saved_prefix(tmp_path):
    torch.manual_seed(11)
    pm = peft.get_peft_model(tiny_llama(), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                   num_virtual_tokens=N)).eval()
    pm.save_pretrained(tmp_path / "s")
    ids = _ids()
    mask = torch.ones_like(ids)
    positions = torch.arange(ids.shape[1]).expand(2, -1)
    theirs = _logits(pm, ids, attention_mask=mask, position_ids=positions)
    am = peftlab.adapt(tiny_llama())
    peftlab.import_peft(am, tmp_path / "s", "p")
    am.set_active("p")
    torch.testing.assert_close(_logits(am, ids, attention_mask=mask, position_ids=positions), theirs,
                               atol=ATOL, rtol=0)
    # bit-exact back to peft's layout
    d = peftlab.export_peft(am, "p", tmp_path / "e")
    from safetensors.torch import load_file
    assert torch.equal(load_file(d / "adapter_model.safetensors")["prompt_embeddings"],
                       load_file(tmp_path / "s" / "adapter_model.safetensors")["prompt_embeddings"])


def _no_eos(am):
    am.model.generation_config.eos_token_id = None    # the greedy reference never stops
    return am


def _greedy(model, ids, steps):
    out = ids
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(input_ids=out, attention_mask=torch.ones_like(out)).logits[:, -1].argmax(-1)
        out = torch.cat([out, nxt[:, None]], dim=1)
    return out


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_generate_matches_greedy_loop(build):
    am = _no_eos(_prefixed(build))
    ids = _ids(2, 5)
    got = am.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert torch.equal(got, _greedy(am, ids, 4))


def test_generate_left_padded_matches_unpadded():
    am = _no_eos(_prefixed(tiny_llama))
    short = _ids(1, 4, seed=2)
    ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(short)], dim=1)
    padded = am.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    alone = am.generate(short, attention_mask=torch.ones_like(short), max_new_tokens=3, do_sample=False)
    assert torch.equal(padded[:, -3:], alone[:, -3:])


def test_left_padded_instruction_call_matches_unpadded():
    am = _prefixed(tiny_llama)
    short, long_ = _ids(1, 5, seed=2)[0], _ids(1, 8, seed=3)[0]
    ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    ids[0, 3:], mask[0, 3:] = short, 1
    ids[1], mask[1] = long_, 1
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        out = am(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits
        alone = [am(input_ids=s[None]).logits[0, -1] for s in (short, long_)]
    for row, ref in zip(out[:, -1], alone, strict=True):
        torch.testing.assert_close(row, ref, atol=1e-5, rtol=0)


def test_generate_matches_peft_forward_greedy(tmp_path):
    """peft's own greedy loop over its forward is the reference. (peft 0.21.2's `generate` with a
    prefix disagrees with its forward under transformers 5: its generation glue looks for
    `past_key_values`/`cache_position`, which transformers 5 renamed, and re-injects the prefix.)"""
    am = _no_eos(_prefixed(tiny_llama))
    d = peftlab.export_peft(am, "p", tmp_path / "e")
    pm = _peft_load(tiny_llama, d)
    ids = _ids(2, 5)
    ours = am.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert torch.equal(ours, _greedy(pm, ids, 4))
